"""Descriptions of model inputs shared by loading, calibration and verification."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np

Dim = Union[int, str, None]
"""A dimension: a fixed size, a symbolic name (dynamic), or None (unknown)."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a graph input or output.

    ``shape`` holds ints for fixed dims and a str (the symbolic name) or None for dynamic ones;
    ``shape`` itself is None when the rank is unknown.
    """

    name: str
    shape: Optional[Tuple[Dim, ...]]
    dtype: np.dtype

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) and d >= 0 for d in self.shape)

    def shape_str(self) -> str:
        if self.shape is None:
            return "?"
        return "x".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
