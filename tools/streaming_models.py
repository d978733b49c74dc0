"""Two small recurrent models trained here on generated audio (issue 24: control flow and
recurrent layers), quantized with onnxqlimit and with onnxruntime's quantize_static beside.

    python -m tools.streaming_models bench --bits W8A8 W4A8 --ort [--json PATH]   # the table
    python -m tools.streaming_models bench --time-check     # rtn on the GRU op vs GRU unrolled
    python -m tools.streaming_models record --model vad.onnx --out calib.npz [--sr 16000]
    python -m tools.streaming_models train                  # train (cached) and score float

VAD (streaming voice-activity detector): `input` [batch, 512] (one chunk of audio), `state`
[2, batch, 64] (LSTM h and c), `sr` int64 scalar -> `prob` [batch, 1], `stateN`. Graph:
Unsqueeze, Conv(k64, s16)+Relu, Conv(k3)+Relu, If(Equal(sr, 16000)): the 16 kHz branch runs
Conv(k3, stride 2)+Relu, 14 LSTM steps per chunk; the 8 kHz branch Conv(k3, stride 1)+Relu,
29 steps (the input stays [batch, 512] at both rates, 64 ms of audio at 8 kHz, so either
branch steps its LSTM every 2 ms). Both run one LSTM whose weights, like the conv features
and the split states, are outer tensors the branches read undeclared; then Relu, Gemm,
Sigmoid on the last h. Trained in torch on generated streams at both rates (truncated BPTT
over 16-chunk windows, the state carried across windows); gates reordered i,f,g,o -> i,o,f,c.
Metrics over 16 held-out streams per rate run chunk by chunk carrying the state (other seeds
and generator settings: pitch, noise colours, SNR; tools/audio_data.py): accuracy against
per-chunk labels (speech over half the chunk), agreement with the float model's prob > 0.5.

Calibration (`record_states`, the `record` command): the float model runs over generated
streams chunk by chunk in onnxruntime, carrying its state, and every chunk's feeds are kept:
`input` [N, 512], `state` as the model received it, stacked on a new first axis [N, 2, 1, 64]
(the repo's convention for an input batched along a later axis), `sr` one 0-d int64 value.
The bench takes 256 chunks of 8 streams at 16 kHz (--calib-sr 8000 or both to change it);
onnxruntime gets the same samples one at a time in the declared form ([2, 1, 64], a 0-d sr).

KWS (keyword spotter): `feats` [batch, 49, 40] log-mel features (numpy STFT), Transpose,
Conv(k3)+Relu, Conv(k3, stride 2)+Relu, GRU (hidden 64, linear_before_reset=1 as torch's;
gates r,z,n -> z,r,h), Gemm over 6 synthetic keywords + unknown + silence. Metric: accuracy
and agreement with the float argmax. --time-check times round-to-nearest quantization of it
against its twin with the GRU unrolled into per-step MatMul/Add/Split/Sigmoid/Tanh/Mul nodes
(the input projection hoisted out of the steps, as the op computes it).

Both graphs are built with onnx.helper (opset 17; tools/streaming_archs.py) from the torch
weights and checked against torch in onnxruntime; trained files and data are cached in ~/.cache/onnxqlimit/streaming.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from tools import audio_data as A
from tools.streaming_archs import CHUNK, KwsNet, VadNet, kws_onnx, vad_onnx

CACHE, SEEDS = A.CACHE, A.SEEDS


def session(model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------- streaming in onnxruntime

def stream_probs(model, audio: np.ndarray, sr: int, chunk: int = CHUNK) -> np.ndarray:
    """Run the VAD over streams `audio` [S, n] (one batch lane each) chunk by chunk from a zero
    state, carrying it: speech probabilities [S, n // chunk]."""
    sess = session(model)
    hid = sess.get_inputs()[1].shape[-1]
    state = np.zeros((2, len(audio), hid), np.float32)
    probs = []
    for k in range(audio.shape[1] // chunk):
        p, state = sess.run(None, {"input": audio[:, k * chunk:(k + 1) * chunk], "state": state,
                                   "sr": np.array(sr, np.int64)})
        probs.append(p[:, 0])
    return np.stack(probs, 1)


def record_states(model_path, audio, sr: int = 16000, chunk: int = CHUNK) -> dict[str, np.ndarray]:
    """Calibration feeds recorded from a streaming run of the float model: `audio` is one
    stream (1-D) or several of equal length [S, n], each run chunk by chunk from a zero
    state in onnxruntime, carrying the state. Returns {input [N, chunk], state [N, 2, 1, H]
    (the state each chunk received, samples stacked on a new first axis), sr: 0-d int64},
    the chunks of stream 0 first."""
    audio = np.atleast_2d(np.asarray(audio, np.float32))
    sess = session(model_path)
    hid = sess.get_inputs()[1].shape[-1]
    s, k = len(audio), audio.shape[1] // chunk
    state = np.zeros((2, s, hid), np.float32)
    inputs, states = np.empty((s, k, chunk), np.float32), np.empty((s, k, 2, 1, hid), np.float32)
    for i in range(k):
        x = audio[:, i * chunk:(i + 1) * chunk]
        inputs[:, i], states[:, i] = x, state.transpose(1, 0, 2)[:, :, None]
        state = sess.run(None, {"input": x, "state": state, "sr": np.array(sr, np.int64)})[1]
    return {"input": inputs.reshape(s * k, chunk), "state": states.reshape(s * k, 2, 1, hid),
            "sr": np.array(sr, np.int64)}


class PerSample:
    """A calibration array read one sample at a time in the model's declared form: for
    tools.ort_baseline's reader, which slices v[i:i+1] (state [2,1,H], sr a 0-d value)."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def __len__(self):
        return len(self.values)

    def __getitem__(self, index: slice):
        return np.asarray(self.values[index.start])


def ort_calib(calib: dict[str, np.ndarray]) -> dict:
    n = len(calib["input"])
    return {"input": calib["input"], "state": PerSample(calib["state"]),
            "sr": PerSample(np.full(n, calib["sr"], np.int64) if np.ndim(calib["sr"]) == 0 else calib["sr"])}


# ----------------------------------------------------------------------------- training

def _optimizer(net: nn.Module, steps: int):
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)


def _step(net: nn.Module, opt, sched, loss: torch.Tensor) -> None:
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    sched.step()


def train_vad(streams: int = 96, seconds: float = 20.0, epochs: int = 6, lanes: int = 32, window: int = 16,
              seed: int = 0, log=print) -> VadNet:
    """Truncated BPTT over `window` chunks, `lanes` streams at a time, the state carried
    across windows; 16 kHz and 8 kHz streams (8 kHz ones twice as long: as many chunks) in turn."""
    torch.manual_seed(seed)
    net = VadNet()
    data = {16000: A.vad_streams(streams, seconds, 16000, SEEDS["train"], A.GEN["train"]),
            8000: A.vad_streams(streams, 2 * seconds, 8000, SEEDS["train"], A.GEN["train"])}
    chunks = min(d[1].shape[1] for d in data.values())
    steps = epochs * (streams // lanes) * (chunks // window)
    opt, sched = _optimizer(net, 2 * steps)
    rng, step, start = np.random.default_rng(seed), 0, time.perf_counter()
    for epoch in range(epochs):
        groups = {sr: rng.permutation(streams).reshape(-1, lanes) for sr in data}
        for g in range(streams // lanes):
            state = {sr: torch.zeros(2, lanes, net.hidden) for sr in data}
            for w in range(chunks // window):
                for sr, (audio, labels) in data.items():
                    idx = groups[sr][g]
                    x = torch.from_numpy(audio[idx, w * window * CHUNK:(w + 1) * window * CHUNK]).reshape(
                        lanes, window, CHUNK)
                    logits, new = net(x, state[sr], sr == 16000)
                    loss = F.binary_cross_entropy_with_logits(
                        logits, torch.from_numpy(labels[idx, w * window:(w + 1) * window]))
                    _step(net, opt, sched, loss)
                    state[sr] = new.detach()
                step += 1
                if step % 100 == 0 or step == steps:
                    log(f"  vad step {step}/{steps} epoch {epoch + 1} loss {loss.item():.3f} "
                        f"({time.perf_counter() - start:.0f} s)")
    return net.eval()


def train_kws(n_train: int = 8000, epochs: int = 14, batch: int = 64, seed: int = 0, log=print) -> KwsNet:
    torch.manual_seed(seed)
    net = KwsNet()
    feats, labels = A.kws_dataset(n_train, SEEDS["train"], A.GEN["train"])
    steps = epochs * (n_train // batch)
    opt, sched = _optimizer(net, steps)
    rng, start = np.random.default_rng(seed), time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(n_train)
        for k in range(n_train // batch):
            idx = order[k * batch:(k + 1) * batch]
            loss = F.cross_entropy(net(torch.from_numpy(feats[idx])), torch.from_numpy(labels[idx]))
            _step(net, opt, sched, loss)
        log(f"  kws epoch {epoch + 1}/{epochs} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    return net.eval()


def _check(model: onnx.ModelProto, feeds: dict, torch_out: np.ndarray, what: str) -> float:
    diff = float(np.abs(session(model).run(None, feeds)[0] - torch_out).max())
    if diff > 1e-4:
        raise AssertionError(f"{what}: onnxruntime differs from torch by {diff:.2e}")
    return diff


def vad_model(log=print) -> Path:
    """The trained float VAD (cached)."""
    path = CACHE / "vad.onnx"
    if not path.exists():
        torch.set_num_threads(1)
        net = train_vad(log=log)
        model = vad_onnx(net)
        x = A.vad_streams(2, 1.0, 16000, 7, A.GEN["calib"])[0][:, :CHUNK]
        state = np.random.default_rng(0).normal(0, 0.5, (2, 2, net.hidden)).astype(np.float32)
        for sr in (16000, 8000):
            with torch.no_grad():
                want = torch.sigmoid(net(torch.from_numpy(x)[:, None], torch.from_numpy(state), sr == 16000)[0]).numpy()
            diff = _check(model, {"input": x, "state": state, "sr": np.array(sr)}, want, f"vad at {sr}")
            log(f"  vad onnx vs torch at {sr} Hz: max abs diff {diff:.1e}")
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return path


def kws_model(log=print) -> Path:
    """The trained float KWS (cached), and its unrolled twin beside it."""
    path = CACHE / "kws.onnx"
    if not path.exists() or not (CACHE / "kws_unrolled.onnx").exists():
        torch.set_num_threads(1)
        net = train_kws(log=log)
        x = A.kws_dataset(16, 7, A.GEN["calib"])[0]
        with torch.no_grad():
            want = net(torch.from_numpy(x)).numpy()
        for unrolled, name in ((False, path), (True, CACHE / "kws_unrolled.onnx")):
            model = kws_onnx(net, unrolled=unrolled)
            log(f"  {name.name} vs torch: max abs diff {_check(model, {'feats': x}, want, name.name):.1e}")
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(model, str(name))
    return path


def subsample(feeds: dict, n: int, seed: int) -> dict:
    """n of the recorded chunks, a seeded choice kept in stream order (0 or more than there are: all)."""
    if not 0 < n < len(feeds["input"]):
        return feeds
    pick = np.sort(np.random.default_rng(seed).choice(len(feeds["input"]), n, replace=False))
    return {"input": feeds["input"][pick], "state": feeds["state"][pick], "sr": feeds["sr"]}


def vad_calib(model: Path, sr_mode: str = "16000", n: int = 256) -> dict[str, np.ndarray]:
    """n chunks (seeded choice) of the feeds recorded over 8 calibration streams of 20 s;
    sr_mode "both": n/2 at each rate, sr given per sample (the quantizer's batches must
    each share one value: keep n/2 a multiple of its batch size)."""
    def make(sr, k):
        audio = A.vad_streams(8, 20.0 * 16000 / sr, sr, SEEDS["calib"], A.GEN["calib"])[0]
        return subsample(record_states(model, audio, sr), k, SEEDS["calib"])
    if sr_mode != "both":
        return make(int(sr_mode), n)
    a, b = make(16000, n // 2), make(8000, n // 2)
    return {"input": np.concatenate([a["input"], b["input"]]), "state": np.concatenate([a["state"], b["state"]]),
            "sr": np.repeat(np.array([16000, 8000], np.int64), n // 2)}


# ------------------------------------------------------------------------------ scoring

def vad_scores(path, data: dict, sr: int, ref: np.ndarray | None = None) -> dict:
    prob = stream_probs(path, data["audio"], sr)
    out = {"acc": float(((prob > 0.5) == (data["labels"] > 0.5)).mean()), "prob": prob}
    out["agree"] = float(((prob > 0.5) == (ref > 0.5)).mean()) if ref is not None else 1.0
    return out


def kws_scores(path, data: dict, ref: np.ndarray | None = None) -> dict:
    sess = session(path)
    pred = np.concatenate([sess.run(None, {"feats": data["feats"][i:i + 256]})[0].argmax(1)
                           for i in range(0, len(data["feats"]), 256)])
    return {"acc": float((pred == data["labels"]).mean()), "prob": pred,
            "agree": float((pred == ref).mean()) if ref is not None else 1.0}


# --------------------------------------------------------------------------------- main

def quantize_file(src: Path, out: Path, calib: dict, wbits: int, abits: int, method: str, args) -> float:
    start = time.perf_counter()
    if method == "onnxruntime":
        from tools.ort_baseline import quantize_with_ort
        quantize_with_ort(src, ort_calib(calib) if "state" in calib else calib, out, wbits, abits)
    else:
        from onnxqlimit import QuantConfig, ReconConfig, RunOptions, quantize
        quantize(src, out, calib, QuantConfig.of(wbits=wbits, abits=abits),
                 RunOptions(recon=ReconConfig.preset("fast", method=method, iters=args.iters,
                                                     calib_size=len(next(iter(calib.values())))),
                            progress=False, threads=args.threads, overwrite=True))
    return time.perf_counter() - start


def bench(args) -> int:
    from tools.common import Table, widths

    rows = []
    with tempfile.TemporaryDirectory(prefix="streaming.") as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        models = {}
        if "vad" in args.models:
            src = vad_model()
            evals = {sr: A.vad_eval(sr) for sr in (16000, 8000)}
            models["vad"] = (src, vad_calib(src, args.calib_sr, args.calib), lambda p, ref=None: {
                sr: vad_scores(p, evals[sr], sr, None if ref is None else ref[sr]["prob"]) for sr in evals})
        if "kws" in args.models:
            src = kws_model()
            ev = A.kws_data("eval", args.eval_kws)
            models["kws"] = (src, {"feats": A.kws_data("calib", args.calib)["feats"]},
                             lambda p, ref=None: {"": kws_scores(p, ev, None if ref is None else ref[""]["prob"])})
        print(f"models and data ready ({time.perf_counter() - start:.0f} s)", flush=True)
        for name, (src, calib, score) in models.items():
            ref = score(src)
            cells = [("float", "-", None)] + [(b, m, widths(b)) for b in args.bits
                                              for m in [args.method] + (["onnxruntime"] if args.ort else [])]
            for bits, method, wa in cells:
                path = src if wa is None else out / f"{name}_{bits}_{method}.onnx"
                try:
                    secs = 0.0 if wa is None else quantize_file(src, path, calib, *wa, method, args)
                    scores, size = score(path, ref), path.stat().st_size / src.stat().st_size
                    new = [{"model": f"{name} {tag // 1000}k" if tag else name, "plan": bits, "method": method,
                            "acc": s["acc"], "agree": s["agree"], "ratio": s["acc"] / ref[tag]["acc"], "size": size,
                            "seconds": secs} for tag, s in scores.items()]
                except Exception as err:  # noqa: BLE001 - a failed cell is a result
                    msg = " ".join(f"{type(err).__name__}: {err}".split())
                    new = [{"model": name, "plan": bits, "method": method, "error": msg[:300]}]
                rows += new
                for row in new:
                    print(json.dumps(row), flush=True)
    print()
    table = Table(["model", "plan", "accuracy", "agreement with float", "vs float metric", "size vs float", "time"],
                  args.json, "Streaming VAD (LSTM in an If) and GRU keyword spotter, trained on generated audio",
                  f"VAD: {args.calib} calibration chunks at sr {args.calib_sr} with recorded states, 16 held-out "
                  f"streams per rate run chunk by chunk; KWS: {args.calib} calibration clips, {args.eval_kws} "
                  f"held-out clips. onnxqlimit method {args.method}; recurrent weights at the repo's default. "
                  "Targets: W8A8 >= 0.99 of float, W4A8 >= 0.97.")
    table.header()
    for r in rows:
        plan = r["plan"] if r["method"] == "-" else f"{r['plan']} {r['method']}"
        if "error" in r:
            table.add(r["model"], plan, f"n/a: {r['error'][:100]}", "", "", "", "")
        else:
            table.add(r["model"], plan, f"{r['acc']:.4f}", f"{r['agree']:.4f}", f"{r['ratio']:.4f}",
                      f"{r['size']:.2f}x", f"{r['seconds']:.1f} s")
    return 0


def time_check(args) -> int:
    """Round-to-nearest quantization of the KWS (GRU op) vs its unrolled twin, same calibration."""
    src = kws_model()
    unrolled = CACHE / "kws_unrolled.onnx"
    calib = {"feats": A.kws_data("calib", args.calib)["feats"]}
    x = calib["feats"][:32]
    diff = np.abs(session(src).run(None, {"feats": x})[0] - session(unrolled).run(None, {"feats": x})[0]).max()
    print(f"GRU vs unrolled in onnxruntime: max abs diff {diff:.1e}")
    times = {}
    with tempfile.TemporaryDirectory(prefix="streaming.") as tmp:
        for name, path in (("GRU op", src), ("unrolled", unrolled)):
            times[name] = quantize_file(path, Path(tmp) / f"{name[:3]}.onnx", calib, 8, 8, "rtn", args)
            print(f"{name}: {times[name]:.1f} s (rtn, W8A8, {args.calib} samples)", flush=True)
    print(f"GRU op / unrolled: {times['GRU op'] / times['unrolled']:.2f}x (target: <= 3x)")
    return 0


def record(args) -> int:
    audio = A.vad_streams(args.streams, args.seconds, args.sr, args.seed, A.GEN["calib"])[0]
    feeds = subsample(record_states(args.model, audio, args.sr), args.samples, args.seed)
    np.savez(args.out, **feeds)
    print(f"{args.out}: input {feeds['input'].shape}, state {feeds['state'].shape}, sr {int(feeds['sr'])}")
    return 0


def main(argv=None) -> int:
    from tools.common import bits_option

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="the table (or --time-check)")
    b.add_argument("--bits", nargs="*", default=["W8A8", "W4A8"], type=bits_option, metavar="WxAy")
    b.add_argument("--models", nargs="+", default=["vad", "kws"], choices=["vad", "kws"])
    b.add_argument("--method", default="qdrop", choices=["rtn", "adaround", "brecq", "qdrop"])
    b.add_argument("--iters", type=int, default=None, help="reconstruction iterations per block (default: preset)")
    b.add_argument("--calib", type=int, default=256, help="calibration samples (default 256)")
    b.add_argument("--calib-sr", default="16000", choices=["16000", "8000", "both"],
                   help="VAD calibration rate; both: half at each (sr given per sample)")
    b.add_argument("--eval-kws", type=int, default=2000, help="held-out KWS clips (default 2000)")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--ort", action="store_true", help="also onnxruntime quantize_static")
    b.add_argument("--time-check", action="store_true", help="time rtn on the KWS vs its GRU unrolled, then stop")
    b.add_argument("--keep", help="folder for the quantized files")
    b.add_argument("--json", help="write the table as a docs/results record here")
    r = sub.add_parser("record", help="record calibration feeds (states) from a streaming run")
    for flag, kind, default, text in (("--model", str, None, "the float VAD"), ("--out", str, None, ".npz to write"),
                                      ("--sr", int, 16000, "16000 or 8000"), ("--streams", int, 8, "generated streams"),
                                      ("--seconds", float, 20.0, "length of each"),
                                      ("--samples", int, 256, "chunks kept, a seeded choice (0: all)"),
                                      ("--seed", int, SEEDS["calib"], "audio and choice seed")):
        r.add_argument(flag, type=kind, default=default, required=default is None, help=text)
    sub.add_parser("train", help="train (cached) and score the float models")
    args = ap.parse_args(argv)
    if args.command == "record":
        return record(args)
    if args.command == "train":
        vad, kws = vad_model(), kws_model()
        print({f"vad {sr // 1000}k": round(vad_scores(vad, A.vad_eval(sr), sr)["acc"], 4) for sr in (16000, 8000)},
              {"kws": round(kws_scores(kws, A.kws_data("eval", 2000))["acc"], 4)})
        return 0
    return time_check(args) if args.time_check else bench(args)


if __name__ == "__main__":
    sys.exit(main())
