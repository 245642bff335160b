"""Orientation-averaged features: a cell's type does not depend on how it lies on the slide.

A backbone trained with random rotations and flips (``views.rotate``, ``views.flip``) is pushed
towards orientation invariance but never reaches it: the features of a cell and of the same cell
turned by 90° still differ. Averaging the features over the 8 orientations of the dihedral group
D4 (4 quarter turns, each with and without a mirror) makes them exactly invariant to those:

    f̄(x) = 1/8 · Σ_{g ∈ D4} f(g · x)

This is test-time augmentation restricted to the symmetries the views were trained on, so it adds
no assumption the pretraining did not already make. It costs 8 forward passes per image. On the
blood-smear benchmark (docs/tuning.md, "Evaluation: orientation-averaged features") it raised the
PBC val linear probe of a 20-minute ``blood_smear`` checkpoint from 0.871 to 0.910.

Written by hand: timm's test-time augmentation wraps a classifier's logits and knows flips only;
this averages backbone features (what every probe, few-shot episode and saved classifier reads).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cellssl.config import TTA_CHOICES, Recipe
from cellssl.errors import ConfigError

__all__ = ["TTA_CHOICES", "D4_SIZE", "dihedral", "orientation_mean", "resolve_tta"]

D4_SIZE = 8  # |D4|: 4 quarter turns × {as is, mirrored}


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th element (0-7) of D4 applied to images ``x`` (..., H, W): a turn by ``k % 4``
    quarter turns, then a mirror (left-right) when ``k >= 4``. ``k = 0`` is the identity.

    Square images keep their shape; a non-square one swaps H and W on odd turns.
    """
    if not 0 <= k < D4_SIZE:
        raise ValueError(f"dihedral: k={k} is not in 0..{D4_SIZE - 1}")
    turns = k % 4  # torch.rot90(x, turns, (-2, -1)), written with transpose and flip: ONNX has no rot90
    if turns == 1:
        y = x.transpose(-2, -1).flip(-2)
    elif turns == 2:
        y = x.flip(-2, -1)
    elif turns == 3:
        y = x.transpose(-2, -1).flip(-1)
    else:
        y = x
    return y.flip(-1) if k >= 4 else y


def orientation_mean(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str) -> torch.Tensor:
    """Features ``fn(x)`` (B, C, H, W) -> (B, F), averaged over D4 when ``tta == "dihedral"``:
    ``1/8 Σ_k fn(dihedral(x, k))`` (8 forward passes of B images, so the peak memory stays that of
    one); ``"none"``: ``fn(x)`` as is. Features of any shape (B, ...) are flattened to (B, F)."""
    if tta not in ("none", "dihedral"):
        raise ValueError(f"orientation_mean: tta={tta!r} is not 'none' or 'dihedral' (resolve 'auto' first)")

    def flat(f: torch.Tensor) -> torch.Tensor:
        return f.flatten(1) if f.ndim != 2 else f

    if tta == "none":
        return flat(fn(x))
    total = flat(fn(x)).float()
    for k in range(1, D4_SIZE):
        total = total + flat(fn(dihedral(x, k))).float()
    return total / D4_SIZE


def resolve_tta(tta: str | None, recipe: Recipe, *, pixels: bool = False) -> str:
    """The orientation averaging to use: ``tta`` (``auto`` | ``none`` | ``dihedral``; None = the
    recipe's ``eval.tta``). ``auto`` is ``dihedral`` when the recipe's views both rotate and flip (the
    model was trained to ignore orientation), else ``none``. Raw pixels (``pixels``) are the plain
    reference: ``auto`` keeps them as they are."""
    choice = tta or recipe.eval.tta
    if choice not in TTA_CHOICES:
        raise ConfigError(f"tta {choice!r} is not one of {', '.join(TTA_CHOICES)}")
    if choice != "auto":
        return choice
    return "dihedral" if recipe.views.rotate and recipe.views.flip and not pixels else "none"
