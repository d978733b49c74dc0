"""Initializer data, in the model proto or in external data files on disk.

A model whose weights exceed protobuf's 2 GB (or `IN_MEMORY_LIMIT`) is never read into
memory whole: its tensors stay references into its external data files, with an absolute
`basepath` (a key ONNX's ExternalDataInfo knows) so they can be read from anywhere, and
`array()` maps them (copy-on-write) instead of reading them. The mirror's weights are
those mappings, so the float weights cost page cache, which the kernel can drop, not
process memory. `save()` streams tensors into one data file beside the model and leaves
the proto pointing at it, so an exported model never exists twice in memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from .graph import all_initializers

TWO_GB = 2**31 - 1  # protobuf's limit on one serialised message
IN_MEMORY_LIMIT = TWO_GB  # models with external data above this stay on disk (tests lower it)
INLINE_BYTES = 1024  # smaller tensors stay in the proto when saving with external data
ALIGN = 1 << 16  # big tensors start on 64 KiB boundaries, so onnxruntime can map them
_CHUNK = 1 << 26  # bytes copied at a time from one data file to another


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in all_initializers(model.graph) if is_external(t)]


def on_disk(model: onnx.ModelProto) -> bool:
    """Whether some of the model's tensors are references into data files (see module doc)."""
    return any(is_external(t) for t in all_initializers(model.graph))


def _info(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    """An external tensor's file, offset and length (as recorded, else up to the file's end)."""
    info = external_data_helper.ExternalDataInfo(tensor)
    path = Path(info.basepath) / info.location if info.basepath else Path(info.location)
    offset = info.offset or 0
    return path, offset, info.length if info.length is not None else path.stat().st_size - offset


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes held in external data files."""
    return sum(_info(t)[2] for t in external_tensors(model))


def model_bytes(model: onnx.ModelProto) -> int:
    """Size of the model as stored: the proto plus its external data."""
    return model.ByteSize() + external_bytes(model)


def set_basepath(model: onnx.ModelProto, folder: Path) -> None:
    """Point every external tensor at `folder`, so it can be read without knowing the file."""
    for tensor in external_tensors(model):
        info = external_data_helper.ExternalDataInfo(tensor)
        _point(tensor, info.location, info.offset, info.length, str(folder.resolve()))


def _point(tensor: onnx.TensorProto, location: str, offset: int | None, length: int | None,
           basepath: str | None = None) -> None:
    """Make `tensor` a reference into `location` (onnx's set_external_data wants raw_data)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length), ("basepath", basepath)):
        if value is not None:
            tensor.external_data.add(key=key, value=str(value))
    tensor.data_location = onnx.TensorProto.EXTERNAL


def _raw(tensor: onnx.TensorProto) -> np.ndarray:
    """An external tensor's bytes, mapped copy-on-write (nothing is read until touched)."""
    path, offset, length = _info(tensor)
    if length == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="c", offset=offset, shape=(length,))


def array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values; an external tensor of a whole-byte type as a mapping of its file."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    raw = _raw(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    if tensor.data_type == onnx.TensorProto.STRING or raw.size != count * dtype.itemsize:
        copy = onnx.TensorProto()  # packed sub-byte types: numpy_helper unpacks a copy
        copy.CopyFrom(tensor)
        _inline(copy, raw.tobytes())
        return numpy_helper.to_array(copy)
    return raw.view(dtype).reshape(tuple(tensor.dims))


def load_data(model: onnx.ModelProto) -> None:
    """Read every external tensor into the proto (for models small enough to hold)."""
    for tensor in external_tensors(model):
        _inline(tensor, _raw(tensor).tobytes())


def _inline(tensor: onnx.TensorProto, data: bytes) -> None:
    """Make `tensor` hold `data` itself instead of a file reference."""
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = data


def _payload(tensor: onnx.TensorProto) -> np.ndarray | bytes | None:
    """The bytes `save` moves to the data file; None to keep the tensor in the proto."""
    if is_external(tensor):
        return _raw(tensor)
    if tensor.HasField("raw_data"):
        return tensor.raw_data if len(tensor.raw_data) >= INLINE_BYTES else None
    if tensor.data_type == onnx.TensorProto.STRING or tensor.ByteSize() < INLINE_BYTES:
        return None
    return numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data  # typed fields -> raw bytes


class DataFile:
    """An external data file being written: `move_out(tensor)` appends a tensor's bytes (a big
    one on an ALIGN boundary) and turns the tensor into a reference to them."""

    def __init__(self, path: Path):
        self.path, self.file = Path(path), open(path, "wb")

    def __enter__(self) -> "DataFile":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def move_out(self, tensor: onnx.TensorProto, basepath: Path | None = None) -> onnx.TensorProto:
        """Move `tensor`'s data here, unless it is under INLINE_BYTES; returns the tensor."""
        payload = _payload(tensor)
        if payload is None:
            return tensor
        size = len(payload)
        if size >= ALIGN:
            self.file.write(b"\0" * (-self.file.tell() % ALIGN))
        offset = self.file.tell()
        for start in range(0, size, _CHUNK):
            part = payload[start:start + _CHUNK]
            self.file.write(memoryview(part).cast("B") if isinstance(part, np.ndarray) else part)
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(field)
        _point(tensor, self.path.name, offset, size, str(basepath.resolve()) if basepath is not None else None)
        return tensor


def save(model: onnx.ModelProto, path: Path, data_name: str | None = None) -> None:
    """Write `model` to `path`; with `data_name`, tensors of INLINE_BYTES or more go to
    `<path's folder>/<data_name>`, streamed, and `model` is left referring to that file."""
    if data_name is None:
        onnx.save(model, str(path))
        return
    with DataFile(path.parent / data_name) as data:
        for tensor in all_initializers(model.graph):
            data.move_out(tensor)
    onnx.save(model, str(path))  # relative locations only: onnxruntime refuses other keys
    set_basepath(model, path.parent)


def identity(model: onnx.ModelProto) -> bytes:
    """Bytes that change when the model does: the proto, and for tensors on disk the size
    and modification time of their files (hashing many GB to key a checkpoint is too slow)."""
    parts = [model.SerializeToString(deterministic=True)]
    for path in sorted({_info(t)[0] for t in external_tensors(model)}):
        stat = path.stat()
        parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return b"\n".join(parts)
