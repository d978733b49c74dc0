"""A YOLOv8-style detector trained here on generated shapes, so that F1 and mAP mean
something (issue 11): train, export, quantize at several widths, score against the float
model and the ground truth, with onnxruntime's quantize_static beside.

    python -m tools.detector --bits W8A8 W4A8 W4A4 --ort            # train (cached), then the table
    python -m tools.detector --bits W4A4 --first-last-bits same      # the head policy's other side
    python -m tools.detector --bits W4A4 --mixed-at W4A4             # + a mixed plan at uniform W4A4's BitOps

Data: 4 classes (disc, box, triangle, cross) in random colours, sizes 10-72 px, 1-6 per
image, on shaded, noisy backgrounds with distractor strokes; every draw is seeded, and
training, calibration and evaluation use different seeds. The model is tools/archs.YoloV8
at YOLOv8n's scaling with 4 classes, trained from scratch for --epochs on --train images,
exported with torch.onnx.export (opset 13): C2f split/concat, SPPF max-pools, upsample +
concat neck, anchor-free head with DFL softmax and box decoding in the graph, output
[B, 4+4, A] like an Ultralytics export.

Training loss (a compact stand-in for Ultralytics' task-aligned assigner): a cell is
positive for a box when its centre lies inside the box and within 2.5 strides of the box
centre, at a level where the box's sides fit the DFL range (the smallest box wins a
contested cell); BCE on the class logits, GIoU and DFL on the positive cells.

Metrics: detections after a 0.25 score threshold and class-wise NMS at IoU 0.5. F1 vs
float: the quantized model's detections matched (same class, IoU >= 0.5) to the float
model's; mAP@0.5 vs ground truth for every model. The issue's targets are F1 vs float
>= 0.95 at W8A8, >= 0.90 at W4A8 and >= 0.85 at W4A4. Rows print as JSON as they finish
(--jsonl keeps them), then the table (--json PATH keeps it as a docs/results record).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from onnxqlimit import MixedConfig, QuantConfig, ReconConfig, RunOptions, Targets, quantize
from onnxqlimit.cli import parse_bit_overrides
from tools import archs
from tools.common import Table, bits_option, widths
from tools.tasks import run_model

SIZE, CLASSES = 160, ("disc", "box", "triangle", "cross")
SEEDS = {"train": 0, "calib": 1000, "eval": 2000}
CACHE = Path.home() / ".cache" / "onnxqlimit" / "detector"


# ------------------------------------------------------------------------------ data

def _shape(draw: ImageDraw.ImageDraw, cls: int, box, fill, rng) -> None:
    x0, y0, x1, y1 = box
    if cls == 0:
        draw.ellipse(box, fill=fill)
    elif cls == 1:
        draw.rectangle(box, fill=fill)
    elif cls == 2:
        apex = x0 + (x1 - x0) * rng.uniform(0.2, 0.8)
        draw.polygon([(apex, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        t = max(2.0, min(x1 - x0, y1 - y0) * rng.uniform(0.22, 0.35))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.rectangle((x0, cy - t / 2, x1, cy + t / 2), fill=fill)
        draw.rectangle((cx - t / 2, y0, cx + t / 2, y1), fill=fill)


def shapes_dataset(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, list[np.ndarray]]:
    """(images float32 [n,3,size,size] in [0,1], per image [k,5] rows of class, x0,y0,x1,y1)."""
    rng = np.random.default_rng([seed, 11])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images, targets = np.empty((n, 3, size, size), np.float32), []
    for i in range(n):
        bg = rng.uniform(40, 215, 3) + xx[..., None] * rng.uniform(-40, 40, 3) + yy[..., None] * rng.uniform(-40, 40, 3)
        img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(0, 4))):  # distractors: thin strokes of no class
            pts = rng.uniform(0, size, 4)
            draw.line(tuple(pts), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
        rows = []
        for _ in range(int(rng.integers(1, 7))):
            w, h = rng.uniform(10, 72) * np.exp(rng.uniform(-0.3, 0.3, 2))
            w, h = min(w, size - 2), min(h, size - 2)
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            box = np.array([x0, y0, x0 + w, y0 + h], np.float32)
            if rows and max(_iou(box, np.array(r[1:])) for r in rows) > 0.3:
                continue  # heavy overlap would hide one shape under another
            cls = int(rng.integers(0, len(CLASSES)))
            # ink differs from the local background by at least ~60 per channel on average
            local = np.asarray(img)[int(y0):int(y0 + h) + 1, int(x0):int(x0 + w) + 1].reshape(-1, 3).mean(0)
            ink = rng.integers(0, 256, 3)
            while np.abs(ink - local).mean() < 60:
                ink = rng.integers(0, 256, 3)
            _shape(draw, cls, tuple(float(v) for v in box), tuple(int(v) for v in ink), rng)
            rows.append([cls, *box])
        a = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(0, 8), (size, size, 1))
        images[i] = np.clip(a, 0, 255).transpose(2, 0, 1) / 255
        targets.append(np.array(rows, np.float32).reshape(-1, 5))
    return images, targets


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter + 1e-9)


# -------------------------------------------------------------------------- training

def _anchors(model: archs.YoloV8, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    sizes = [(size // s, size // s) for s in model.detect.strides]
    points, strides = model.detect._grid(sizes, model.detect.strides)
    return points.T * strides.T, strides[0]  # centres in pixels [A, 2], strides [A]


def _assign(targets: np.ndarray, centres: torch.Tensor, strides: torch.Tensor, reg_max: int):
    """Per cell: index of its box (or -1). See the module docstring for the rule."""
    owner = torch.full((len(centres),), -1, dtype=torch.long)
    best_area = torch.full((len(centres),), float("inf"))
    for j, (_, x0, y0, x1, y1) in enumerate(targets.tolist()):
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        px, py = centres[:, 0], centres[:, 1]
        ltrb = torch.stack((px - x0, py - y0, x1 - px, y1 - py), 1)
        ok = (ltrb.min(1).values > 0) & ((px - cx).abs() < 2.5 * strides) & ((py - cy).abs() < 2.5 * strides)
        ok &= ltrb.max(1).values / strides < reg_max - 1
        if not ok.any():  # a box too large for every level's range: its nearest cells at the coarsest level
            d = (px - cx) ** 2 + (py - cy) ** 2 + (strides != strides.max()) * 1e9
            ok = torch.zeros_like(ok)
            ok[d.argmin()] = True
        area = (x1 - x0) * (y1 - y0)
        take = ok & (area < best_area)
        owner[take], best_area[take] = j, area
    return owner


def detection_loss(raw: torch.Tensor, targets: list[np.ndarray], centres, strides, reg_max: int, nc: int):
    bins, logits = raw.split((4 * reg_max, nc), 1)  # [B,4R,A], [B,nc,A]
    bins = bins.reshape(len(raw), 4, reg_max, -1).permute(0, 3, 1, 2)  # [B,A,4,R]
    cls_target = torch.zeros_like(logits)
    box_loss = dfl_loss = raw.new_zeros(())
    positives = 0
    for b, t in enumerate(targets):
        owner = _assign(t, centres, strides, reg_max)
        pos = owner >= 0
        if not pos.any():
            continue
        rows = torch.from_numpy(t)[owner[pos]]
        cls_target[b, rows[:, 0].long(), pos.nonzero()[:, 0]] = 1.0
        c, s = centres[pos], strides[pos, None]
        goal = torch.cat((c - rows[:, 1:3], rows[:, 3:5] - c), 1) / s  # ltrb in strides
        goal = goal.clamp(0, reg_max - 1.01)
        logp = bins[b, pos].log_softmax(-1)  # [P,4,R]
        dist = (logp.exp() * torch.arange(reg_max, dtype=raw.dtype)).sum(-1)
        lo = goal.floor().long()
        w_hi = goal - lo
        dfl_loss = dfl_loss - ((1 - w_hi) * logp.gather(-1, lo[..., None])[..., 0]
                               + w_hi * logp.gather(-1, (lo + 1)[..., None])[..., 0]).mean(1).sum()
        pred = torch.cat((c - dist[:, :2] * s, c + dist[:, 2:] * s), 1)
        box_loss = box_loss + (1 - _giou(pred, rows[:, 1:])).sum()
        positives += int(pos.sum())
    n = max(positives, 1)
    cls_loss = F.binary_cross_entropy_with_logits(logits, cls_target, reduction="sum") / n
    return 7.5 * box_loss / n + 0.5 * cls_loss + 1.5 * dfl_loss / n


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(1)  # noqa: E731
    union = area(a) + area(b) - inter + 1e-9
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).prod(1) + 1e-9
    return inter / union - (hull - union) / hull


def train(n_train: int, epochs: int, batch: int = 32, seed: int = 0, log_every: int = 50) -> archs.YoloV8:
    torch.manual_seed(seed)
    model = archs.YoloV8(num_classes=len(CLASSES))
    images, targets = shapes_dataset(n_train, SEEDS["train"] + seed)
    centres, strides = _anchors(model, SIZE)
    steps = epochs * (n_train // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    model.train()
    rng, step, start = np.random.default_rng(seed), 0, time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(n_train)
        for k in range(n_train // batch):
            idx = order[k * batch:(k + 1) * batch]
            x = torch.from_numpy(images[idx])
            t = [targets[i] for i in idx]
            if rng.random() < 0.5:  # horizontal flip, boxes with it
                x = x.flip(3)
                t = [np.stack((r[:, 0], SIZE - r[:, 3], r[:, 2], SIZE - r[:, 1], r[:, 4]), 1) for r in t]
            raw, _ = model.detect.raw(model.features(x))
            loss = detection_loss(raw, t, centres, strides, model.detect.reg_max, len(CLASSES))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            step += 1
            if step % log_every == 0 or step == steps:
                print(f"  step {step}/{steps} epoch {epoch + 1} loss {loss.item():.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


def trained_model(n_train: int, epochs: int, out: Path) -> Path:
    """The exported float detector, trained once per (n_train, epochs) and cached."""
    path = CACHE / f"shapes_yolo_{n_train}x{epochs}.onnx"
    if not path.exists():
        model = train(n_train, epochs)
        tmp = out / path.name
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the grid is constant on purpose
            archs.export_onnx(model, (torch.zeros(1, 3, SIZE, SIZE),), tmp, 13, ["images"], ["output0"],
                              {"images": {0: "batch"}, "output0": {0: "batch"}})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(path)
    return path


# --------------------------------------------------------------------------- metrics

def detections(path, images: np.ndarray, conf: float = 0.25, iou: float = 0.5, batch: int = 32) -> list[np.ndarray]:
    """Per image [k,6] rows of class, score, x0,y0,x1,y1 after class-wise NMS."""
    out = run_model(path, images, batch)
    result = []
    for pred in out:  # [4+nc, A]
        xywh, scores = pred[:4].T, pred[4:].T
        cls, score = scores.argmax(1), scores.max(1)
        keep = score >= conf
        boxes = np.concatenate((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)[keep]
        cls, score = cls[keep], score[keep]
        rows = []
        for c in np.unique(cls):
            m = cls == c
            b, s = boxes[m], score[m]
            order = list(np.argsort(-s))
            while order:
                i = order.pop(0)
                rows.append([c, s[i], *b[i]])
                order = [j for j in order if _iou(b[i], b[j]) < iou]
        result.append(np.array(rows, np.float32).reshape(-1, 6))
    return result


def _matches(pred: np.ndarray, ref: np.ndarray, thresh: float = 0.5) -> int:
    """Greedy one-to-one matches (same class, IoU >= thresh), highest score first."""
    used, hits = set(), 0
    for p in pred[np.argsort(-pred[:, 1])]:
        best, arg = thresh, -1
        for j, r in enumerate(ref):
            if j not in used and r[0] == p[0]:
                v = _iou(p[2:], r[-4:])
                if v >= best:
                    best, arg = v, j
        if arg >= 0:
            used.add(arg)
            hits += 1
    return hits


def f1(pred: list[np.ndarray], ref: list[np.ndarray]) -> float:
    hits = sum(_matches(p, r) for p, r in zip(pred, ref))
    n_pred, n_ref = sum(map(len, pred)), sum(map(len, ref))
    return 2 * hits / max(n_pred + n_ref, 1)


def map50(pred: list[np.ndarray], gt: list[np.ndarray]) -> float:
    """COCO-style 101-point AP at IoU 0.5, averaged over classes."""
    aps = []
    for c in range(len(CLASSES)):
        n_gt = sum(int((g[:, 0] == c).sum()) for g in gt)
        scored = []
        for p, g in zip(pred, gt):
            pc, gc = p[p[:, 0] == c], g[g[:, 0] == c]
            used = set()
            for row in pc[np.argsort(-pc[:, 1])]:
                ious = [(_iou(row[2:], r[1:]), j) for j, r in enumerate(gc) if j not in used]
                v, j = max(ious, default=(0.0, -1))
                hit = v >= 0.5
                if hit:
                    used.add(j)
                scored.append((row[1], hit))
        if not n_gt:
            continue
        scored.sort(key=lambda t: -t[0])
        tp = np.cumsum([h for _, h in scored]) if scored else np.zeros(0)
        recall = tp / n_gt
        precision = tp / np.arange(1, len(tp) + 1)
        precision = np.maximum.accumulate(precision[::-1])[::-1] if len(tp) else precision
        aps.append(np.mean([precision[recall >= r].max() if (recall >= r).any() else 0.0
                            for r in np.linspace(0, 1, 101)]))
    return float(np.mean(aps))


# ------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", nargs="+", default=["W8A8", "W4A8", "W4A4"], type=bits_option, metavar="WxAy")
    ap.add_argument("--train", type=int, default=4096, help="training images (default 4096)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--iters", type=int, default=None, help="reconstruction iterations per block (default: preset)")
    ap.add_argument("--method", default="qdrop")
    ap.add_argument("--first-last-bits", default="8")
    ap.add_argument("--bits-override", default="", metavar="NAME_OR_REGEX=W/A,...",
                    help="per-node widths, as the CLI's --bits (e.g. the box branch's last convs at 8 bits)")
    ap.add_argument("--mixed-at", nargs="*", default=[], type=bits_option, metavar="WxAy",
                    help="also a mixed-precision plan (weights 2/3/4/8, activations 4/8) at that uniform width's BitOps")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ort", action="store_true", help="also onnxruntime quantize_static (4 or 8 bits)")
    ap.add_argument("--keep", help="folder for the exported and quantized files")
    ap.add_argument("--jsonl", help="append one JSON record per row")
    ap.add_argument("--json", help="write the table as a docs/results record here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flb = None if args.first_last_bits == "same" else int(args.first_last_bits)

    with tempfile.TemporaryDirectory(prefix="detector.") as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        src = trained_model(args.train, args.epochs, out)
        print(f"float model: {src} ({time.perf_counter() - start:.0f} s)", flush=True)
        calib = {"images": shapes_dataset(args.calib, SEEDS["calib"])[0]}
        images, gt = shapes_dataset(args.eval, SEEDS["eval"])
        ref = detections(src, images)
        rows = [{"bits": "float", "method": "-", "f1": 1.0, "map50": map50(detections(src, images, conf=0.001), gt),
                 "size_bytes": src.stat().st_size, "seconds": 0.0}]
        print(f"float: mAP@0.5 {rows[0]['map50']:.3f}, {sum(map(len, ref))} detections on {args.eval} images", flush=True)

        def config(wbits: int, abits: int) -> QuantConfig:
            return QuantConfig.of(wbits=wbits, abits=abits, first_last_bits=flb,
                                  overrides=parse_bit_overrides(args.bits_override))

        def options(method: str, **kw) -> RunOptions:
            return RunOptions(recon=ReconConfig.preset("fast", method=method, iters=args.iters, calib_size=args.calib),
                              progress=False, threads=args.threads, **kw)

        cells = [(bits, m) for bits in args.bits for m in [args.method] + (["onnxruntime"] if args.ort else [])]
        cells += [(bits, "mixed") for bits in args.mixed_at]
        for bits, method in cells:
            wbits, abits = widths(bits)
            path = out / f"{bits}_{method}.onnx"
            start = time.perf_counter()
            try:
                if method == "onnxruntime":
                    from tools.ort_baseline import quantize_with_ort
                    quantize_with_ort(src, calib, path, wbits, abits)
                elif method == "mixed":  # the budget: the uniform plan's BitOps, from a round-to-nearest file
                    budget = quantize(src, out / f"{bits}_rtn.onnx", calib, config(wbits, abits),
                                      options("rtn", overwrite=True)).report.costs["bitops"]
                    start = time.perf_counter()
                    quantize(src, path, calib, config(8, 8),
                             options(args.method, mixed=MixedConfig(Targets(bitops=budget)),
                                     work_dir=str(out / "mixed")))
                else:
                    quantize(src, path, calib, config(wbits, abits), options(method))
                secs = time.perf_counter() - start
                row = {"bits": bits, "method": method, "f1": f1(detections(path, images), ref),
                       "map50": map50(detections(path, images, conf=0.001), gt),
                       "size_bytes": path.stat().st_size, "seconds": secs}
            except Exception as err:  # noqa: BLE001 - a failed cell is a result
                row = {"bits": bits, "method": method, "error": f"{type(err).__name__}: {err}"[:160]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print()
    table = Table(["bits", "method", "F1 vs float", "mAP@0.5", "size vs float", "time"], args.json,
                  "A detector trained on generated shapes",
                  f"YOLOv8n-style, {len(CLASSES)} classes, trained on {args.train} images for {args.epochs} epochs; "
                  f"{args.calib} calibration images, {args.eval} evaluation images; first/last layers "
                  f"{args.first_last_bits}" + (f", {args.iters} iterations per block" if args.iters else "")
                  + (f", --bits-override {args.bits_override}" if args.bits_override else "") + ".")
    table.header()
    for r in rows:
        if "error" in r:
            table.add(r["bits"], r["method"], f"n/a: {r['error'][:60]}", "", "", "")
        else:
            table.add(r["bits"], r["method"], f"{r['f1']:.3f}", f"{r['map50']:.3f}",
                      f"{r['size_bytes'] / rows[0]['size_bytes']:.2f}x", f"{r['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
