"""Compression passes. Each module defines one pass and registers it by name.

Installed as ``onnxslim_cv.passes`` (see ``[tool.setuptools.package-dir]``); import order is
the order ``onnxslim-cv --help`` and ``demo`` list them in.
"""

from . import fold  # noqa: F401
from . import prune  # noqa: F401
from . import sparsify  # noqa: F401
from . import lowrank  # noqa: F401
from . import quant  # noqa: F401
