"""The choices and defaults of ``select`` and ``export``, in a module without heavy imports.

The command line builds its options from these (``cellssl --help`` must not load torch), and
:mod:`cellssl.apply.select` / :mod:`cellssl.apply.export` import them from here: one copy of each.
"""

from __future__ import annotations

__all__ = ["STRATEGIES", "EXPORT_FORMATS", "DEFAULT_BUDGET", "DEFAULT_N_CLASSES"]

STRATEGIES = ("typiclust", "probcover", "coreset", "random")  # the first is the default
EXPORT_FORMATS = ("safetensors", "onnx", "both")  # the first is the default
DEFAULT_BUDGET = 40  # cells to select
DEFAULT_N_CLASSES = 8  # expected number of cell types (ProbCover's ball radius)
