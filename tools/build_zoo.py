"""Rebuild the sample model zoo in ``models/`` deterministically.

Task ("shapes10"): procedurally generated 3x32x32 RGB images in [0, 1] (multiples of
1/255), 10 classes of shapes and patterns (disk, square, triangle, ring, plus, frame,
horizontal stripes, vertical stripes, checkerboard, diagonal cross) with random
position, size, rotation, colours/contrast, clutter (lines and blobs behind and in
front of the shape) and speckle noise. Small, low-contrast or occluded shapes are
genuinely ambiguous, so FP32 top-1 stays below 100% and low-bit quantization
visibly costs accuracy. No downloads; numpy only.

Two small CNNs with BatchNorm (left as BatchNormalization nodes in the ONNX files
for the quantizer to fold) are trained for a fixed number of epochs with fixed seeds
and 2 threads, exported to ONNX opset 13 (input "input" [batch,3,32,32] ->
"logits" [batch,10]) and scored with onnxruntime.

    python -m tools.build_zoo [--out DIR]
"""
from __future__ import annotations

import argparse
import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.archs import MobileNetV2, ResNet, export_onnx
from tools.tasks import ROOT

OPSET, THREADS = 13, 2
N_TRAIN, N_VAL, N_CALIB = 40000, 2000, 256
SEED_TRAIN, SEED_VAL, SEED_CALIB = 1, 2, 3  # independent data streams
CLASSES = ["disk", "square", "triangle", "ring", "plus", "frame", "hstripes", "vstripes", "checker", "cross"]
# Generator knobs (tuned so small CNNs land around 90% top-1).
GEN = dict(cmin=0.1, clen=10.0, cblob=2.5, nback=4, nfront=3, rmin=2.5, rmax=13.0, rot=15.0, speckle=0.03)

# ---------------------------------------------------------------------------- data

S, SS = 32, 2  # image size, supersampling factor for anti-aliased edges
_g = (np.arange(S * SS, dtype=np.float32) + 0.5) / SS
GX, GY = np.meshgrid(_g, _g)  # pixel-unit coordinates on the supersampled grid


def _shape_mask(cls: int, a, b, r: float, rng) -> np.ndarray:
    """Class shape in local coords (a right, b up, unit = shape radius r pixels)."""
    box = np.maximum(np.abs(a), np.abs(b))
    if cls == 0:
        return a * a + b * b <= 1
    if cls == 1:
        return box <= 0.8
    if cls == 2:
        return (b >= -0.5) & (b <= 1 - np.sqrt(3) * np.abs(a))
    if cls == 3:
        rho = np.sqrt(a * a + b * b)
        return (rho <= 1) & (rho >= rng.uniform(0.45, 0.7))
    if cls in (4, 9):
        if cls == 9:  # the plus turned by 45 degrees; rotation jitter stays well below that
            a, b = (a - b) / np.sqrt(2), (a + b) / np.sqrt(2)
        w = rng.uniform(0.2, 0.32)
        return ((np.abs(a) <= w) & (np.abs(b) <= 1)) | ((np.abs(b) <= w) & (np.abs(a) <= 1))
    if cls == 5:
        return (box <= 0.85) & (box >= 0.85 - rng.uniform(0.22, 0.35))
    period, phase = rng.uniform(2.2, 4.0) / r, rng.uniform(0, 1)  # stripe period: 2.2-4 px
    if cls == 6:
        return (box <= 0.85) & ((b / period + phase) % 1 < 0.5)
    if cls == 7:
        return (box <= 0.85) & ((a / period + phase) % 1 < 0.5)
    return (box <= 0.85) & ((np.floor(a / period + phase) + np.floor(b / period + phase)) % 2 == 0)


def _coverage(mask: np.ndarray) -> np.ndarray:  # supersampled bool -> [S,S] coverage
    return mask.reshape(S, SS, S, SS).mean(axis=(1, 3), dtype=np.float32)


def _paint(img: np.ndarray, cov: np.ndarray, colour: np.ndarray) -> None:
    img *= 1 - cov
    img += cov * colour[:, None, None]


def _clutter(img: np.ndarray, n: int, rng, p: dict) -> None:
    for _ in range(n):
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        cx, cy = rng.uniform(0, S, 2)
        if rng.random() < 0.5:  # short thin line
            ang, length, half_w = rng.uniform(0, np.pi), rng.uniform(3, p["clen"]), rng.uniform(0.4, 0.8)
            dx, dy = GX - cx, GY - cy
            mask = (np.abs(dx * np.cos(ang) + dy * np.sin(ang)) <= length / 2) & \
                   (np.abs(dy * np.cos(ang) - dx * np.sin(ang)) <= half_w)
        else:  # small blob
            mask = (GX - cx) ** 2 + (GY - cy) ** 2 <= rng.uniform(0.8, p["cblob"]) ** 2
        _paint(img, _coverage(mask), colour)


