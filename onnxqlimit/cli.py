"""Command line: `onnxqlimit inspect`, `onnxqlimit quantize` and `onnxqlimit eval`."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .context import RunOptions
from .errors import QLimitError
from .mixed.config import SOLVERS, GAConfig, MixedConfig, SensitivityConfig, Targets
from .quant.config import (
    ACT_OBSERVERS,
    WEIGHT_OBSERVERS,
    Placement,
    QuantConfig,
    Scheme,
    Widths,
)
from .quant.runtimes import RUNTIMES, profile, scheme_conflicts
from .quant.widths import (
    ACT_BITS,
    DEFAULT_ABITS_CHOICES,
    DEFAULT_WBITS_CHOICES,
    FLOAT_BITS,
    WEIGHT_BITS,
    WEIGHT_BLOCKS,
)
from .recon.blocks import GRANULARITIES
from .recon.config import LOSSES, METHODS, PRESETS, ReconConfig


def _shape_arg(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, [int(d) for d in dims.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,... (got {text!r})") from None


def _widths(widths: tuple[int, ...]) -> str:
    return ",".join(map(str, widths))


def _size_arg(text: str) -> float:
    """'600KB', '1.5MB', '2GB' or plain bytes (KB = 1000 bytes; KiB/MiB = 1024)."""
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    number = text.strip().upper().rstrip("BIKMG")
    unit = text.strip().upper()[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size like 600KB or 1.5MB (got {text!r})") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size (got {text!r})")
    return value


def _widths_arg(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(sorted({int(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 2,4,8 (got {text!r})") from None
    if not widths:
        raise argparse.ArgumentTypeError("expected at least one width")
    return widths


def _abits_arg(text: str) -> int | str:
    """An activation width; 'none' (or 'float') is FLOAT_BITS: weight-only."""
    if text.lower() in ("none", "float"):
        return FLOAT_BITS
    return int(text) if text.isdigit() else text  # argparse's choices refuse anything else


def _smooth_arg(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number (got {text!r})") from None


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {text!r})")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other refusal (`--help` still shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"onnxqlimit: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxqlimit", description="Post-training quantization of ONNX models (Q-Limit).")
    parser.add_argument("--version", action="version", version=f"onnxqlimit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True)

    ins = sub.add_parser("inspect", help="summarise a model; --check runs the mirror against onnxruntime")
    ins.add_argument("model", help="ONNX model file")
    ins.add_argument("--no-simplify", action="store_true", help="skip onnxsim simplification")
    ins.add_argument("--check", action="store_true", help="run the torch mirror and onnxruntime, report max error per output")
    ins.add_argument("--data", help=".npz with one array per model input (leading dim = samples); default: random inputs")
    ins.add_argument("--samples", type=_positive, default=8, help="samples of --data to use (default 8)")
    ins.add_argument("--input-shape", type=_shape_arg, action="append", default=[], metavar="NAME=D0,D1,...",
                     help="shape of random inputs for dynamic models (repeatable)")
    ins.add_argument("--blocks", action="store_true", help="list the reconstruction blocks found in the graph")
    ins.add_argument("--runtime-check", action="store_true",
                     help="how onnxruntime's CPU provider runs the file as it is: compute nodes in integer kernels "
                     "vs float, and its latency (against --reference when given); nothing else is printed")
    ins.add_argument("--reference", metavar="FP.onnx", help="with --runtime-check: the float model to time against")
    ins.add_argument("--threads", type=_positive, help="with --runtime-check: onnxruntime threads (default: its own)")
    ins.add_argument("--granularity", choices=GRANULARITIES, default="block", help="block size for --blocks (default block)")
    ins.add_argument("--block-layers", type=_positive, default=6, metavar="N",
                     help="most weight layers per block at granularity block (default 6)")
    ins.set_defaults(run=_inspect)

    ev = sub.add_parser("eval", help="accuracy, or agreement with a float model, of a model on data (onnxruntime)")
    ev.add_argument("model", help="ONNX model file (quantized or not)")
    ev.add_argument("--data", required=True, metavar="VAL.npz", help=".npz with one array per model input")
    ev.add_argument("--labels", metavar="KEY", help="array in --data holding one class label per sample (top-1 accuracy "
                    "of the first output)")
    ev.add_argument("--reference", metavar="FP.onnx", help="float model to compare with: SQNR per output, and top-1 "
                    "agreement for [N, classes] outputs")
    ev.add_argument("--batch-size", type=_positive, default=32)
    ev.set_defaults(run=_eval)

    q = sub.add_parser("quantize", help="quantize a model and write a QDQ ONNX file")
    q.add_argument("model", help="FP32 ONNX model")
    q.add_argument("-o", "--output", required=True, help="where to write the quantized model")
    q.add_argument("--calib", required=True, help=".npz keyed by input name, or a folder of images (with --preprocess)")
    q.add_argument("--preprocess", help="for image folders: 'size=H,W;mean=a,b,c;std=a,b,c;scale=255;layout=NCHW;color=RGB'")
    q.add_argument("--runtime", default="generic", choices=RUNTIMES,
                   help="write the file for this runtime (docs/runtimes.md): generic (default: any width; 8-bit layers "
                   "in the form onnxruntime fuses) | ort-cpu | tensorrt | qnn; a width it cannot run is refused")
    q.add_argument("--wbits", type=int, default=8, choices=WEIGHT_BITS, metavar="W",
                   help=f"weight bits, one of {_widths(WEIGHT_BITS)} (default 8)")
    q.add_argument("--abits", type=_abits_arg, default=8, choices=ACT_BITS, metavar="A",
                   help=f"activation bits, one of {_widths(ACT_BITS[:-1])}, or 32 / none: activations stay float "
                   "(weight-only; onnxruntime runs such MatMuls as MatMulNBits) (default 8)")
    m = q.add_argument_group("mixed precision (any --target-* runs the search; docs/mixed_precision.md)")
    m.add_argument("--target-size", type=_size_arg, metavar="SIZE", help="weight storage of the file, e.g. 600KB, 1.5MB")
    m.add_argument("--target-avg-wbits", type=float, metavar="BITS", help="parameter-weighted weight bits, e.g. 3.0")
    m.add_argument("--target-bitops", type=float, metavar="G", help="MACs x wbits x abits per sample, in G")
    m.add_argument("--target-latency", type=float, metavar="MS", help="onnxruntime latency per sample from a per-node table")
    m.add_argument("--target-metric", type=float, metavar="FRACTION",
                   help="keep this fraction of the float model's metric (agreement, or accuracy with --eval labels)")
    m.add_argument("--eval", dest="eval_data", metavar="DATA.npz",
                   help="data for --target-metric: model inputs and optionally 'labels' (default: the calibration data)")
    m.add_argument("--wbits-choices", type=_widths_arg, default=DEFAULT_WBITS_CHOICES, metavar="W,W,...",
                   help=f"weight widths to choose from; 32: a float layer (default {_widths(DEFAULT_WBITS_CHOICES)}; "
                   "with --runtime ort-cpu/tensorrt 4,8,32, qnn 4,8)")
    m.add_argument("--abits-choices", type=_widths_arg, default=DEFAULT_ABITS_CHOICES, metavar="A,A,...",
                   help=f"activation widths to choose from; 32: weight-only (default {_widths(DEFAULT_ABITS_CHOICES)}; "
                   "with --runtime ort-cpu/tensorrt 8,32, qnn 8,16)")
    m.add_argument("--solver", default="milp", choices=SOLVERS,
                   help="milp (exact, default) | ga (the paper's genetic algorithm)")
    m.add_argument("--ga-population", type=_positive, default=64)
    m.add_argument("--ga-generations", type=_positive, default=200)
    m.add_argument("--ga-mutation", type=float, default=0.05, help="per-gene mutation probability (default 0.05)")
    m.add_argument("--ga-crossover", type=float, default=0.9, help="crossover probability (default 0.9)")
    m.add_argument("--sens-samples", type=_positive, default=None,
                   help="samples for the sensitivities (default 32, down to 8 for large inputs: 8 at 640x640)")
    m.add_argument("--sens-iters", type=int, default=SensitivityConfig.tune_iters, metavar="N",
                   help="reconstruction iterations each candidate configuration gets before it is scored, so plans "
                        f"rank by their loss after reconstruction (default {SensitivityConfig.tune_iters}; "
                        "0: round-to-nearest scores; an rtn run always uses those)")
    m.add_argument("--work-dir", default=None,
                   help="cache for sensitivities, latency tables and the checkpoints of finished blocks that "
                        "--resume restores (default $ONNXQLIMIT_CACHE or ~/.cache/onnxqlimit)")
    m.add_argument("--save-plan", metavar="PLAN.json", help="write the bit plan used (node -> wbits/abits)")
    m.add_argument("--bits-plan", metavar="PLAN.json", help="quantize with this bit plan (e.g. an edited --save-plan)")
    q.add_argument("--method", default="qdrop", choices=METHODS, help="rtn (round to nearest) | adaround (layer-wise) | brecq (block-wise) "
                   "| qdrop (block-wise with dropped activation quantization; default)")
    q.add_argument("--preset", default="fast", choices=list(PRESETS), help="fast (default: 500 iterations per block, batch 8, 256 samples) "
                   "| paper (20000, 32, 1024)")
    q.add_argument("--iters", type=_positive, help="reconstruction iterations per block (overrides the preset)")
    q.add_argument("--calib-size", type=_positive, help="calibration samples to use (overrides the preset)")
    q.add_argument("--batch-size", type=_positive, help="batch size (overrides the preset)")
    q.add_argument("--no-early-stop", action="store_true",
                   help="run every block's full schedule (the fast preset shortens it once the loss plateaus; "
                   "paper never does)")
    q.add_argument("--no-channels-last", action="store_true",
                   help="tune convolutional blocks in NCHW (default on CPU: channels-last, faster convolutions)")
    q.add_argument("--tile", type=int, default=64, metavar="N",
                   help="tune local convolutional blocks on random NxN crops of maps of 4 such tiles or more "
                   "(default 64; 0: whole maps)")
    q.add_argument("--compile", action="store_true",
                   help="torch.compile the fake-quantization kernel while tuning (needs a C++ compiler; "
                   "falls back to eager with one warning)")
    q.add_argument("--granularity", default="block", choices=GRANULARITIES, help="reconstruction unit: layer | block (default) | stage | net")
    q.add_argument("--block-layers", type=_positive, default=6, help="most weight layers in one block (default 6)")
    q.add_argument("--loss", default="mse", choices=LOSSES, help="mse (default) | fisher (BRECQ's Fisher-diagonal weighting)")
    q.add_argument("--quant-prob", type=float, default=0.5,
                   help="QDrop: probability that an activation element is quantized while tuning (default 0.5; "
                   "1 turns QDrop off)")
    q.add_argument("--round-lambda", type=float, default=0.01,
                   help="AdaRound regulariser weight (default 0.01; 0.1 suits MobileNetV2-like nets)")
    q.add_argument("--cache-gb", type=float, default=8.0,
                   help="RAM for cached block inputs/outputs; the rest goes to temporary files (default 8)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    q.add_argument("--threads", type=_positive, help="torch CPU threads (default: OMP_NUM_THREADS if set, else every core)")
    q.add_argument("--report", help="write a JSON report (per-node bits, scales, SQNR; sizes; parity)")
    q.add_argument("--plot", metavar="P.png", help="per-layer widths and output SQNR as a picture (needs matplotlib)")
    q.add_argument("--first-last-bits", default="8", help="bits of the first and last compute layers: 8 (default) or 'same'")
    q.add_argument("--embedding-bits", type=int, default=8, choices=(0, *WEIGHT_BITS), metavar="W",
                   help="bits of tables read by Gather (embeddings), weight-only per row; 0 leaves them float (default 8)")
    q.add_argument("--smooth", type=_smooth_arg, metavar="ALPHA|auto",
                   help="SmoothQuant: migrate activation outliers into MatMul/Gemm weights with strength ALPHA "
                        "(below 1, e.g. 0.5; 0: off). Default 'auto': per tensor, only where it cuts the layers' "
                        "quantization error (with --runtime tensorrt: 0.8)")
    q.add_argument("--exclude", action="append", default=[], metavar="NAME_OR_REGEX", help="leave matching nodes float (repeatable)")
    q.add_argument("--bits", default="", metavar="NAME_OR_REGEX=W/A,...", help="per-node bit overrides")
    q.add_argument("--weight-init", choices=WEIGHT_OBSERVERS, default="mse", help="weight range observer (default mse)")
    q.add_argument("--act-init", choices=ACT_OBSERVERS, default="mse", help="activation range observer (default mse)")
    q.add_argument("--percentile", type=float, default=99.99, help="for --act-init percentile (default 99.99)")
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default per output channel)")
    q.add_argument("--weight-block", type=int, choices=WEIGHT_BLOCKS, metavar="K",
                   help="MatMul/Gemm weights: one scale per output channel and block of K inputs "
                   f"({_widths(WEIGHT_BLOCKS)}; DequantizeLinear block_size, opset 21)")
    q.add_argument("--weight-asymmetric", action="store_true", help="unsigned weights with a zero point")
    q.add_argument("--act-symmetric", action="store_true", help="signed activations, zero point 0")
    q.add_argument("--quantize-add", action="store_true", help="also quantize residual Add inputs")
    q.add_argument("--quantize-concat", action="store_true", help="also quantize Concat inputs")
    q.add_argument("--quantize-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize MatMuls of two activations at any width (--no-quantize-attention: keep them float; "
                   "default: only where the runtime fuses them, at 8 bits)")
    q.add_argument("--no-simplify", action="store_true", help="skip onnxsim simplification")
    q.add_argument("--resume", action="store_true",
                   help="restore the blocks that an interrupted run of the same model, data and options saved "
                        "in the work dir, and tune only the rest (the file is the same as an uninterrupted run's)")
    q.add_argument("--overwrite", action="store_true", help="allow -o to be the input model's own file")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(run=_quantize)
    return parser


def parse_bit_overrides(text: str) -> tuple[tuple[str, int, int], ...]:
    """'conv1=8/8,layer4.*=4/8' -> (('conv1', 8, 8), ('layer4.*', 4, 8))."""
    overrides = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        pattern, sep, bits = item.rpartition("=")
        w, slash, a = bits.partition("/")
        if not sep or not pattern or not slash or not (w.isdigit() and a.isdigit()):
            raise QLimitError(f"--bits: expected NAME_OR_REGEX=W/A, got {item!r}")
        overrides.append((pattern, int(w), int(a)))
    return tuple(overrides)


def build_configs(args: argparse.Namespace) -> tuple[QuantConfig, RunOptions]:
    """Every `quantize` flag into the one setting it owns."""
    import os
    from pathlib import Path

    # scheme flags a runtime profile contradicts are refused, not silently overridden
    explicit = {k: v for k, v in (("weight_symmetric", not args.weight_asymmetric),
                                  ("weight_per_channel", not args.per_tensor), ("act_symmetric", args.act_symmetric))
                if v != getattr(Scheme, k)}
    scheme_conflicts(profile(args.runtime), explicit)
    if args.first_last_bits != "same" and not args.first_last_bits.isdigit():
        raise QLimitError(f"--first-last-bits must be a bit width or 'same' (got {args.first_last_bits!r})")
    config = QuantConfig(
        Widths(wbits=args.wbits, abits=args.abits,
               first_last_bits=None if args.first_last_bits == "same" else int(args.first_last_bits),
               embedding_bits=args.embedding_bits or None, overrides=parse_bit_overrides(args.bits)),
        Scheme(weight_symmetric=not args.weight_asymmetric, weight_per_channel=not args.per_tensor,
               weight_init=args.weight_init, act_symmetric=args.act_symmetric, act_init=args.act_init,
               percentile=args.percentile, weight_block=args.weight_block),
        Placement(quantize_add=args.quantize_add, quantize_concat=args.quantize_concat,
                  quantize_act_matmul=args.quantize_attention, exclude=tuple(args.exclude)),
        smooth=args.smooth, runtime=args.runtime)
    recon = ReconConfig.preset(args.preset, method=args.method, iters=args.iters, calib_size=args.calib_size,
                               batch_size=args.batch_size, early_stop=False if args.no_early_stop else None,
                               granularity=args.granularity, max_layers=args.block_layers, loss=args.loss,
                               quant_prob=args.quant_prob, round_lambda=args.round_lambda, cache_gb=args.cache_gb,
                               compile=args.compile, channels_last=not args.no_channels_last, tile=args.tile)
    targets = Targets(size_bytes=args.target_size, avg_wbits=args.target_avg_wbits,
                      bitops=args.target_bitops * 1e9 if args.target_bitops is not None else None,
                      latency_ms=args.target_latency, metric=args.target_metric)
    mixed = MixedConfig(targets, SensitivityConfig(args.wbits_choices, args.abits_choices, args.sens_samples,
                                                      tune_iters=args.sens_iters),
                        args.solver, GAConfig(args.ga_population, args.ga_generations, args.ga_mutation,
                                              args.ga_crossover))
    work_dir = args.work_dir or os.environ.get("ONNXQLIMIT_CACHE") or str(Path.home() / ".cache" / "onnxqlimit")
    options = RunOptions(recon=recon, mixed=mixed, seed=args.seed, device=args.device, threads=args.threads,
                         simplify=not args.no_simplify, overwrite=args.overwrite, preprocess=args.preprocess,
                         progress=not args.quiet, bits_plan=args.bits_plan, save_plan=args.save_plan,
                         eval_data=args.eval_data, work_dir=work_dir, resume=args.resume)
    return config, options


def _quantize(args: argparse.Namespace) -> int:
    from .pipeline import quantize
    from .report import format_report

    config, options = build_configs(args)
    report = quantize(args.model, args.output, args.calib, config, options).report
    print(format_report(report))
    if args.report:
        report.write(args.report)
        print(f"report: {args.report}")
    if args.plot:
        from .plot import plot_layers

        plot_layers(report, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import LABEL_KEYS, conform, graph_inputs, load_npz
    from .evaluate import compare, format_quality, run
    from .load import read_model

    if not args.labels and not args.reference:
        raise QLimitError("eval needs --labels KEY (accuracy) or --reference FP.onnx (agreement with a float model)")
    model = read_model(args.model)
    names = [v.name for v in graph_inputs(model)]
    feeds = conform(load_npz(args.data, names, LABEL_KEYS + ((args.labels,) if args.labels else ())), model,
                    f"{args.data}:")
    labels = None
    if args.labels:  # load_npz read the file: it exists and is a readable .npz
        with np.load(args.data, allow_pickle=False) as data:
            if args.labels not in data.files:
                raise QLimitError(f"{args.data}: no array {args.labels!r} for --labels (file has: {', '.join(data.files)})")
            labels = np.asarray(data[args.labels])
        if len(labels) != len(next(iter(feeds.values()))):
            raise QLimitError(f"{args.data}: {args.labels!r} must hold one label per sample")
    outputs = run(model, feeds, args.batch_size)
    reference = None
    if args.reference:
        ref_model = read_model(args.reference)
        reference = run(ref_model, conform(feeds, ref_model, f"{args.data}:"), args.batch_size)
    rows = compare(outputs, reference, labels)
    if labels is not None and rows[0].accuracy is None:
        raise QLimitError(f"--labels: the first output {rows[0].name!r} is not [samples, classes]")
    print(f"{args.model} on {len(next(iter(feeds.values())))} samples of {args.data}: {format_quality(rows)}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .data import conform, graph_inputs, load_npz, random_feeds
    from .inspect import format_summary, summarize
    from .load import LoadConfig, default_opset, load_model, read_model
    from .mirror import Mirror
    from .parity import check_mirror, format_parity

    original = read_model(args.model)
    if args.runtime_check:
        from .runtime import check_runtime, format_runtime

        feeds = load_npz(args.data, [v.name for v in graph_inputs(original)]) if args.data else \
            random_feeds(original, dict(args.input_shape))
        feeds = conform({k: v[:1] for k, v in feeds.items()} if args.data else feeds, original, f"{args.data}:" if args.data else "--input-shape")
        if args.reference:  # refused in one line before onnxruntime runs anything
            conform(feeds, read_model(args.reference), f"--reference {args.reference}:")
        print(format_runtime(check_runtime(args.model, feeds, args.reference, args.threads or 0)))
        return 0
    model = load_model(original, LoadConfig(simplify=not args.no_simplify))
    print(f"{args.model}: {len(original.graph.node)} nodes at opset {default_opset(original)}, "
          f"{len(model.graph.node)} after loading (simplified, constants lifted, BatchNorm folded)")
    print(format_summary(summarize(model)))
    if args.blocks:
        from .recon.blocks import BlockConfig, find_blocks, format_blocks

        config = BlockConfig(granularity=args.granularity, max_layers=args.block_layers)
        print(f"\nreconstruction blocks (granularity {args.granularity}, at most {args.block_layers} layers per block):")
        print(format_blocks(find_blocks(model, config), model))
    if not args.check:
        return 0
    mirror = Mirror(model)  # refuses unsupported models with one message
    if args.data:
        feeds = {k: v[: args.samples] for k, v in load_npz(args.data, mirror.input_names).items()}
    else:
        feeds = random_feeds(model, dict(args.input_shape))
    rows = check_mirror(original, mirror, feeds)
    print(f"\nparity: mirror vs onnxruntime on {len(next(iter(feeds.values())))} sample(s)")
    print(format_parity(rows))
    if not all(r.ok for r in rows):
        print("onnxqlimit: error: mirror and onnxruntime disagree beyond tolerance", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed in one line
        return done.code if isinstance(done.code, int) else 2
    logging.basicConfig(format="onnxqlimit: warning: %(message)s", level=logging.WARNING)
    try:
        return args.run(args)
    except QLimitError as err:
        print(f"onnxqlimit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ("; nothing was written, finished blocks are saved: rerun the same command with --resume"
                if args.command == "quantize" else "")
        print(f"onnxqlimit: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: one line by default, the traceback with --debug
        if args.debug:
            raise
        print(f"onnxqlimit: internal error: {type(err).__name__}: {err} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
