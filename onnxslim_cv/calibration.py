"""Calibration and validation inputs, shared by every compression pass and by verification.

Everything is a :class:`CalibrationData`: a re-iterable, streamed sequence of items
``{input_name: array}`` that always carry a leading batch dim and have already been checked
against the model's inputs (names, rank, fixed dims, dtype). Sources are opened again on every
iteration and read one file (or one chunk of a big array) at a time, so a 10 GB ``.npy`` or a
folder of 50k images never sits in memory at once.

Constructors: :func:`from_path` (.npy, .npz, a folder of those, a folder of images),
:func:`from_iterable`, :func:`from_ort_reader`, :func:`random_data`. :func:`as_ort_reader`
turns a :class:`CalibrationData` into an onnxruntime ``CalibrationDataReader``.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from .errors import UserError
from .specs import TensorSpec

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
ARRAY_EXTENSIONS = frozenset({".npy", ".npz"})
RESIZE_MODES = ("stretch", "center-crop", "letterbox")
LAYOUTS = ("auto", "nchw", "nhwc")

NPY_CHUNK_SAMPLES = 32
"""Samples per item when a file holds a big batch: bounds memory while keeping reads large."""

Item = dict[str, np.ndarray]
RawItems = Iterable[tuple[str, Any]]  # (where, item) pairs; `where` prefixes error messages


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------


class CalibrationData:
    """A re-iterable stream of validated input items.

    Build it with the ``from_*`` constructors; the constructor here is the plumbing they share.
    ``open_items`` is called once per iteration and must return a fresh iterable of
    ``(where, raw_item)`` pairs; ``where`` names the file/item in error messages.
    ``total`` is the sample count (an int, a zero-argument callable computing it lazily, or None).
    ``kind`` says what the source is ("images" is the only kind that preprocessing flags affect).
    """

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        open_items: Callable[[], RawItems],
        *,
        description: str,
        limit: Optional[int] = None,
        total: Union[int, Callable[[], Optional[int]], None] = None,
        kind: str = "python",
    ):
        self.kind = kind  # "arrays", "images", "python", "ort-reader" or "random"
        self.specs: list[TensorSpec] = _check_specs(specs)
        self.limit = _check_limit(limit)
        self._open_items = open_items
        self._source_description = description
        self._total = total
        self._total_cached = False

    # -- public ------------------------------------------------------------------------------

    @property
    def description(self) -> str:
        """Where the data comes from, for messages and reports."""
        if self.limit is None:
            return self._source_description
        total = self._known_total()
        if total is not None and total <= self.limit:
            return self._source_description
        used = f"first {self.limit} used"
        if self._source_description.endswith(")"):
            return f"{self._source_description[:-1]}; {used})"
        return f"{self._source_description} ({used})"

    def __iter__(self) -> Iterator[Item]:
        remaining = self.limit
        raw_items = iter(self._open_items())
        try:
            for where, raw in raw_items:
                item = _validate_item(raw, self.specs, where)
                n = _batch_size(item)
                if n == 0:
                    continue
                if remaining is not None and n >= remaining:
                    # Stop without pulling another item, so one-shot sources are not over-read.
                    yield item if n == remaining else {k: v[:remaining] for k, v in item.items()}
                    return
                yield item
                if remaining is not None:
                    remaining -= n
        finally:
            close = getattr(raw_items, "close", None)
            if close is not None:
                close()

    def batches(self, batch_size: int) -> Iterator[Item]:
        """Re-chunk the items to exactly ``batch_size`` samples (the last may be smaller).

        Holds at most one batch plus one source item. Items whose non-batch dims differ (only
        possible with dynamic dims) cannot be concatenated: the pending batch is then emitted
        early, smaller than ``batch_size``.
        """
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
        pending: list[Item] = []
        pending_samples = 0
        pending_signature = None
        for item in self:
            signature = {k: (v.shape[1:], v.dtype) for k, v in item.items()}
            if pending and signature != pending_signature:
                yield _concat(pending)
                pending, pending_samples = [], 0
            pending_signature = signature
            n = _batch_size(item)
            start = 0
            while start < n:
                take = min(batch_size - pending_samples, n - start)
                pending.append(item if take == n else {k: v[start : start + take] for k, v in item.items()})
                pending_samples += take
                start += take
                if pending_samples == batch_size:
                    yield _concat(pending)
                    pending, pending_samples = [], 0
        if pending:
            yield _concat(pending)

    def count(self) -> Optional[int]:
        """Number of samples if knowable without reading data (respects ``limit``), else None."""
        total = self._known_total(compute=True)
        if total is None:
            return None
        return total if self.limit is None else min(total, self.limit)

    def limited(self, limit: Optional[int]) -> "CalibrationData":
        """A view of the same source with at most ``limit`` samples (for per-pass defaults)."""
        if limit is None:
            return self
        limit = _check_limit(limit)
        new = CalibrationData.__new__(CalibrationData)
        new.__dict__.update(self.__dict__)
        new.limit = limit if self.limit is None else min(self.limit, limit)
        return new

    def __repr__(self) -> str:
        return f"CalibrationData({self.description!r})"

    # -- internals ---------------------------------------------------------------------------

    def _known_total(self, compute: bool = False) -> Optional[int]:
        if callable(self._total):
            if not compute and not self._total_cached:
                return None
            if not self._total_cached:
                try:
                    self._total = self._total()
                except UserError:
                    self._total = None
                self._total_cached = True
        return self._total  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Mirrored copies (more rows for the refits when calibration images are few)
# --------------------------------------------------------------------------------------------

MIRRORS = ("none", "hflip", "flips", "crops")
"""``hflip``: each sample and its left-right mirror (2x); ``flips``: also upside down and both (4x);
``crops``: the sample, its left-right mirror and random zoomed-in crops (:data:`CROP_SCALES`,
mirrored at random), as many as make :data:`CROPS_TARGET` samples in all (at least one each)."""
CROPS_TARGET = 64
CROP_SCALES = (0.55, 0.9)
"""Side of a crop as a fraction of the image's (each side drawn separately), resized back."""


