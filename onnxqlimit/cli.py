"""Command line: `onnxqlimit inspect MODEL.onnx [--check [--data X.npz]]`."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .errors import QLimitError


def _shape_arg(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, [int(d) for d in dims.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,... (got {text!r})") from None


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {text!r})")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxqlimit", description="Post-training quantization of ONNX models (Q-Limit).")
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
    ins.set_defaults(run=_inspect)
    return parser


def _inspect(args: argparse.Namespace) -> int:
    from .data import load_npz, random_feeds
    from .inspect import format_summary, summarize
    from .load import LoadConfig, default_opset, load_model, read_model
    from .mirror import Mirror
    from .parity import check_mirror, format_parity

    original = read_model(args.model)
    model = load_model(original, LoadConfig(simplify=not args.no_simplify))
    print(f"{args.model}: {len(original.graph.node)} nodes at opset {default_opset(original)}, "
          f"{len(model.graph.node)} after loading (simplified, constants lifted, BatchNorm folded)")
    print(format_summary(summarize(model)))
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
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="onnxqlimit: warning: %(message)s", level=logging.WARNING)
    try:
        return args.run(args)
    except QLimitError as err:
        print(f"onnxqlimit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnxqlimit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: one line by default, the traceback with --debug
        if args.debug:
            raise
        print(f"onnxqlimit: internal error: {type(err).__name__}: {err} (rerun with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
