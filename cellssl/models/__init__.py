"""Backbones, heads and the EMA target."""

from cellssl.models.backbone import build_backbone, list_backbones
from cellssl.models.ema import cosine_momentum, ema_update, make_target
from cellssl.models.heads import GlobalBatchNorm1d, gather_with_grad, mlp

__all__ = ["build_backbone", "list_backbones", "cosine_momentum", "ema_update", "make_target", "mlp",
           "GlobalBatchNorm1d", "gather_with_grad"]