def _resize_matrix(size: int, start: int, length: int) -> np.ndarray:
    """``[size, full]`` bilinear weights (half-pixel centres) that stretch ``length`` pixels from
    ``start`` of an axis back to ``size`` pixels; ``full`` is ``size``, the axis' length."""
    centres = (np.arange(size) + 0.5) * length / size - 0.5 + start
    centres = np.clip(centres, start, start + length - 1)
    low = np.floor(centres).astype(np.int64)
    high = np.minimum(low + 1, start + length - 1)
    frac = (centres - low).astype(np.float32)
    matrix = np.zeros((size, size), np.float32)
    rows = np.arange(size)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def _crop(array: np.ndarray, axes: tuple[int, int], box: tuple[float, float, float, float], flip: bool) -> np.ndarray:
    """The ``box`` (top, left, height, width as fractions) of every image in ``array``, resized
    back to the full size, mirrored left-right when ``flip``."""
    height_axis, width_axis = axes
    h, w = array.shape[height_axis], array.shape[width_axis]
    top, left = int(round(box[0] * h)), int(round(box[1] * w))
    ch, cw = max(1, int(round(box[2] * h))), max(1, int(round(box[3] * w)))
    rows, cols = _resize_matrix(h, min(top, h - ch), ch), _resize_matrix(w, min(left, w - cw), cw)
    moved = np.moveaxis(np.asarray(array, np.float32), (height_axis, width_axis), (-2, -1))
    out = rows @ moved @ cols.T
    if flip:
        out = out[..., ::-1]
    return np.ascontiguousarray(np.moveaxis(out, (-2, -1), (height_axis, width_axis)).astype(array.dtype))


def image_axes(spec: TensorSpec) -> Optional[tuple[int, int]]:
    """(height axis, width axis) of a batched float image input, NCHW or NHWC; None otherwise.

    The layout is read from the fixed channel dim (1 to 4 channels at axis 1 or 3, the other
    position not); anything else (feature vectors, tokens, ambiguous shapes) is not mirrored.
    """
    shape = spec.shape
    if shape is None or len(shape) != 4 or not np.issubdtype(np.dtype(spec.dtype), np.floating):
        return None

    def few(dim: Any) -> bool:
        return _is_fixed(dim) and 1 <= int(dim) <= 4

    if few(shape[1]) and not few(shape[3]):
        return 2, 3
    if few(shape[3]) and not few(shape[1]):
        return 1, 2
    return None