def make_sample(cls: int, rng: np.random.Generator, p: dict = GEN) -> np.ndarray:
    """One [3,32,32] uint8 image of class ``cls``."""
    bg = rng.uniform(0, 1, 3).astype(np.float32)
    fg = rng.uniform(0, 1, 3).astype(np.float32)
    while np.linalg.norm(fg - bg) < p["cmin"]:  # guarantee some (possibly low) contrast
        fg = rng.uniform(0, 1, 3).astype(np.float32)
    # Flat background: even axis-aligned shading made the shipped npz files ~40% larger
    # (the 5 MB budget for models/), and clutter/contrast already make the task hard.
    img = np.repeat(np.repeat(bg[:, None, None], S, 1), S, 2)
    _clutter(img, rng.integers(0, p["nback"] + 1), rng, p)
    r = rng.uniform(p["rmin"], p["rmax"])
    cx, cy = rng.uniform(0.6 * r, S - 0.6 * r, 2)  # may stick out of the frame a little
    rot = np.deg2rad(rng.uniform(-p["rot"], p["rot"]))
    dx, dy = (GX - cx) / r, (cy - GY) / r
    a, b = dx * np.cos(rot) + dy * np.sin(rot), dy * np.cos(rot) - dx * np.sin(rot)
    _paint(img, _coverage(_shape_mask(cls, a, b, r, rng)), fg)
    _clutter(img, rng.integers(0, p["nfront"] + 1), rng, p)
    # Sparse speckle noise rather than dense Gaussian noise: dense noise is
    # incompressible and would blow the 5 MB budget for models/.
    spk = rng.random((S, S)) < rng.uniform(0, p["speckle"])
    img[:, spk] = rng.uniform(0, 1, (3, int(spk.sum()))).astype(np.float32)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n balanced-in-expectation samples: uint8 [n,3,32,32] and int64 labels [n]."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    return np.stack([make_sample(int(c), rng) for c in y]), y.astype(np.int64)


def to_float(x_u8: np.ndarray) -> np.ndarray:
    return x_u8.astype(np.float32) / 255.0


# -------------------------------------------------------------------------- models

RECIPES = {  # the zoo's models and how they are trained (tools/common.py has the benchmark registry)
    "zoo_resnet": dict(
        arch="ResNet([1, 1, 1], [16, 32, 64], 10, stem='cifar')",
        make=lambda: ResNet([1, 1, 1], [16, 32, 64], 10, stem="cifar"),
        train=dict(epochs=4, batch=128, lr=0.1, momentum=0.9, weight_decay=5e-4, seed=10)),
    "zoo_mobilenetv2": dict(
        arch="MobileNetV2([(1,16,1,2),(4,24,2,1),(4,32,3,2),(4,64,2,2),(4,96,1,1)], 10, "
             "stem_channels=16, last_channels=256, stem_stride=1)",
        make=lambda: MobileNetV2([(1, 16, 1, 2), (4, 24, 2, 1), (4, 32, 3, 2), (4, 64, 2, 2), (4, 96, 1, 1)], 10,
                                 stem_channels=16, last_channels=256, stem_stride=1),
        train=dict(epochs=4, batch=128, lr=0.1, momentum=0.9, weight_decay=4e-5, seed=20)),
}


def train(model: torch.nn.Module, x_u8: np.ndarray, y: np.ndarray, cfg: dict, log=print) -> None:
    """SGD + nesterov, 1-epoch linear warm-up then cosine decay, random horizontal
    flips (every class is mirror-symmetric in distribution)."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    x_all, y_all = torch.from_numpy(x_u8), torch.from_numpy(y)
    steps_per_epoch = len(x_all) // cfg["batch"]
    total, warm = cfg["epochs"] * steps_per_epoch, steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True,
                          weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + np.cos(np.pi * (s - warm) / (total - warm))))
    model.train()
    for epoch in range(cfg["epochs"]):
        perm, t0, run_loss, run_acc = torch.randperm(len(x_all), generator=gen), time.time(), 0.0, 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * cfg["batch"]:(i + 1) * cfg["batch"]]
            xb, yb = x_all[idx].float() / 255.0, y_all[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb[flip] = xb[flip].flip(-1)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.item()
            run_acc += (out.argmax(1) == yb).float().mean().item()
        log(f"  epoch {epoch + 1}/{cfg['epochs']}: loss {run_loss / steps_per_epoch:.3f} "
            f"train acc {100 * run_acc / steps_per_epoch:.1f}% ({time.time() - t0:.0f}s)")
    model.eval()


def ort_top1(onnx_path: Path, x: np.ndarray, y: np.ndarray, input_name: str = "input", batch: int = 500) -> float:
    """Top-1 accuracy in percent, measured with onnxruntime on the ONNX file."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    pred = np.concatenate([sess.run(None, {input_name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])
    return round(100.0 * float((pred == y).mean()), 2)


