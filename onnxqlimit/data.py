"""Input data: .npz files keyed by input name, random inputs, and batching."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx

from .errors import QLimitError
from .mixed.config import EvalData

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    """Static dims as ints, symbolic ones by name ('?' when unnamed)."""
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


LABEL_KEYS = ("label", "labels")  # arrays a data file may hold beside the model inputs


def load_npz(path: str | os.PathLike, input_names: list[str], extra_ok: tuple[str, ...] = LABEL_KEYS) -> dict[str, np.ndarray]:
    """Arrays for every model input from a .npz keyed by input name. Any other key is
    refused (a misspelt input name would otherwise go unnoticed), except `extra_ok`."""
    path = Path(path)
    if not path.is_file():
        raise QLimitError(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:
        raise QLimitError(f"{path}: not a readable .npz file ({err})") from None
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise QLimitError(f"{path}: no array for model input(s) {', '.join(missing)} (file has: {', '.join(arrays) or 'nothing'})")
    extra = [k for k in arrays if k not in input_names and k not in extra_ok]
    if extra:
        raise QLimitError(f"{path}: array(s) {', '.join(extra)} match no model input (inputs: {', '.join(input_names)}; "
                          f"{'/'.join(extra_ok)} may sit beside them)")
    feeds = {n: arrays[n] for n in input_names}
    counts = {len(a) for a in feeds.values() if a.ndim}  # (a 0-d array: a scalar input's value for every sample)
    if not counts or counts == {0}:
        raise QLimitError(f"{path}: holds no samples (the first axis of every array counts samples)")
    if len(counts) != 1:
        raise QLimitError(f"{path}: inputs must share one leading sample dimension (got {sorted(counts)})")
    return feeds


def _first(array: np.ndarray, limit: int) -> np.ndarray:
    return array[:limit] if array.ndim else array


def model_feeds(batch: Mapping, declared: Mapping[str, list]) -> dict:
    """A batch as the model takes it, from the arrays onnxqlimit holds (samples first; see
    conform); `declared`: input name -> the model's shape (ints, names or None per dim).

    - A scalar input's per-sample values, which one batch must share, become the 0-d value.
    - An input given with samples stacked on a new first axis (a state [2, batch, 128] as
      N x 2 x 1 x 128) is joined along its batch axis, the first axis the model leaves free."""
    out = dict(batch)
    for name, shape in declared.items():
        value = out.get(name)
        if value is None or shape is None or value.ndim != len(shape) + 1:
            continue
        if not shape:  # a scalar
            if len(value) and bool((value != value[0]).any()):
                raise QLimitError(f"input '{name}' is a scalar, so the samples of a batch must share its value "
                                  f"(got {len(set(value.tolist()))} values; calibrate one value at a time)")
            out[name] = value[:1].reshape(())  # (an array, not a numpy scalar: onnxruntime takes arrays)
            continue
        axis = batch_axis(shape)
        if axis == 0:
            continue  # (conform refuses an extra axis on an input batched along its first)
        if axis is None:  # every dim fixed: one sample at a time
            if len(value) != 1:
                raise QLimitError(f"input '{name}' fixes every dimension {_dims(shape)}: its samples run one at "
                                  "a time (batch size 1)")
            out[name] = value[0]
            continue
        moved = value.movedim(0, axis) if hasattr(value, "movedim") else np.moveaxis(value, 0, axis)
        sizes = list(moved.shape)
        out[name] = moved.reshape(sizes[:axis] + [sizes[axis] * sizes[axis + 1]] + sizes[axis + 2:])
    return out


def batch_axis(shape: list) -> int | None:
    """The axis a batch runs along: the first dimension the model leaves free; where it fixes
    them all, the first of size 1 (a state [2, 1, 128] of a model exported at batch 1: the
    mirror runs any batch there, onnxruntime one sample at a time); else None."""
    free = next((i for i, d in enumerate(shape) if not isinstance(d, int) or d <= 0), None)
    return free if free is not None else next((i for i, d in enumerate(shape) if d == 1), None)


def declared_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Input name -> the model's declared shape (None where it declares none)."""
    return {v.name: input_shape(v) if v.type.tensor_type.HasField("shape") else None for v in graph_inputs(model)}


