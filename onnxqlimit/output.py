"""Writing the output model: checked before any work, staged beside the target, moved
into place only after onnxruntime has validated the file as written.

A failed run leaves any previous file at the output path untouched; the file gets the
permissions of an ordinary new file (0666 less the umask), not mkstemp's private 0600, so
a model server running as another user can read it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from . import weights
from .errors import QLimitError


def check_output(model, output: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that cannot be written, and writing over the
    input model unless asked to."""
    if output.is_dir():
        raise QLimitError(f"{output}: is a folder; -o takes the path of the model file to write")
    folder = output.parent
    while not folder.exists() and folder != folder.parent:  # the folders StagedOutput would create
        folder = folder.parent
    if not folder.is_dir():
        raise QLimitError(f"{output}: cannot write there ({folder} is not a folder)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise QLimitError(f"{output}: cannot write there (no write permission in {folder})")
    if isinstance(model, onnx.ModelProto) or overwrite:
        return
    source = Path(model)  # samefile: another spelling, a symlink or a hard link is the same file
    if output.exists() and source.exists() and output.samefile(source):
        raise QLimitError(f"{output}: the output is the input model; write elsewhere or pass --overwrite")


class StagedOutput:
    """`with StagedOutput(path) as staged: model = staged.write(model); <validate staged.path>; staged.commit()`.

    With external data (the input kept its weights in a data file, or the model is over
    protobuf's 2 GB) the weights go to `<name>.data` beside the model, streamed
    (weights.save), and the data file is moved into place before the model."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.model: onnx.ModelProto | None = None
        self.data_name: str | None = None
        self.folder: Path | None = None
        self._scratch: weights.DataFile | None = None

    def store(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """For export_qdq(store=...): move a tensor's data to a scratch file in the staging
        folder as soon as it is made; write() copies it into the model's data file."""
        if self._scratch is None:
            self._scratch = weights.DataFile(self.folder / ".scratch.data")
        return self._scratch.move_out(tensor, basepath=self.folder)

    def __enter__(self) -> "StagedOutput":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        return self

    def __exit__(self, *exc) -> None:
        if self._scratch is not None:
            self._scratch.file.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def write(self, model: onnx.ModelProto, external_data: bool = False) -> onnx.ModelProto:
        """Write `model` into the staging folder (`self.path`). With external data, returns
        the model read back without its data: a proto that refers to the data file (and
        moves along on commit), so the caller can let go of the one that held the weights
        (protobuf keeps a cleared field's memory until the message itself is freed)."""
        if self._scratch is not None:
            self._scratch.file.close()
            external_data = True
        self.data_name = f"{self.target.name}.data" if external_data or model.ByteSize() > weights.TWO_GB else None
        weights.save(model, self.path, self.data_name)
        if self._scratch is not None:
            self._scratch.path.unlink()
        if self.data_name is not None:
            model = onnx.load(str(self.path), load_external_data=False)
            weights.set_basepath(model, self.folder)
        self.model = model
        return model

    @property
    def path(self) -> Path:
        return self.folder / self.target.name

    def commit(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        if self.data_name is not None:
            os.chmod(self.folder / self.data_name, 0o666 & ~umask)
            os.replace(self.folder / self.data_name, self.target.parent / self.data_name)
            weights.set_basepath(self.model, self.target.parent)
        os.chmod(self.folder / self.target.name, 0o666 & ~umask)
        os.replace(self.folder / self.target.name, self.target)

