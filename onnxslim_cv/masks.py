"""Weight masks as files: export the zero pattern of a sparsified model, apply it to another.

A mask is a boolean array of its weight's own shape (True = kept), keyed by initializer name
(see :mod:`onnxslim_cv.sparsity`). Applying one model's masks to another model of the same
architecture is how a lottery ticket is rewound to its initial weights (Frankle & Carbin,
ICLR 2019), and how a fine-tuned model keeps the zeros of the pruned one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import onnx_graphsurgeon as gs

from .errors import UserError
from .ir import Model
from .model_io import write_atomically
from .sparsity import SparseLayer, sparsifiable_layers, sparsity_of

PathLike = Union[str, os.PathLike]

# Initializer names ("/backbone/Conv_output_0", "a:b") make awkward zip member names, so
# arrays are stored as mask_0, mask_1, ... with their names in one string array.
_NAMES_KEY = "__names__"


def save_masks(masks: Dict[str, np.ndarray], path: PathLike) -> Path:
    """Write ``masks`` as a compressed .npz atomically (temp file in the same folder, rename)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"masks folder '{parent}' does not exist")
    arrays = {f"mask_{i}": np.asarray(mask, dtype=bool) for i, mask in enumerate(masks.values())}
    arrays[_NAMES_KEY] = np.array(list(masks), dtype=str)
    # a file object: np.savez would append ".npz" to a name
    return write_atomically(path, lambda handle: np.savez_compressed(handle, **arrays), binary=True)


def load_masks(path: PathLike) -> Dict[str, np.ndarray]:
    """Read masks written by :func:`save_masks` (or a plain .npz of name -> 0/1 arrays)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"masks file '{path}' does not exist")
    if path.is_dir():
        raise UserError(f"masks file '{path}' is a folder, not an .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise UserError(f"masks file '{path}' is a single .npy array, not an .npz of masks")
        with archive:
            raw = {key: archive[key] for key in archive.files}
    except UserError:
        raise
    except Exception as exc:  # not a zip, a damaged member, pickled objects...
        raise UserError(f"masks file '{path}' is not a readable .npz file ({_first_line(exc)})")
    if _NAMES_KEY in raw:
        names = [str(n) for n in np.asarray(raw.pop(_NAMES_KEY)).reshape(-1)]
        if sorted(raw) != sorted(f"mask_{i}" for i in range(len(names))):
            raise UserError(f"masks file '{path}' is damaged: its name list does not match its arrays")
        raw = {name: raw[f"mask_{i}"] for i, name in enumerate(names)}
    if not raw:
        raise UserError(f"masks file '{path}' holds no masks")
    masks: Dict[str, np.ndarray] = {}
    for name, array in raw.items():
        if array.dtype == bool:
            masks[name] = array
        elif array.dtype.kind in "iu" and np.isin(array, (0, 1)).all():
            masks[name] = array.astype(bool)
        else:
            kind = f"{array.dtype} values" if array.dtype.kind not in "iu" else "integers other than 0 and 1"
            raise UserError(f"mask '{name}' in '{path}' holds {kind}; masks must be boolean (or 0/1 integers)")
    return masks


def masks_from_model(model: Model, layers: Optional[Sequence[SparseLayer]] = None) -> Dict[str, np.ndarray]:
    """The non-zero pattern of each sparsifiable layer's weight, skipping weights without zeros."""
    if layers is None:
        layers, _ = sparsifiable_layers(model, include_depthwise=True, include_first=True, include_last=True)
    tensors = model.tensors()
    masks: Dict[str, np.ndarray] = {}
    for layer in layers:
        keep = np.asarray(tensors[layer.weight].values) != 0
        if not keep.all():
            masks[layer.weight] = keep
    return masks


def _weights(model: Model) -> Dict[str, gs.Constant]:
    """Float constants by name: what a mask may apply to."""
    return {t.name: t for t in model.constants() if np.asarray(t.values).dtype.kind == "f"}


def check_masks(model: Model, masks: Dict[str, np.ndarray]) -> None:
    """UserError naming the first mask that does not fit ``model`` (unknown name or shape)."""
    weights = _weights(model)
    for name, mask in masks.items():
        tensor = weights.get(name)
        if tensor is None:
            examples: List[str] = [n for n, t in weights.items() if np.ndim(t.values) >= 2][:3] or list(weights)[:3]
            raise UserError(
                f"mask '{name}' matches no weight of the model; its weights are e.g. {', '.join(examples) or '(none)'}"
            )
        shape = list(np.shape(tensor.values))
        if list(np.shape(mask)) != shape:
            raise UserError(f"mask '{name}' has shape {list(np.shape(mask))} but the weight has {shape}")


def apply_masks(model: Model, masks: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Zero the masked-out weights of ``model``; returns each masked weight's resulting sparsity.

    Each weight gets a new array (arrays are shared between :meth:`Model.copy` copies); a
    weight read by several nodes is masked for all of them, since masks key on the weight.
    """
    check_masks(model, masks)
    weights = _weights(model)
    result: Dict[str, float] = {}
    for name, mask in masks.items():
        tensor = weights[name]
        values = np.asarray(tensor.values)
        tensor.values = np.where(np.asarray(mask, dtype=bool), values, np.zeros((), values.dtype)).astype(values.dtype)
        result[name] = sparsity_of(tensor.values)
    return result


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]
