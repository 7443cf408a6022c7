"""Reading and writing ONNX files: validation up front, atomic writes, external data.

Everything that can be wrong with an input file is found here and reported as one
:class:`UserError` line, so no pass ever sees a model the checker or onnxruntime rejects.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable, Dict, Optional, Tuple, Union

import onnx
from google.protobuf.message import DecodeError

from . import runtime
from .errors import UserError
from .ir import Model

PathLike = Union[str, os.PathLike]

# Protobuf cannot serialize a message over 2 GiB; stay well below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
_EXTERNAL_TENSOR_MIN_BYTES = 1024


def _uses_external_data(proto: onnx.ModelProto) -> bool:
    return any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer
    )


def read_proto(path: PathLike, *, what: str = "model") -> onnx.ModelProto:
    """Parse an ONNX file (and its external data) or raise a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} '{path}' does not exist")
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder, not an .onnx file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} '{path}' is not readable")
    if path.stat().st_size == 0:
        raise UserError(f"{what} '{path}' is empty, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} '{path}' is not a valid ONNX file (protobuf parse failed: {_first_line(exc)})")
    except Exception as exc:  # protobuf raises several types depending on the backend
        raise UserError(f"{what} '{path}' is not a valid ONNX file ({_first_line(exc)})")
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and proto.ir_version == 0):
        raise UserError(f"{what} '{path}' is not an ONNX model (no graph found)")
    if proto.ir_version == 0:
        raise UserError(f"{what} '{path}' has no IR version; the file is truncated or not an ONNX model")
    if _uses_external_data(proto):
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise UserError(f"{what} '{path}': cannot read its external data ({_first_line(exc)})")
    return proto


def check_proto(proto: onnx.ModelProto, what: str, path: Optional[PathLike] = None) -> None:
    """onnx.checker plus the installed onnxruntime's IR/opset limits.

    A model over 2 GB cannot be serialized for an in-memory check; then the checker reads
    the file itself (smaller models are not parsed a second time).
    """
    try:
        if path is not None and _approximate_size(proto) > EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(proto)
    except Exception as exc:
        raise UserError(f"{what} fails onnx.checker: {_first_line(exc)}")
    runtime.check_runtime_can_load(proto, what)


def load_model(
    source: Union[PathLike, onnx.ModelProto, Model],
    *,
    input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
    what: str = "model",
) -> Model:
    """Load a path or ModelProto into the IR, validated and normalised.

    ``input_shapes`` fixes dynamic input dims, as ``--input-shape`` does.
    """
    if isinstance(source, Model):
        model = source.copy()
    elif isinstance(source, onnx.ModelProto):
        check_proto(source, what)
        model = Model.from_proto(source, copy=True)
    else:
        label = f"{what} '{source}'"
        proto = read_proto(source, what=what)
        check_proto(proto, label, source)
        model = Model.from_proto(proto, source=str(source), copy=False)
    model.infer_shapes(reset=False)
    if input_shapes:
        model.set_input_shapes(input_shapes)
    return model


def to_proto(model: Union[Model, onnx.ModelProto]) -> onnx.ModelProto:
    return model.to_proto() if isinstance(model, Model) else model