def random_feeds(model: onnx.ModelProto, shapes: Mapping[str, list[int]] | None = None,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a smoke check: uniform [0, 1) floats, ones for ints (valid token ids and masks).

    Symbolic dims become 1 unless `shapes` names the input's full shape.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph_inputs(model):
        elem = value.type.tensor_type.elem_type
        if elem not in _NP_TYPES:
            raise QLimitError(f"input '{value.name}': element type {onnx.TensorProto.DataType.Name(elem)} not supported")
        shape = (shapes or {}).get(value.name) or [d if isinstance(d, int) and d > 0 else 1 for d in input_shape(value)]
        dtype = _NP_TYPES[elem]
        feeds[value.name] = rng.random(shape).astype(dtype) if np.dtype(dtype).kind == "f" else np.ones(shape, dtype)
    return feeds


def batches(feeds: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Split arrays with a shared leading sample dimension into batches."""
    total = len(next(iter(feeds.values())))
    for start in range(0, total, batch_size):
        yield {k: v[start:start + batch_size] for k, v in feeds.items()}


def fixed_batch_size(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs pin (e.g. 1), or None when the batch dim is free."""
    sizes = {input_shape(v)[0] for v in graph_inputs(model) if input_shape(v)}
    static = {s for s in sizes if isinstance(s, int) and s > 0}
    return min(static) if static else None


# ------------------------------------------------------------------ calibration sources

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def from_reader(reader, input_names: list[str], limit: int) -> dict[str, np.ndarray]:
    """Drain an onnxruntime.quantization.CalibrationDataReader (anything with get_next())."""
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in input_names}
    count = 0
    while count < limit:
        item = reader.get_next()
        if item is None:
            break
        missing = [n for n in input_names if n not in item]
        if missing:
            raise QLimitError(f"calibration reader gave no array for input(s) {', '.join(missing)}")
        for name in input_names:
            chunks[name].append(np.asarray(item[name]))
        count += len(chunks[input_names[0]][-1])
    if count == 0:
        raise QLimitError("calibration reader gave no data")
    return {n: np.concatenate(v)[:limit] for n, v in chunks.items()}


def parse_preprocess(spec: str) -> dict:
    """'size=H,W;mean=a,b,c;std=a,b,c;scale=255;layout=NCHW;color=RGB' -> options."""
    options = {"size": None, "mean": [0.0], "std": [1.0], "scale": 255.0, "layout": "NCHW", "color": "RGB"}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in options:
            raise QLimitError(f"--preprocess: unknown or malformed item {part!r} (keys: {', '.join(options)})")
        try:
            if key == "size":
                options[key] = [int(v) for v in value.split(",")]
                if len(options[key]) != 2:
                    raise ValueError
            elif key in ("mean", "std"):
                options[key] = [float(v) for v in value.split(",")]
            elif key == "scale":
                options[key] = float(value)
            else:
                options[key] = value.strip().upper()
        except ValueError:
            raise QLimitError(f"--preprocess: bad value in {part!r}") from None
    if options["layout"] not in ("NCHW", "NHWC") or options["color"] not in ("RGB", "BGR", "GRAY"):
        raise QLimitError("--preprocess: layout must be NCHW|NHWC and color RGB|BGR|GRAY")
    return options


def from_image_folder(folder: Path, preprocess: str | None, input_names: list[str], limit: int) -> dict[str, np.ndarray]:
    if len(input_names) != 1:
        raise QLimitError("an image folder can only feed a model with a single input")
    if not preprocess:
        raise QLimitError("an image folder needs --preprocess 'size=H,W;mean=...;std=...'")
    options = parse_preprocess(preprocess)
    if options["size"] is None:
        raise QLimitError("--preprocess needs size=H,W")
    try:
        from PIL import Image
    except ImportError:
        raise QLimitError("reading image folders needs Pillow: pip install pillow") from None
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)[:limit]
    if not files:
        raise QLimitError(f"{folder}: no images found ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    h, w = options["size"]
    mode = "L" if options["color"] == "GRAY" else "RGB"
    arrays = []
    for path in files:
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert(mode).resize((w, h), Image.BILINEAR), np.float32)
        except OSError as err:
            raise QLimitError(f"{path}: cannot read image ({err})") from None
        arr = arr[..., None] if arr.ndim == 2 else arr
        if options["color"] == "BGR":
            arr = arr[..., ::-1]
        arr = (arr / options["scale"] - np.array(options["mean"], np.float32)) / np.array(options["std"], np.float32)
        arrays.append(arr.transpose(2, 0, 1) if options["layout"] == "NCHW" else arr)
    return {input_names[0]: np.stack(arrays).astype(np.float32)}


def calibration_feeds(source, input_names: list[str], limit: int, preprocess: str | None = None) -> dict[str, np.ndarray]:
    """Calibration samples from a .npz path, an image folder, a dict of arrays or a
    CalibrationDataReader; at most `limit` samples."""
    return _finite(_calibration_feeds(source, input_names, limit, preprocess))


def _calibration_feeds(source, input_names: list[str], limit: int, preprocess: str | None) -> dict[str, np.ndarray]:
    if hasattr(source, "get_next"):
        return from_reader(source, input_names, limit)
    if isinstance(source, Mapping):
        missing = [n for n in input_names if n not in source]
        if missing:
            raise QLimitError(f"calibration data has no array for input(s) {', '.join(missing)}")
        return {n: _first(np.asarray(source[n]), limit) for n in input_names}
    path = Path(source)
    if path.is_dir():
        return from_image_folder(path, preprocess, input_names, limit)
    return {k: _first(v, limit) for k, v in load_npz(path, input_names).items()}