def mirrored(data: CalibrationData, kind: str, *, seed: int = 0) -> tuple[CalibrationData, Optional[str]]:
    """``data`` followed, sample by sample, by its mirror images (or crops, see :data:`MIRRORS`);
    (data, None) or (``data``, why not).

    Least-squares refits and loss curves measured on 10-20 images fit those images' activations
    and overfit: on PP-OCR det pruned to 0.515 of its MACs from 10 images, adding their
    horizontal mirrors raised the map IoU against fp32 from 0.14 to 0.70 (all four flips:
    0.77); FastestDet at 0.60, F1 0.06 -> 0.20 (tools/bench_prune.py protocol). A mirrored
    photo is still a plausible input for these statistics, which is all the refit needs; so is
    a zoomed-in crop, which also shows the layers objects at other scales. ``crops`` draws its
    boxes from a generator seeded with ``seed`` and the sample's index (the same boxes on every
    pass over the data).
    """
    if kind not in MIRRORS:
        raise UserError(f"mirroring {kind!r}: choose one of {', '.join(MIRRORS)}")
    if kind == "none":
        return data, "not asked for"
    axes = {spec.name: image_axes(spec) for spec in data.specs}
    plain = [name for name, ax in axes.items() if ax is None]
    if plain:
        return data, f"input {plain[0]} is not an NCHW / NHWC float image"
    flips: list[tuple[bool, bool]] = [(False, True)] + ([(True, False), (True, True)] if kind == "flips" else [])
    count = data.count()
    crops = max(1, -(-CROPS_TARGET // count) - 2) if kind == "crops" and count else (2 if kind == "crops" else 0)

    def cropped(item: Item, i: int) -> Iterator[Item]:
        rng = np.random.default_rng([seed, i])
        for _ in range(crops):
            sides = rng.uniform(*CROP_SCALES, size=2)
            box = (rng.uniform(0, 1 - sides[0]), rng.uniform(0, 1 - sides[1]), sides[0], sides[1])
            flip = bool(rng.random() < 0.5)
            yield {name: _crop(array, axes[name], box, flip) for name, array in item.items()}

    def flipped(item: Item, vertical: bool, horizontal: bool) -> Item:
        out = {}
        for name, array in item.items():
            height, width = axes[name]
            index = [slice(None)] * array.ndim
            if vertical:
                index[height] = slice(None, None, -1)
            if horizontal:
                index[width] = slice(None, None, -1)
            out[name] = np.ascontiguousarray(array[tuple(index)])
        return out

    def open_items() -> Iterator[tuple[str, Item]]:
        for i, item in enumerate(data):
            yield f"sample {i}", item
            for vertical, horizontal in flips:
                yield f"sample {i} mirrored", flipped(item, vertical, horizontal)
            for k, crop in enumerate(cropped(item, i) if crops else ()):
                yield f"sample {i} crop {k}", crop

    label = {"hflip": "left-right mirrors", "flips": "mirrors and flips",
             "crops": f"left-right mirrors and {crops} random crops each"}[kind]
    return CalibrationData(
        data.specs, open_items, description=f"{data.description} + {label} ({kind})",
        total=None if count is None else count * (1 + len(flips) + crops), kind=data.kind,
    ), None


def _concat(pieces: list[Item]) -> Item:
    if len(pieces) == 1:
        return pieces[0]
    return {k: np.concatenate([p[k] for p in pieces], axis=0) for k in pieces[0]}


def _batch_size(item: Item) -> int:
    return next(iter(item.values())).shape[0]


def _check_specs(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    specs = list(specs)
    if not specs:
        raise UserError("the model has no inputs, so there is nothing to calibrate with")
    for spec in specs:
        if spec.shape is not None and len(spec.shape) == 0:
            raise UserError(
                f"input '{spec.name}' is a scalar (rank 0); calibration data needs inputs with a batch dimension"
            )
    return specs


def _check_limit(limit: Optional[int]) -> Optional[int]:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit <= 0:
        raise UserError(f"calibration size (--calib-size) must be a positive number of samples, got {limit!r}")
    return int(limit)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(s.name for s in specs)


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def _is_fixed(dim: Any) -> bool:
    return isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim >= 0


def _check_keys(keys: Iterable[str], specs: Sequence[TensorSpec], where: str) -> None:
    keys = list(keys)
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in keys]
    extra = [k for k in keys if k not in expected]
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append("missing input " + ", ".join(f"'{m}'" for m in missing))
    if extra:
        parts.append("unexpected key " + ", ".join(f"'{e}'" for e in extra))
    raise UserError(f"{where}: {' and '.join(parts)}; the model's inputs are: {', '.join(expected)}")


def _as_batched(array: Any, spec: TensorSpec, where: str) -> np.ndarray:
    """Add the batch axis if ``array`` is one sample; check rank and fixed non-batch dims (no copy)."""
    if not isinstance(array, np.ndarray):
        try:
            array = np.asarray(array)
        except Exception as exc:  # noqa: BLE001 - anything that is not array-like
            raise UserError(f"{where}: input '{spec.name}' is not an array ({type(array).__name__}: {exc})") from None
    if spec.shape is None:  # rank unknown: trust that arrays are batched
        return array if array.ndim >= 1 else array[None]
    rank = len(spec.shape)
    if array.ndim == rank:
        batched = array
    elif array.ndim == rank - 1:
        batched = array[None]
    else:
        sample_shape = "x".join(str(d) if _is_fixed(d) else (d or "?") for d in spec.shape[1:]) or "scalar"
        raise UserError(
            f"{where}: input '{spec.name}' has shape {_shape_str(array.shape)} ({array.ndim}-D), model expects "
            f"{spec.shape_str()} ({rank}-D batch) or {sample_shape} ({rank - 1}-D single sample)"
        )
    for axis, (got, want) in enumerate(zip(batched.shape, spec.shape)):
        if axis > 0 and _is_fixed(want) and got != want:
            raise UserError(
                f"{where}: input '{spec.name}' has shape {_shape_str(batched.shape)}, model expects "
                f"{spec.shape_str()} (dim {axis} is {got}, expected {want})"
            )
    return batched


_SAFE_CASTS = {
    (np.dtype(np.float64), np.dtype(np.float32)),
    (np.dtype(np.float16), np.dtype(np.float32)),
    (np.dtype(np.float32), np.dtype(np.float16)),
    (np.dtype(np.float64), np.dtype(np.float16)),
    (np.dtype(np.int32), np.dtype(np.int64)),
}


def _cast(array: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    want = np.dtype(spec.dtype)
    got = array.dtype.newbyteorder("=") if array.dtype.byteorder not in ("=", "|") else array.dtype
    if got == want:
        return np.ascontiguousarray(array, dtype=want)
    if (got, want) in _SAFE_CASTS:
        return np.ascontiguousarray(array.astype(want))
    if got == np.dtype(np.int64) and want == np.dtype(np.int32):
        info = np.iinfo(np.int32)
        if array.size == 0 or (array.min() >= info.min and array.max() <= info.max):
            return np.ascontiguousarray(array.astype(want))
        raise UserError(f"{where}: dtype int64 for input '{spec.name}', model expects int32 (values do not fit int32)")
    raise UserError(f"{where}: dtype {array.dtype.name} for input '{spec.name}', model expects {want.name}")


def _validate_item(raw: Any, specs: Sequence[TensorSpec], where: str) -> Item:
    """Check one source item against the model inputs; return it batched, cast and contiguous."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{where}: expected a dict of input name -> array, got {type(raw).__name__}")
    _check_keys(raw.keys(), specs, where)
    item = {spec.name: _cast(_as_batched(raw[spec.name], spec, where), spec, where) for spec in specs}
    sizes = {name: a.shape[0] for name, a in item.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {n}" for name, n in sizes.items())
        raise UserError(
            f"{where}: inputs have different batch sizes ({listed}); "
            f"all inputs of one item need the same number of samples"
        )
    return item


def _samples_in(shape: tuple, spec: TensorSpec) -> Optional[int]:
    """Samples an array of ``shape`` holds for ``spec`` (None if it would not validate)."""
    if spec.shape is None:
        return shape[0] if len(shape) >= 1 else 1
    if len(shape) == len(spec.shape):
        return shape[0]
    if len(shape) == len(spec.shape) - 1:
        return 1
    return None


# --------------------------------------------------------------------------------------------
# Array files
# --------------------------------------------------------------------------------------------


def _read_npy_header(stream) -> Optional[tuple[tuple, bool, np.dtype]]:
    """(shape, fortran_order, dtype) from an open .npy stream positioned at its start."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    return None  # v3 (utf-8 field names): rare; callers fall back to a full read


def _unreadable(path: Path, kind: str, exc: BaseException) -> UserError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"{path}: not a readable {kind} file ({reason})")


def _load_npy(path: Path) -> np.ndarray:
    """Memory-map the .npy so that only the chunks we slice are ever read."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise UserError(f"{path}: not a readable .npy file (no .npy header; save it with numpy.save)")
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc) or "object" in str(exc):
            raise UserError(f"{path}: holds Python objects (pickled); save a numeric array instead") from None
        try:  # e.g. an empty array cannot be memory-mapped
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc2:
            raise _unreadable(path, ".npy", exc2) from None
    except (OSError, EOFError) as exc:
        raise _unreadable(path, ".npy", exc) from None


def _npz_members(path: Path) -> dict[str, tuple[zipfile.ZipInfo, Optional[tuple]]]:
    """Key -> (zip entry, npy header or None), reading only the zip directory and member headers."""
    members = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as stream:
                    members[info.filename[: -len(".npy")]] = (info, _read_npy_header(stream))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise _unreadable(path, ".npz", exc) from None
    return members


def _memmap_npz_member(path: Path, info: zipfile.ZipInfo) -> Optional[np.ndarray]:
    """Memory-map an uncompressed (np.savez) member in place; None if that is not possible."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local_header = f.read(30)
        if len(local_header) != 30 or local_header[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local_header[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        header = _read_npy_header(f)
        if header is None:
            return None
        shape, fortran, dtype = header
        if dtype.hasobject:
            return None
        offset = f.tell()
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    members = _npz_members(path)
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for key, (info, _) in members.items():
                mapped = _memmap_npz_member(path, info)
                if mapped is None:  # compressed (np.savez_compressed): has to be inflated whole
                    with archive.open(info) as stream:
                        mapped = np.lib.format.read_array(stream, allow_pickle=False)
                arrays[key] = mapped
    except ValueError as exc:
        if "pickle" in str(exc) or "object" in str(exc):
            raise UserError(f"{path}: holds Python objects (pickled); save numeric arrays instead") from None
        raise _unreadable(path, ".npz", exc) from None
    except (zipfile.BadZipFile, OSError, EOFError, struct.error) as exc:
        raise _unreadable(path, ".npz", exc) from None
    return arrays


def _load_array_file(path: Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    if path.suffix.lower() == ".npz":
        return _load_npz(path)
    return {specs[0].name: _load_npy(path)}


def _chunked_items(
    where: str, arrays: dict[str, np.ndarray], specs: Sequence[TensorSpec]
) -> Iterator[tuple[str, Item]]:
    """Split one file's arrays into items of at most NPY_CHUNK_SAMPLES, copying only each chunk."""
    _check_keys(arrays.keys(), specs, where)
    batched = {spec.name: _as_batched(arrays[spec.name], spec, where) for spec in specs}
    sizes = {name: a.shape[0] for name, a in batched.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {n}" for name, n in sizes.items())
        raise UserError(
            f"{where}: arrays have different batch sizes ({listed}); every key needs the same number of samples"
        )
    n = next(iter(sizes.values()))
    for start in range(0, n, NPY_CHUNK_SAMPLES):
        yield where, {name: np.array(a[start : start + NPY_CHUNK_SAMPLES]) for name, a in batched.items()}


def _array_file_samples(path: Path, specs: Sequence[TensorSpec]) -> Optional[int]:
    """Sample count from the file headers only (None if the file would not validate)."""
    spec = specs[0]
    try:
        if path.suffix.lower() == ".npz":
            member = _npz_members(path).get(spec.name)
            header = member[1] if member else None
        else:
            with open(path, "rb") as f:
                header = _read_npy_header(f)
    except (OSError, ValueError, EOFError, UserError):
        return None
    return None if header is None else _samples_in(tuple(header[0]), spec)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


@dataclass
class ImagePreprocess:
    """How an image file becomes one model input sample.

    Order of operations: decode -> grayscale (1-channel models) or RGB -> resize (bilinear) ->
    float32 -> BGR swap -> ``* scale`` -> ``(x - mean) / std`` -> layout. ``mean``/``std`` are
    given in the output channel order (after the BGR swap). ``pad_value`` is a pixel value
    (before scale/mean/std), like the gray 114 of YOLO letterboxing.

    Caffe2 SqueezeNet: ``ImagePreprocess(size=(224, 224), resize_mode="center-crop", bgr=True,
    mean=(104, 117, 123))``. CIFAR ResNet-20: ``ImagePreprocess(size=(32, 32), scale=1/255,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))``.
    """

    size: Optional[tuple[int, int]] = None
    resize_mode: str = "stretch"
    crop_ratio: float = 0.875
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0
    bgr: bool = False
    layout: str = "auto"
    """nchw, nhwc, or auto: nhwc for an input whose last dim holds 1-4 channels and dim 1 does not
    (``[N, H, W, 3]``, as TensorFlow models take images), else nchw."""
    pad_value: float = 0.0

    def __post_init__(self) -> None:
        if self.size is not None:
            size = tuple(self.size)
            if len(size) != 2 or not all(_is_fixed(d) and d > 0 for d in size):
                raise UserError(f"image size must be two positive integers (H, W), got {self.size!r}")
            self.size = (int(size[0]), int(size[1]))
        if self.resize_mode not in RESIZE_MODES:
            raise UserError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.layout not in LAYOUTS:
            raise UserError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not (0 < self.crop_ratio <= 1):
            raise UserError(f"crop ratio must be in (0, 1], got {self.crop_ratio}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise UserError(f"scale must be a positive number, got {self.scale}")
        self.mean = _as_float_tuple(self.mean, "mean")
        self.std = _as_float_tuple(self.std, "std")
        if any(s == 0 for s in self.std):
            raise UserError(f"std must not contain 0, got {','.join(map(str, self.std))}")

    def layout_for(self, spec: TensorSpec) -> str:
        """``layout``, with auto resolved from ``spec``'s shape."""
        if self.layout != "auto":
            return self.layout
        shape = spec.shape

        def few(dim: Any) -> bool:
            return _is_fixed(dim) and 1 <= int(dim) <= 4

        channels_last = shape is not None and len(shape) == 4 and few(shape[3]) and not few(shape[1])
        return "nhwc" if channels_last else "nchw"

    def target(self, spec: TensorSpec) -> tuple[int, int, int]:
        """(H, W, channels) for ``spec``; raises UserError when it cannot be determined."""
        layout = self.layout_for(spec)
        if spec.shape is not None and len(spec.shape) != 4:
            raise UserError(
                f"input '{spec.name}' has shape {spec.shape_str()}; images need a 4-D input "
                f"({'N,C,H,W' if layout == 'nchw' else 'N,H,W,C'}, see --layout)"
            )
        if spec.shape is None:
            dims_hwc = (None, None, None)
        elif layout == "nchw":
            dims_hwc = (spec.shape[2], spec.shape[3], spec.shape[1])
        else:
            dims_hwc = (spec.shape[1], spec.shape[2], spec.shape[3])
        channels = dims_hwc[2] if _is_fixed(dims_hwc[2]) else 3
        if channels not in (1, 3):
            raise UserError(
                f"input '{spec.name}' ({spec.shape_str()}, layout {layout}) has {channels} channels; "
                f"images give 1 (grayscale) or 3 (RGB); check --layout"
            )
        if self.size is not None:
            height, width = self.size
        elif _is_fixed(dims_hwc[0]) and _is_fixed(dims_hwc[1]):
            height, width = int(dims_hwc[0]), int(dims_hwc[1])
        else:
            raise UserError(
                f"input '{spec.name}' has shape {spec.shape_str()} without a fixed height and width; "
                f"pass --input-size HxW (e.g. --input-size 224x224)"
            )
        for what, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise UserError(
                    f"--{what} has {len(values)} values but input '{spec.name}' has {channels} channel(s); "
                    f"give 1 or {channels}"
                )
        return height, width, channels

    def apply(self, image: "PIL.Image.Image", spec: TensorSpec) -> np.ndarray:  # noqa: F821
        """One sample (no batch dim), float32, in ``layout``; cast to the spec dtype happens later."""
        from PIL import Image

        height, width, channels = self.target(spec)
        image = image.convert("L" if channels == 1 else "RGB")
        if self.resize_mode == "stretch":
            pixels = _pixels(image.resize((width, height), Image.Resampling.BILINEAR))
        elif self.resize_mode == "center-crop":
            pixels = self._center_crop(image, height, width)
        else:
            pixels = self._letterbox(image, height, width)
        if self.bgr and channels == 3:
            pixels = pixels[..., ::-1]
        x = pixels * np.float32(self.scale)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout_for(spec) == "nchw":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _center_crop(self, image, height: int, width: int) -> np.ndarray:
        """torchvision Resize(shorter side) + CenterCrop; pads (centered) if the resize is too small."""
        from PIL import Image

        short_target = max(1, round(min(height, width) / self.crop_ratio))
        img_w, img_h = image.size
        if img_w <= img_h:
            new_w, new_h = short_target, max(1, int(short_target * img_h / img_w))
        else:
            new_w, new_h = max(1, int(short_target * img_w / img_h)), short_target
        pixels = _pixels(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
        if new_h < height or new_w < width:
            canvas = np.full((max(new_h, height), max(new_w, width), pixels.shape[2]), self.pad_value, np.float32)
            top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
            canvas[top : top + new_h, left : left + new_w] = pixels
            pixels = canvas
        top = int(round((pixels.shape[0] - height) / 2.0))
        left = int(round((pixels.shape[1] - width) / 2.0))
        return pixels[top : top + height, left : left + width]

    def _letterbox(self, image, height: int, width: int) -> np.ndarray:
        from PIL import Image

        img_w, img_h = image.size
        ratio = min(height / img_h, width / img_w)
        new_w = min(width, max(1, round(img_w * ratio)))
        new_h = min(height, max(1, round(img_h * ratio)))
        pixels = _pixels(image.resize((new_w, new_h), Image.Resampling.BILINEAR))
        canvas = np.full((height, width, pixels.shape[2]), self.pad_value, np.float32)
        canvas[:new_h, :new_w] = pixels
        return canvas


def _pixels(image) -> np.ndarray:
    """HWC float32 pixels (a 1-channel image gets a trailing channel axis)."""
    array = np.asarray(image, dtype=np.float32)
    return array[..., None] if array.ndim == 2 else array


def _as_float_tuple(values: Any, what: str) -> tuple[float, ...]:
    if isinstance(values, (int, float, np.number)):
        values = (values,)
    try:
        result = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be numbers, got {values!r}") from None
    if not result or not all(math.isfinite(v) for v in result):
        raise UserError(f"{what} must be one or more finite numbers, got {values!r}")
    return result


def _load_image(path: Path, spec: TensorSpec, preprocess: ImagePreprocess) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            sample = preprocess.apply(image, spec)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: cannot decode image ({reason})") from None
    want = np.dtype(spec.dtype)
    if want.kind in "iu":
        # Models that take raw pixels (uint8 input): whole-number results are cast, others are a mistake.
        info = np.iinfo(want)
        if np.all(sample == np.round(sample)) and sample.min() >= info.min and sample.max() <= info.max:
            return sample.astype(want)
        raise UserError(
            f"{path}: input '{spec.name}' expects {want.name} but preprocessing produced non-integer or out-of-range "
            f"values; drop --scale/--mean/--std for raw-pixel models"
        )
    return sample


def _image_items(files: list[Path], spec: TensorSpec, preprocess: ImagePreprocess) -> Iterator[tuple[str, Item]]:
    for path in files:
        yield str(path), {spec.name: _load_image(path, spec, preprocess)}


# --------------------------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------------------------


def _list_files(folder: Path) -> list[Path]:
    """Regular files under ``folder``, recursive, sorted by relative path; hidden entries skipped."""
    found = []
    seen_dirs = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:  # symlink loop
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root) / f for f in files if not f.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _folder_label(path: Path) -> str:
    text = str(path)
    return text if text.endswith(os.sep) or text.endswith("/") else text + "/"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _one_input(specs: Sequence[TensorSpec], what: str) -> TensorSpec:
    if len(specs) != 1:
        raise UserError(
            f"{what} feeds one-input models, but the model has {len(specs)} inputs ({_names(specs)}); "
            f"use .npz files with one key per input"
        )
    return specs[0]


def from_path(
    path: Union[str, os.PathLike],
    specs: Sequence[TensorSpec],
    *,
    preprocess: Optional[ImagePreprocess] = None,
    limit: Optional[int] = None,
) -> CalibrationData:
    """Data from a .npy, a .npz, a folder of .npy/.npz files, or a folder of images (or one image).

    The folder is listed now, so a bad path fails before any pass runs; the files are opened
    again on every iteration, one at a time.
    """
    specs = _check_specs(specs)
    limit = _check_limit(limit)
    path = Path(path)
    supported = "a .npy file, a .npz file, a folder of .npy/.npz files, or a folder of images"
    if not path.exists():
        raise UserError(f"{path}: calibration data not found (expected {supported})")

    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npy":
            _one_input(specs, f"{path}: a .npy file")
        if suffix in ARRAY_EXTENSIONS:
            samples = _array_file_samples(path, specs)
            label = f"{path}" + (f" ({_plural(samples, 'sample')})" if samples is not None else "")
            return CalibrationData(
                specs,
                lambda: _chunked_items(str(path), _load_array_file(path, specs), specs),
                description=label,
                limit=limit,
                total=samples,
                kind="arrays",
            )
        if suffix in IMAGE_EXTENSIONS:
            return _images_source([path], str(path), specs, preprocess, limit)
        raise UserError(f"{path}: unsupported file type '{path.suffix or '(none)'}' (expected {supported})")

    files = _list_files(path)
    if not files:
        raise UserError(f"{_folder_label(path)}: folder is empty (expected .npy/.npz files or images)")
    arrays = [f for f in files if f.suffix.lower() in ARRAY_EXTENSIONS]
    images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    others = [f for f in files if f.suffix.lower() not in ARRAY_EXTENSIONS | IMAGE_EXTENSIONS]
    if others:
        raise UserError(
            f"{others[0]}: unsupported file type '{others[0].suffix or '(none)'}' in calibration folder "
            f"(expected .npy/.npz or images: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if arrays and images:
        raise UserError(
            f"{_folder_label(path)}: mixes array files ({arrays[0].name}) and images ({images[0].name}); "
            f"use one kind per folder"
        )
    if images:
        label = f"{_folder_label(path)} ({_plural(len(images), 'image')})"
        return _images_source(images, label, specs, preprocess, limit)

    if any(f.suffix.lower() == ".npy" for f in arrays) and len(specs) > 1:
        _one_input(specs, f"{_folder_label(path)}: .npy files")

    def open_items() -> Iterator[tuple[str, Item]]:
        for file in arrays:
            yield from _chunked_items(str(file), _load_array_file(file, specs), specs)

    def total() -> Optional[int]:
        counts = [_array_file_samples(f, specs) for f in arrays]
        return None if any(c is None for c in counts) else sum(counts)

    return CalibrationData(
        specs,
        open_items,
        description=f"{_folder_label(path)} ({_plural(len(arrays), 'array file')})",
        limit=limit,
        total=total,
        kind="arrays",
    )


def _images_source(
    files: list[Path], label: str, specs: Sequence[TensorSpec], preprocess: Optional[ImagePreprocess], limit
) -> CalibrationData:
    spec = _one_input(specs, f"{label}: images")
    preprocess = preprocess or ImagePreprocess()
    preprocess.target(spec)  # fail now on missing --input-size, wrong mean length, ...
    return CalibrationData(
        specs, lambda: _image_items(files, spec, preprocess), description=label, limit=limit, total=len(files),
        kind="images",
    )


def _describe_object(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
    return str(name)


def _one_shot(iterator: Iterator, label: str) -> Callable[[], Iterator]:
    consumed = False

    def open_once() -> Iterator:
        nonlocal consumed
        if consumed:
            raise UserError(
                f"{label} was already consumed; pass a list or a function that returns a new iterator"
            )
        consumed = True
        return iterator

    return open_once


def _numbered(items: Iterable[Any], label: str, preposition: str = "of") -> Iterator[tuple[str, Any]]:
    for index, item in enumerate(items):
        yield f"item {index} {preposition} {label}", item


def from_iterable(obj: Any, specs: Sequence[TensorSpec], *, limit: Optional[int] = None) -> CalibrationData:
    """Data from Python objects: a list/tuple of ``{input_name: array}`` dicts, a function returning
    a fresh iterable of them, a re-iterable container, or a one-shot iterator/generator (usable once).
    A single dict is one item."""
    specs = _check_specs(specs)
    if isinstance(obj, Mapping):
        obj = [obj]
    total: Union[int, Callable[[], Optional[int]], None] = None
    if isinstance(obj, (list, tuple)):
        label = f"{type(obj).__name__} of {_plural(len(obj), 'item')}"
        items = obj
        open_items: Callable[[], Iterable[Any]] = lambda: items  # noqa: E731
        total = lambda: _sum_samples(items, specs)  # noqa: E731
    elif callable(obj) and not hasattr(obj, "__iter__"):
        label = f"{_describe_object(obj)}()"

        def open_items() -> Iterable[Any]:
            result = obj()
            try:
                return iter(result)
            except TypeError:
                raise UserError(f"{label} returned {type(result).__name__}, expected an iterable of dicts") from None
    else:
        try:
            first = iter(obj)
        except TypeError:
            raise UserError(
                f"calibration data must be an iterable of {{input name: array}} dicts, got {type(obj).__name__}"
            ) from None
        label = _describe_object(obj)
        if first is obj:  # an iterator: it can be walked once only
            label = f"iterator {label}"
            open_items = _one_shot(first, label)
        else:
            pending = [first]

            def open_items() -> Iterable[Any]:
                return pending.pop() if pending else iter(obj)
    return CalibrationData(
        specs, lambda: _numbered(open_items(), label), description=label, limit=limit, total=total
    )


def _sum_samples(items: Sequence[Any], specs: Sequence[TensorSpec]) -> Optional[int]:
    spec = specs[0]
    total = 0
    for item in items:
        if not isinstance(item, Mapping) or spec.name not in item:
            return None
        n = _samples_in(tuple(np.shape(item[spec.name])), spec)
        if n is None:
            return None
        total += n
    return total


def from_ort_reader(reader: Any, specs: Sequence[TensorSpec], *, limit: Optional[int] = None) -> CalibrationData:
    """Adapter for an onnxruntime ``CalibrationDataReader``: re-iterable if it has ``rewind()``."""
    specs = _check_specs(specs)
    if not callable(getattr(reader, "get_next", None)):
        raise UserError(f"{type(reader).__name__} is not a CalibrationDataReader (it has no get_next())")
    label = f"{type(reader).__name__} (CalibrationDataReader)"
    rewind = getattr(reader, "rewind", None)

    def read_all() -> Iterator[Any]:
        while True:
            item = reader.get_next()
            if item is None:
                return
            yield item

    if callable(rewind):

        def open_items() -> Iterable[Any]:
            rewind()
            return read_all()

    else:
        open_items = _one_shot(read_all(), label)
    return CalibrationData(specs, lambda: _numbered(open_items(), label, "from"), description=label, limit=limit,
        kind="ort-reader",
    )


def as_ort_reader(data: CalibrationData, *, batch_size: int = 1):
    """An onnxruntime ``CalibrationDataReader`` over ``data`` (for ``quantize_static``)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _CalibrationDataReader(CalibrationDataReader):
        """Streams ``data.batches(batch_size)``; supports rewind(), len() and set_range()."""

        def __init__(self) -> None:
            self.data = data
            self.batch_size = batch_size
            self._range: tuple[int, Optional[int]] = (0, None)
            self._batches: Optional[Iterator[Item]] = None

        def get_next(self) -> Optional[Item]:
            if self._batches is None:
                import itertools

                start, stop = self._range
                self._batches = itertools.islice(data.batches(batch_size), start, stop)
            return next(self._batches, None)

        def rewind(self) -> None:
            self._batches = None

        def set_range(self, start_index: int, end_index: int) -> None:
            """Restrict the next pass to batches [start_index, end_index) (CalibStridedMinMax)."""
            self._range = (start_index, end_index)
            self.rewind()

        def __len__(self) -> int:
            samples = data.count()
            if samples is None:
                raise TypeError(f"the number of samples in {data.description} is not known in advance")
            return -(-samples // batch_size)

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    return _CalibrationDataReader()


def random_data(specs: Sequence[TensorSpec], n: int, *, seed: int = 0, batch_size: int = 1) -> CalibrationData:
    """Deterministic random inputs: float ~ N(0, 1), integers in [0, 10), bool ~ fair coin.

    Sample ``i`` depends only on ``(seed, i)``, so it is the same whatever ``batch_size`` or limit.
    """
    specs = _check_specs(specs)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"number of random samples must be a positive integer, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    sample_shapes = {}
    for spec in specs:
        example = f"--input-shape {spec.name}:1x3x224x224"
        if spec.shape is None:
            raise UserError(f"input '{spec.name}' has unknown rank; random data needs a fixed shape ({example})")
        dynamic = [axis for axis, d in enumerate(spec.shape) if axis > 0 and not _is_fixed(d)]
        if dynamic:
            raise UserError(
                f"input '{spec.name}' has dynamic dims ({spec.shape_str()}); random data needs a fixed shape, "
                f"e.g. {example}"
            )
        dtype = np.dtype(spec.dtype)
        if dtype.kind not in "fiub":
            raise UserError(f"cannot generate random data for input '{spec.name}' of dtype {dtype.name}")
        sample_shapes[spec.name] = tuple(int(d) for d in spec.shape[1:])

    def sample(index: int) -> Item:
        rng = np.random.default_rng([seed, index])
        out = {}
        for spec in specs:
            shape, dtype = sample_shapes[spec.name], np.dtype(spec.dtype)
            if dtype.kind == "f":
                out[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
            elif dtype.kind == "b":
                out[spec.name] = rng.random(shape) < 0.5
            else:
                out[spec.name] = rng.integers(0, 10, shape, dtype=dtype)
        return out

    def open_items() -> Iterator[tuple[str, Item]]:
        for start in range(0, n, batch_size):
            samples = [sample(i) for i in range(start, min(n, start + batch_size))]
            yield "random data", {k: np.stack([s[k] for s in samples]) for k in sample_shapes}

    return CalibrationData(specs, open_items, description=f"random data ({_plural(n, 'sample')}, seed {seed})", total=n,
        kind="random",
    )


# --------------------------------------------------------------------------------------------
# CLI glue
# --------------------------------------------------------------------------------------------

_PREPROCESS_FLAGS = ("input_size", "resize_mode", "crop_ratio", "mean", "std", "scale", "bgr", "layout")


def add_data_arguments(parser_or_group) -> None:
    """Add --calib, --calib-size and the image preprocessing flags (all default to None = not given)."""
    if isinstance(parser_or_group, argparse.ArgumentParser):
        group = parser_or_group.add_argument_group(
            "calibration data",
            "Images go through: decode -> RGB (or grayscale for 1-channel inputs) -> resize -> [--bgr swap] -> "
            "x * --scale -> (x - --mean) / --std -> --layout. "
            "Caffe2 SqueezeNet: --resize-mode center-crop --input-size 224 --bgr --mean 104,117,123. "
            "CIFAR ResNet-20: --input-size 32 --scale 1/255 --mean 0.4914,0.4822,0.4465 --std 0.2023,0.1994,0.2010.",
        )
    else:
        group = parser_or_group
    group.add_argument(
        "--calib",
        metavar="PATH",
        help="calibration/validation inputs: .npy, .npz, a folder of .npy/.npz files, or a folder of images. "
        ".npy/.npz arrays are used as-is (one sample or a batch; .npz keys = input names); "
        "images are preprocessed with the flags below",
    )
    group.add_argument(
        "--calib-size",
        metavar="N",
        help="use at most N samples (default: all; some passes use fewer by default)",
    )
    group.add_argument(
        "--input-size",
        metavar="HxW",
        help="image size fed to the model, e.g. 224x224, 224,224 or 224 (square); "
        "default: the model input's fixed height and width",
    )
    group.add_argument(
        "--resize-mode",
        choices=RESIZE_MODES,
        help="stretch (default): resize to HxW ignoring aspect; center-crop: resize the shorter side to "
        "size/--crop-ratio then crop the center (ImageNet style: 256 -> 224); letterbox: keep aspect, pad bottom/right",
    )
    group.add_argument(
        "--crop-ratio",
        metavar="F",
        help="for center-crop: crop size / resized shorter side, in (0, 1] (default 0.875 = 224/256)",
    )
    group.add_argument(
        "--mean",
        metavar="a,b,c",
        help="subtracted after --scale, per channel in the model's channel order (B,G,R with --bgr), or one value; "
        "e.g. 104,117,123 (Caffe, BGR, 0-255 pixels) or 0.4914,0.4822,0.4465 (CIFAR, with --scale 1/255); default 0",
    )
    group.add_argument(
        "--std",
        metavar="a,b,c",
        help="divides after subtracting --mean, per channel or one value; e.g. 0.2023,0.1994,0.2010 (CIFAR); default 1",
    )
    group.add_argument(
        "--scale",
        metavar="F",
        help="pixels (0-255) are multiplied by this first, e.g. 1/255 to get 0-1 (default 1)",
    )
    group.add_argument(
        "--bgr",
        action="store_true",
        default=None,
        help="feed channels in B,G,R order (Caffe/OpenCV-trained models); applied before --scale/--mean/--std",
    )
    group.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="model input layout: nchw, nhwc, or auto (default): nhwc when the input's last dim holds "
        "1-4 channels and dim 1 does not ([N, H, W, 3], as TensorFlow models take images), else nchw",
    )


def _parse_float(text: str, flag: str, allow_fraction: bool = False) -> float:
    text = str(text).strip()
    try:
        value = float(Fraction(text)) if allow_fraction and "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        example = " or a fraction like 1/255" if allow_fraction else ""
        raise UserError(f"{flag} expects a number{example}, got {text!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{flag} expects a finite number, got {text!r}")
    return value


def _parse_floats(text: str, flag: str) -> tuple[float, ...]:
    parts = [p.strip() for p in str(text).split(",")]
    if any(not p for p in parts):
        raise UserError(f"{flag} expects comma-separated numbers like 0.485,0.456,0.406, got {text!r}")
    return tuple(_parse_float(p, flag) for p in parts)


def parse_input_size(text: str) -> tuple[int, int]:
    """'224x224', '224,224' or '224' -> (H, W)."""
    raw = str(text).strip().lower()
    parts = raw.split("x") if "x" in raw else raw.split(",")
    if len(parts) == 1:
        parts = parts * 2
    try:
        height, width = (int(p.strip()) for p in parts)
    except ValueError:
        raise UserError(f"--input-size expects HxW like 224x224 (or 224 for square), got {text!r}") from None
    if height <= 0 or width <= 0:
        raise UserError(f"--input-size needs positive height and width, got {text!r}")
    return height, width


def preprocess_from_args(args: argparse.Namespace) -> ImagePreprocess:
    """ImagePreprocess from parsed flags; flags left out keep the dataclass defaults."""
    options: dict[str, Any] = {}
    if getattr(args, "input_size", None) is not None:
        options["size"] = parse_input_size(args.input_size)
    if getattr(args, "resize_mode", None) is not None:
        options["resize_mode"] = args.resize_mode
    if getattr(args, "crop_ratio", None) is not None:
        ratio = _parse_float(args.crop_ratio, "--crop-ratio", allow_fraction=True)
        if not 0 < ratio <= 1:
            raise UserError(f"--crop-ratio must be in (0, 1], e.g. 0.875, got {args.crop_ratio!r}")
        options["crop_ratio"] = ratio
    if getattr(args, "mean", None) is not None:
        options["mean"] = _parse_floats(args.mean, "--mean")
    if getattr(args, "std", None) is not None:
        std = _parse_floats(args.std, "--std")
        if any(s == 0 for s in std):
            raise UserError(f"--std must not contain 0, got {args.std!r}")
        options["std"] = std
    if getattr(args, "scale", None) is not None:
        scale = _parse_float(args.scale, "--scale", allow_fraction=True)
        if scale <= 0:
            raise UserError(f"--scale must be positive, e.g. 1/255, got {args.scale!r}")
        options["scale"] = scale
    if getattr(args, "bgr", None):
        options["bgr"] = True
    if getattr(args, "layout", None) is not None:
        options["layout"] = args.layout
    return ImagePreprocess(**options)


def data_from_args(args: argparse.Namespace, specs: Sequence[TensorSpec], *, flag: str = "calib") -> Optional[CalibrationData]:
    """The --calib data, or with ``flag="val"`` the --val data (None when not given), read with
    the same preprocessing flags. Preprocessing flags with array data are an error: silently
    ignoring a --mean the user believes is applied would corrupt calibration. --calib-size only
    limits --calib."""
    calib = getattr(args, flag, None)
    if not calib:
        return None
    limit = None
    if flag == "calib" and getattr(args, "calib_size", None) is not None:
        text = str(args.calib_size).strip()
        try:
            limit = int(text)
        except ValueError:
            raise UserError(f"--calib-size expects a positive number of samples, got {text!r}") from None
        if limit <= 0:
            raise UserError(f"--calib-size expects a positive number of samples, got {text!r}")
    preprocess = preprocess_from_args(args)
    data = from_path(calib, specs, preprocess=preprocess, limit=limit)
    given = [f for f in _PREPROCESS_FLAGS if getattr(args, f, None) not in (None, False)]
    if given and data.kind != "images":
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise UserError(
            f"{calib}: {flags} only apply to images, but this holds arrays that are fed as-is; "
            f"preprocess the arrays yourself or drop the flags"
        )
    return data