def check_output_path(path: PathLike, *, input_path: Optional[PathLike] = None, force: bool = False) -> Path:
    """Fail fast, before any work, on an output we could not or should not write."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise UserError(f"output '{path}' is a folder; give a file name such as {path / 'model.onnx'}")
    if input_path is not None and not force:
        same = False
        try:
            same = path.exists() and os.path.samefile(path, input_path)
        except OSError:
            same = False
        if same or path.resolve() == Path(input_path).resolve():
            raise UserError(f"output '{path}' is the input file; choose another path or pass --force to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"output folder '{parent}' does not exist")
    if not parent.is_dir():
        raise UserError(f"output folder '{parent}' is not a folder")
    try:  # permission bits do not tell (root, read-only mounts, /proc): try it
        with tempfile.NamedTemporaryFile(prefix=".onnxslim-cv-probe-", dir=parent):
            pass
    except OSError as exc:
        raise UserError(f"output folder '{parent}' is not writable ({exc.strerror or exc})")
    return path


class StagedModel:
    """A model written next to its destination but not yet in place.

    The CLI verifies the staged file (onnxruntime needs a file for models over 2 GB anyway)
    and only then commits it; :meth:`discard` (or leaving the ``with`` block
    without committing) removes it, so a failed run leaves no partial output.
    """

    def __init__(self, model: Union[Model, onnx.ModelProto], path: PathLike, *, external_data: Optional[bool] = None,
                 check: bool = True):
        self.destination = check_output_path(path)
        if isinstance(model, Model):
            proto = model.to_proto()
            storage = model.annotations.get("sparse_storage")
            if storage:  # only on the written file: sessions and shape inference need dense weights
                from .storage import to_sparse_initializers

                to_sparse_initializers(proto, storage if isinstance(storage, (list, tuple, set)) else None)
        else:
            proto = onnx.ModelProto()
            proto.CopyFrom(model)  # onnx.save with external data rewrites the proto it is given
        if external_data is None:
            external_data = _approximate_size(proto) > EXTERNAL_DATA_THRESHOLD
        self.external_data = external_data
        if check and not external_data:
            _check_emitted(proto)
        self._dir = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.", suffix=".tmp",
                                          dir=self.destination.parent))
        self.path = self._dir / self.destination.name
        try:
            if external_data:
                onnx.save_model(
                    proto,
                    str(self.path),
                    save_as_external_data=True,
                    all_tensors_to_one_file=True,
                    location=_data_file_name(self.destination),
                    size_threshold=_EXTERNAL_TENSOR_MIN_BYTES,
                )
                if check:
                    _check_emitted(str(self.path))
            else:
                onnx.save_model(proto, str(self.path))
        except BaseException:
            self.discard()
            raise

    def commit(self) -> Path:
        data = self._dir / _data_file_name(self.destination)
        if data.exists():
            os.replace(data, self.destination.parent / data.name)
        os.replace(self.path, self.destination)
        self.discard()
        return self.destination

    def discard(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "StagedModel":
        return self

    def __exit__(self, *exc_info) -> None:
        self.discard()


def _check_emitted(model: Union[onnx.ModelProto, str]) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise RuntimeError(f"refusing to write an invalid model: {_first_line(exc)}") from exc


def write_atomically(path: PathLike, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call ``write`` on a temp file in ``path``'s folder, then rename it to ``path``: a failed
    write leaves nothing behind. The file gets the permissions a plain ``open`` would give it
    (``mkstemp`` makes its files private)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def save_model(
    model: Union[Model, onnx.ModelProto],
    path: PathLike,
    *,
    external_data: Optional[bool] = None,
    check: bool = True,
) -> Path:
    """Write atomically: a temp file in the target folder, then rename.

    ``external_data``: None decides by size (protobuf cannot serialize over 2 GiB); True always
    writes weights to ``<name>.data`` next to the model. Either way a failed write leaves no
    partial file behind.
    """
    with StagedModel(model, path, external_data=external_data, check=check) as staged:
        return staged.commit()


def _data_file_name(path: Path) -> str:
    return path.name + ".data"


def _approximate_size(proto: onnx.ModelProto) -> int:
    try:
        return proto.ByteSize()
    except Exception:
        return sum(len(init.raw_data) for init in proto.graph.initializer)


def file_size(path: PathLike) -> int:
    """Bytes on disk, including an external data file written next to it."""
    path = Path(path)
    total = path.stat().st_size
    data = path.parent / _data_file_name(path)
    if data.exists():
        total += data.stat().st_size
    return total


_SHAPE_RE = re.compile(r"^\s*(?:(?P<name>.+):)?(?P<dims>\d+(?:[x,]\d+)*)\s*$")


def parse_input_shapes(values, input_names) -> Dict[str, Tuple[int, ...]]:
    """Parse ``--input-shape NAME:1x3x224x224`` (NAME may be omitted for one-input models)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for value in values or []:
        match = _SHAPE_RE.match(value)
        if not match:
            raise UserError(f"--input-shape '{value}': expected NAME:1x3x224x224 (or 1x3x224x224 for one-input models)")
        name = match.group("name")
        dims = tuple(int(d) for d in re.split(r"[x,]", match.group("dims")))
        if name is None:
            if len(input_names) != 1:
                raise UserError(
                    f"--input-shape '{value}' has no input name, but the model has {len(input_names)} inputs: "
                    f"{', '.join(input_names)}"
                )
            name = input_names[0]
        shapes[name] = dims
    return shapes


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else text
    return line if len(line) <= 300 else line[:297] + "..."