def conform(feeds: dict[str, np.ndarray], model: onnx.ModelProto, what: str = "calibration") -> dict[str, np.ndarray]:
    """The arrays checked against the model's inputs before anything runs: rank, element
    kind and every fixed dimension past the sample axis. Same-kind dtypes are cast
    (float64 -> float32, int32 -> int64); a float input fed integers (raw uint8 images) or
    the reverse is refused, since a silent cast would calibrate on the wrong scale.

    A scalar input (rank 0, e.g. a sample rate) takes one 0-d value for every sample or one
    value per sample (N,). An input batched along a later axis (a state [2, batch, 128])
    takes its samples stacked on a new first axis (N x 2 x 1 x 128). Both are held with
    samples first from here on; model_feeds gives the model what it declares."""
    out = {}
    scalars = set()
    for value in graph_inputs(model):
        name, array = value.name, np.asarray(feeds[value.name])
        shape = input_shape(value) if value.type.tensor_type.HasField("shape") else None
        where = f"{what} input '{name}'"
        if shape == []:
            scalars.add(name)
        if name in scalars and array.ndim > 1:
            raise QLimitError(f"{where}: the model takes a scalar; give one 0-d value for every sample or one value "
                              f"per sample, shape (N,) (got {tuple(array.shape)})")
        # Samples stacked on a new first axis: for inputs batched along a later axis (see model_feeds)
        stacked = bool(shape) and array.ndim == len(shape) + 1 and batch_axis(shape) != 0
        if shape is not None and array.ndim != len(shape) and name not in scalars and not stacked:
            raise QLimitError(f"{where}: arrays of rank {array.ndim} {tuple(array.shape)}, the model takes rank "
                              f"{len(shape)} {_dims(shape)} (samples on the first axis)")
        fixed = list(enumerate(shape or [], start=1)) if stacked else list(enumerate(shape or []))[1:]
        wrong = [(i, d) for i, d in fixed if isinstance(d, int) and d > 0 and array.shape[i] != d]
        if wrong:
            i, d = wrong[0]
            hint = ""
            if array.ndim == 4 and sorted(array.shape[1:]) == sorted(x for x in shape[1:] if isinstance(x, int)):
                hint = " (the data looks channels-last; the model takes NCHW)"
            elif array.ndim == 4 and what == "calibration":  # only calibration takes image folders
                hint = " (for an image folder, set --preprocess size=H,W to the model's)"
            raise QLimitError(f"{where}: shape {tuple(array.shape)} contradicts the model's {_dims(shape)} "
                              f"at axis {i} ({array.shape[i]} where the model fixes {d}){hint}")
        want = _NP_TYPES.get(value.type.tensor_type.elem_type)
        if want is not None and array.dtype != want:
            same_kind = {array.dtype.kind, np.dtype(want).kind} <= {"i", "u"} or array.dtype.kind == np.dtype(want).kind
            if not same_kind:
                raise QLimitError(f"{where}: {array.dtype} data for a {np.dtype(want).name} input (convert it first; "
                                  "images need the model's own scaling, e.g. /255 and mean/std)")
            array = array.astype(want)
        out[name] = array
    samples = {len(a) for n, a in out.items() if a.ndim and n not in scalars} or {len(a) for a in out.values() if a.ndim}
    for name in scalars:
        if out[name].ndim == 0:
            out[name] = np.full(next(iter(samples), 1), out[name], out[name].dtype)
    return out


def _dims(shape: list) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _finite(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A NaN or Inf in the data would run to the end and fail at the parity check: name it now."""
    for name, array in feeds.items():
        if np.asarray(array).dtype.kind == "f" and not np.isfinite(array).all():
            bad = np.argwhere(~np.isfinite(array))[0]
            raise QLimitError(f"calibration input '{name}' holds NaN or Inf (first at sample {bad[0]}, "
                              f"index {tuple(int(i) for i in bad)})")
    return feeds


def load_eval_data(path: str, model: onnx.ModelProto) -> EvalData:
    """`--eval DATA.npz`: model inputs by name, and optionally `labels` (one per sample)."""
    feeds = conform(load_npz(path, [v.name for v in graph_inputs(model)]), model, f"{path}:")
    with np.load(path, allow_pickle=False) as data:
        labels = np.asarray(data["labels"]) if "labels" in data.files else None
    if labels is not None and len(labels) != len(next(iter(feeds.values()))):
        raise QLimitError(f"{path}: 'labels' must hold one label per sample")
    return EvalData(feeds, labels)
