"""Backbones, heads and the EMA target.

- :mod:`cellssl.models.backbone` — any timm model as a feature extractor, starting weights, the raw-pixel baseline
- :mod:`cellssl.models.heads` — projector and predictor MLPs
- :mod:`cellssl.models.ema` — the EMA target network and its momentum schedule
- :mod:`cellssl.models.bn` — AdaBN: BatchNorm statistics re-estimated on new images
- :mod:`cellssl.models.orientation` — features averaged over a cell's 8 rotations and flips (``eval.tta``)
"""

from cellssl.models.backbone import build_backbone, list_backbones
from cellssl.models.ema import cosine_momentum, ema_update, make_target
from cellssl.models.heads import GlobalBatchNorm1d, gather_with_grad, mlp

__all__ = ["build_backbone", "list_backbones", "cosine_momentum", "ema_update", "make_target", "mlp",
           "GlobalBatchNorm1d", "gather_with_grad"]
