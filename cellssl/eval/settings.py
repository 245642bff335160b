"""The choices and defaults of the evaluation commands, in a module without heavy imports.

The command line builds its options from these (``cellssl --help`` must not load torch), and the
modules that use them import them from here: one copy of each.
"""

from __future__ import annotations

__all__ = ["FEWSHOT_CLASSIFIERS", "EMBED_FORMATS", "PREDICT_FORMATS", "DEFAULT_TARGET_ERROR", "DEFAULT_OOD_QUANTILE",
           "DEFAULT_PART_ROWS"]

FEWSHOT_CLASSIFIERS = ("prototype", "logreg")  # SimpleShot nearest centroid, logistic regression
EMBED_FORMATS = ("npz", "h5ad", "parquet")  # what `embed` writes
PREDICT_FORMATS = ("csv", "parquet")  # what `predict` writes (parquet: beside the csv)
DEFAULT_TARGET_ERROR = 0.05  # error allowed among the confident validation cells (the unsure threshold)
DEFAULT_OOD_QUANTILE = 0.99  # quantile of the validation cells' distances above which a cell is unlike them
DEFAULT_PART_ROWS = 65_536  # embed and predict write a larger set in parts of this many rows (resumable; docs/scale.md)
