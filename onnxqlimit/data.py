"""Input data: .npz files keyed by input name, random inputs, and batching."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx

from .errors import QLimitError

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


def load_npz(path: str | os.PathLike, input_names: list[str]) -> dict[str, np.ndarray]:
    """Arrays for every model input from a .npz keyed by input name (extra keys ignored)."""
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
    feeds = {n: arrays[n] for n in input_names}
    counts = {len(a) if a.ndim else 0 for a in feeds.values()}
    if len(counts) != 1 or 0 in counts:
        raise QLimitError(f"{path}: inputs must share one leading sample dimension (got {sorted(counts)})")
    return feeds


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
