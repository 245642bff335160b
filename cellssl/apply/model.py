"""A trained classifier, ready to run: the one loader of the models ``predict`` and ``export`` take.

A *predictor* is a weights-only checkpoint holding a backbone, a linear head and the classes:
``finetune``'s ``best.pt``, or the ``classifier.pt`` that ``linear`` writes beside its report
(the frozen backbone plus the probe, folded onto L2-normalised features). Both carry the
``unsure`` calibration (:mod:`cellssl.eval.unsure`) and the preprocessing of the recipe they were
trained with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cellssl.config import recipe_from_dict
from cellssl.engine.checkpoint import describe, load_checkpoint, load_state_checked
from cellssl.engine.distributed import resolve_device
from cellssl.errors import CheckpointError
from cellssl.eval.probes import Classifier
from cellssl.models import build_backbone

__all__ = ["Predictor", "resolve_model_path", "load_predictor"]


@dataclass
class Predictor:
    """A classifier ready to run: ``model`` (backbone + head, eval mode, on ``device``), ``classes``
    (K names), ``data_cfg`` (preprocessing), ``in_chans``, ``unsure`` (calibration or None),
    ``native_size`` ((H, W) median of the training images, or (0, 0) unknown), ``info``."""

    model: Classifier
    classes: list[str]
    data_cfg: Any
    in_chans: int
    unsure: dict | None
    native_size: list[int]
    device: torch.device
    info: dict = field(default_factory=dict)


def resolve_model_path(model: str | Path) -> Path:
    """A predictor file, or a folder holding one (``best.pt`` of finetune, ``classifier.pt`` /
    ``*_classifier.pt`` of linear)."""
    p = Path(model)
    if p.is_dir():
        for name in ("best.pt", "classifier.pt"):
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*_classifier.pt"))
        if len(found) == 1:
            return found[0]
        raise CheckpointError(
            f"{p} holds no model to predict with: pass finetune's RUN/best.pt or the classifier.pt that "
            "`cellssl linear` writes beside its report"
            + (f" (found {len(found)} *_classifier.pt: name one)" if found else "")
        )
    if not p.is_file():
        raise CheckpointError(f"model {p} does not exist")
    return p


def load_predictor(model: str | Path, device: str | torch.device = "auto") -> Predictor:
    """Load a predictor (see the module docstring) with ``weights_only=True``; a pretraining
    checkpoint (no classifier) is a one-line error that says how to make one."""
    path = resolve_model_path(model)
    ck = load_checkpoint(path)
    state = ck.get("model") or {}
    if not ck.get("classes") or "head.weight" not in state:
        raise CheckpointError(
            f"{path} has no classifier (a pretraining checkpoint?): fit one on labelled cells with "
            f"`cellssl linear --checkpoint {path} --train LABELLED --split 0.2 --out eval/` "
            "(writes eval/classifier.pt) or `cellssl finetune` (writes RUN/best.pt), then predict with that"
        )
    recipe = recipe_from_dict(ck["config"])
    in_chans = int(ck["in_chans"])
    backbone = build_backbone(recipe.model, in_chans, recipe.data.image_size)
    k, f = state["head.weight"].shape
    net = Classifier(backbone, int(f), int(k), normalize=bool(ck.get("head_normalize", False)),
                     tta=str(ck.get("tta") or "none"))
    load_state_checked(net, {n: v for n, v in state.items() if n.startswith(("backbone.", "head."))},
                       f"classifier ({recipe.model.backbone})", path)
    dev = resolve_device(device)
    data_cfg = copy.deepcopy(recipe.data)
    data_cfg.path = None
    info = {"path": str(path), "kind": ck.get("kind", "finetune"), "description": describe(ck),
            "source": ck.get("source"), "source_description": ck.get("source_description"),
            "backbone": recipe.model.backbone, "image_size": int(data_cfg.image_size), "in_chans": in_chans,
            "val_accuracy": ck.get("val_accuracy"), "tta": net.tta}
    return Predictor(net.to(dev).eval(), list(ck["classes"]), data_cfg, in_chans, ck.get("unsure"),
                     list(ck.get("native_size") or [0, 0]), dev, info)