# ---------------------------------------------------------------------------- files


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed, then rewritten with fixed zip timestamps so rebuilding
    gives byte-identical files (numpy stamps entries with the current time)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), src.read(name),
                         compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def write_readme(out: Path, zoo: dict) -> None:
    rows = "\n".join(f"| `{m['name']}` | {m['arch_family']} | {m['num_params']:,} | {m['fp32_top1']:.2f} |"
                     for m in zoo["models"])
    (out / "README.md").write_text(f"""# Sample model zoo

Small CNNs for testing `onnxqlimit` end to end, trained on **shapes10**, a
procedurally generated 10-class image task (no downloads): 3x32x32 RGB images in
[0, 1] (multiples of 1/255), each showing one shape or pattern with random
position, size, rotation, colours and contrast, clutter (lines and blobs, some
occluding the shape) and speckle noise. Tiny, low-contrast or occluded shapes are
ambiguous, so FP32 accuracy is well below 100% and low-bit quantization visibly
costs accuracy. Classes: {", ".join(CLASSES)}.

Per model `<name>`: `<name>.onnx` (opset {OPSET}, input `input` [batch,3,32,32],
output `logits` [batch,10], BatchNormalization nodes not folded),
`<name>_calib.npz` ({N_CALIB} unlabelled samples, key `input`) and `<name>_val.npz`
({N_VAL} labelled samples, keys `input`, `label`); both models' files hold the
same samples.
Details and training settings: `zoo.json`.

| model | family | params | FP32 top-1 (%, onnxruntime) |
|---|---|---:|---:|
{rows}

Rebuild (deterministic; about 10 minutes on 2 CPU cores):

    {zoo["command"]}
""")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models", help="output directory (default: models/)")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)

    t0 = time.time()
    print(f"generating data: {N_TRAIN} train, {N_VAL} val, {N_CALIB} calib ...", flush=True)
    x_tr, y_tr = make_set(N_TRAIN, SEED_TRAIN)
    x_val_u8, y_val = make_set(N_VAL, SEED_VAL)
    x_val, x_cal = to_float(x_val_u8), to_float(make_set(N_CALIB, SEED_CALIB)[0])
    print(f"  done in {time.time() - t0:.0f}s", flush=True)

    zoo = {"task": {"name": "shapes10", "classes": CLASSES, "input_range": [0.0, 1.0], "generator": GEN,
                    "seeds": {"train": SEED_TRAIN, "val": SEED_VAL, "calib": SEED_CALIB},
                    "num_train": N_TRAIN,
                    "shared_data": "each model has its own calib/val files, with identical contents"},
           "command": "python -m tools.build_zoo", "models": []}
    for name, spec in RECIPES.items():
        torch.manual_seed(spec["train"]["seed"])
        model = spec["make"]()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"training {name} ({n_params:,} params) ...", flush=True)
        t1 = time.time()
        train(model, x_tr, y_tr, spec["train"], log=lambda s: print(s, flush=True))
        train_s = time.time() - t1
        onnx_path = export_onnx(model, (torch.from_numpy(x_val[:1]),), out / f"{name}.onnx", OPSET, ["input"],
                                ["logits"], {"input": {0: "batch"}, "logits": {0: "batch"}})
        save_npz(out / f"{name}_calib.npz", input=x_cal)
        save_npz(out / f"{name}_val.npz", input=x_val, label=y_val)
        acc = ort_top1(onnx_path, x_val, y_val)
        print(f"  {name}: FP32 top-1 {acc:.2f}% (onnxruntime), trained in {train_s:.0f}s", flush=True)
        zoo["models"].append({
            "name": name, "onnx": onnx_path.name, "calib": f"{name}_calib.npz", "val": f"{name}_val.npz",
            "input_name": "input", "output_name": "logits", "input_shape": ["batch", 3, 32, 32],
            "num_classes": len(CLASSES), "opset": OPSET, "num_params": n_params,
            "arch_family": type(model).__name__, "arch": spec["arch"],
            "num_val": N_VAL, "num_calib": N_CALIB, "fp32_top1": acc, "fp32_top1_unit": "percent",
            "training": {**spec["train"], "optimizer": "SGD nesterov, warm-up 1 epoch + cosine",
                         "augmentation": "random horizontal flip", "threads": THREADS},
        })
    # No timings in zoo.json: a rebuild then gives byte-identical files.
    (out / "zoo.json").write_text(json.dumps(zoo, indent=2) + "\n")
    write_readme(out, zoo)
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB) in {time.time() - t0:.0f}s")
    for m in zoo["models"]:
        print(f"  {m['name']:18s} {m['fp32_top1']:6.2f}%")


if __name__ == "__main__":
    main()
