"""Silero VAD, a third-party streaming voice-activity detector shipped as ONNX in a pip
package, through onnxqlimit and onnxruntime's quantize_static (issue 24's motivating model).

    pip install --no-deps silero-vad==6.2.3          # the model file only (it ships torch code too)
    python -m tools.silero_vad --bits W8A8 W4A8 --ort [--json PATH]
    python -m tools.silero_vad --bits W8A8 --extra-bits '.*stft/Conv=8/16,.*encoder/0/reparam_conv/Conv=8/16'

The model (`silero_vad/data/silero_vad.onnx`, opset 16) is one `If` on the sample rate; each
branch holds the STFT Conv, four encoder Convs, nested `If`s around two LSTMs (weights read
through Unsqueeze nodes of Constants) and a decoder Conv: 341 Constants, no initializer.
Inputs `input [batch, 64 + 512]` (the previous chunk's last 64 samples, then 512 new ones, as
the package's wrapper feeds it at 16 kHz; 32 + 256 at 8 kHz), `state [2, batch, 128]`, `sr`.

Data: the generated streams of tools/audio_data.py (speech-like utterances, coloured noise,
hum, clicks; held-out streams drawn with other seeds, pitches, noise colours and SNRs).
Calibration: 256 chunks recorded from a streaming run of the float model (state and context
carried), state stacked as [N, 2, 1, 128], sr one 0-d value. Scores: the held-out streams run
chunk by chunk carrying state and context; accuracy against the per-chunk labels and agreement
with the float model's decisions (prob > 0.5), and the mean |prob - float prob|.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tools import audio_data as A
from tools.common import Table, bits_option, widths
from tools.streaming_models import ort_calib, session

CONTEXT, CHUNK, HIDDEN = {16000: 64, 8000: 32}, {16000: 512, 8000: 256}, 128


def model_path() -> Path:
    spec = importlib.util.find_spec("silero_vad")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx" if spec else None
    if path is None or not path.is_file():
        sys.exit("silero_vad.onnx not found: pip install --no-deps silero-vad==6.2.3")
    return path


def stream(path, audio: np.ndarray, sr: int, record: bool = False):
    """Run streams `audio` [S, n] chunk by chunk from a zero state and context, carrying both:
    speech probabilities [S, chunks], or (record) every chunk's feeds in calibration form."""
    sess, lanes, chunk, context = session(path), len(audio), CHUNK[sr], CONTEXT[sr]
    state = np.zeros((2, lanes, HIDDEN), np.float32)
    previous = np.zeros((lanes, context), np.float32)
    probs, inputs, states = [], [], []
    for k in range(audio.shape[1] // chunk):
        x = np.concatenate([previous, audio[:, k * chunk:(k + 1) * chunk]], axis=1)
        inputs.append(x)
        states.append(state.transpose(1, 0, 2)[:, :, None])
        prob, state = sess.run(None, {"input": x, "state": state, "sr": np.array(sr, np.int64)})
        previous = x[:, -context:]
        probs.append(prob[:, 0])
    if record:  # stream 0's chunks first
        return {"input": np.stack(inputs, 1).reshape(-1, chunk + context),
                "state": np.stack(states, 1).reshape(-1, 2, 1, HIDDEN), "sr": np.array(sr, np.int64)}
    return np.stack(probs, 1)


def calibration(path, sr: int, n: int) -> dict[str, np.ndarray]:
    audio = A.vad_streams(8, 20.0 * 16000 / sr, sr, A.SEEDS["calib"], A.GEN["calib"], chunk=CHUNK[sr])[0]
    feeds = stream(path, audio, sr, record=True)
    pick = np.sort(np.random.default_rng(A.SEEDS["calib"]).choice(len(feeds["input"]), n, replace=False))
    return {"input": feeds["input"][pick], "state": feeds["state"][pick], "sr": feeds["sr"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", nargs="*", default=["W8A8", "W4A8"], type=bits_option, metavar="WxAy")
    ap.add_argument("--sr", type=int, default=16000, choices=[16000, 8000])
    ap.add_argument("--method", default="qdrop", choices=["rtn", "adaround", "brecq", "qdrop"])
    ap.add_argument("--calib", type=int, default=256, help="calibration chunks (default 256)")
    ap.add_argument("--extra-bits", default="", help="--bits overrides for an extra row per width")
    ap.add_argument("--ort", action="store_true", help="also onnxruntime quantize_static")
    ap.add_argument("--json", help="write the table as a docs/results record here")
    args = ap.parse_args(argv)

    from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
    from onnxqlimit.cli import parse_bit_overrides
    from tools.ort_baseline import quantize_with_ort

    src, sr = model_path(), args.sr
    calib = calibration(src, sr, args.calib)
    audio, labels = A.vad_streams(16, 20.0 * 16000 / sr, sr, A.SEEDS["eval"], A.GEN["eval"], chunk=CHUNK[sr])
    speech = labels > 0.5
    ref = stream(src, audio, sr)
    table = Table(["plan", "accuracy", "agreement with float", "of float's accuracy", "mean abs dprob", "size", "time"],
                  args.json, f"Silero VAD (pip silero-vad 6.2.3) at {sr // 1000} kHz",
                  f"{args.calib} calibration chunks recorded from a streaming run of the float model; 16 held-out "
                  f"generated streams of 20 s run chunk by chunk. onnxqlimit method {args.method}, fast preset.")
    table.header()
    float_acc = float(((ref > 0.5) == speech).mean())
    table.add("float", f"{float_acc:.4f}", "1.0000", "1.0000", "0", "1.00x", "")
    plans = [(b, "onnxqlimit", "") for b in args.bits]
    plans += [(b, "onnxqlimit", args.extra_bits) for b in args.bits if args.extra_bits]
    plans += [(b, "onnxruntime", "") for b in args.bits if args.ort]
    with tempfile.TemporaryDirectory(prefix="silero.") as tmp:
        for bits, tool, extra in plans:
            out, (w, a) = Path(tmp) / "q.onnx", widths(bits)
            started = time.perf_counter()
            if tool == "onnxruntime":
                quantize_with_ort(src, ort_calib(calib), out, w, a)
            else:
                config = QuantConfig.of(wbits=w, abits=a, overrides=parse_bit_overrides(extra))
                recon = ReconConfig.preset("fast", method=args.method, calib_size=args.calib)
                quantize(src, out, calib, config, RunOptions(recon=recon, progress=False, overwrite=True))
            seconds = time.perf_counter() - started
            prob = stream(out, audio, sr)
            acc = float(((prob > 0.5) == speech).mean())
            table.add(f"{bits} {tool}" + (f" + {extra}" if extra else ""), f"{acc:.4f}",
                      f"{((prob > 0.5) == (ref > 0.5)).mean():.4f}", f"{acc / float_acc:.4f}",
                      f"{np.abs(prob - ref).mean():.4f}", f"{out.stat().st_size / src.stat().st_size:.2f}x",
                      f"{seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
