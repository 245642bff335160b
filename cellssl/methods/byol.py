"""BYOL: Bootstrap Your Own Latent.

Grill et al., *Bootstrap your own latent: A new approach to self-supervised learning*,
arXiv:2006.07733 (NeurIPS 2020). An online network (backbone f, projector g, predictor q)
predicts the embedding a slowly moving EMA target (f', g') gives to another view of the same
image; there are no negatives, the predictor and the EMA keep it from collapsing.

    L = (1 / M(M−1)) Σ_{i≠j} (2 − 2 cos(q(z_i), sg(z'_j)))

For M = 2 this is the symmetrised loss of the paper's eq. (2)–(4) (averaged over the two
directions instead of summed, so L ∈ [0, 4]); for M > 2 every ordered pair of distinct
views is used, which is the usual multi-crop generalisation.

Example::

    p = torch.randn(8, 2, 256)       # online predictions, B images × M views × D
    zt = torch.randn(8, 2, 256)      # target projections
    byol_loss(p, zt)                 # scalar in [0, 4]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cellssl.config import MethodConfig
from cellssl.methods.base import SSLMethod, check_shape, register_method, stack_views


def byol_loss(p: Tensor | list[Tensor], z_target: Tensor | list[Tensor]) -> Tensor:
    """BYOL regression loss averaged over all ordered pairs of distinct views (arXiv:2006.07733 eq. 2).

    Args:
        p: online predictions q(g(f(x))), ``(B, M, D)`` or a list of M tensors ``(B, D)``.
        z_target: target projections g'(f'(x)) of the same views, same shape; detached here,
            so no gradient ever reaches the target.

    Returns:
        Scalar ``(1 / B·M(M−1)) Σ_b Σ_{i≠j} (2 − 2 cos(p_bi, z'_bj))`` in float32, in [0, 4]:
        0 when each prediction points along the other views' targets, 4 when opposite.
    """
    p = stack_views(p, "p")
    z_target = stack_views(z_target, "z_target")
    check_shape("z_target", z_target, like=p)
    with torch.autocast(device_type=p.device.type, enabled=False):
        p_hat = F.normalize(p.float(), dim=-1)
        zt_hat = F.normalize(z_target.detach().float(), dim=-1)
        m = p.shape[1]
        # cos(p_i, z'_j) summed over all i, j minus the i = j terms
        all_pairs = (p_hat.sum(dim=1) * zt_hat.sum(dim=1)).sum(dim=-1)  # (B,)
        same_view = (p_hat * zt_hat).sum(dim=(1, 2))  # (B,)
        mean_cos = (all_pairs - same_view) / (m * (m - 1))
        return (2 - 2 * mean_cos).mean()


@dataclass
class BYOLSettings(MethodConfig):
    """BYOL's recipe settings: only the EMA momentum every method shares (``momentum_base``, ``momentum_end``)."""


@register_method("byol", settings=BYOLSettings)
class BYOL(SSLMethod):
    """BYOL (arXiv:2006.07733): backbone + projector + predictor, EMA target.

    Recipe settings (``method.*``, :class:`BYOLSettings`): ``momentum_base``/``momentum_end`` (τ rises on a cosine
    schedule, applied by :meth:`SSLMethod.after_step`). The paper uses τ_base = 0.996 for
    ImageNet; the shared default 0.99 suits shorter runs.
    """

    uses_target = True
    uses_predictor = True

    def forward(self, views: Tensor) -> dict[str, Tensor]:
        """Losses for views ``(B, M, C, H, W)``, M ≥ 2.

        Returns ``loss`` (= ``loss_byol``), ``loss_byol`` (detached) and ``z`` (detached online
        projections ``(B·M, D)``, view-major).
        """
        x, b, m = self.flatten_views(views)
        z_flat = self.online(x)
        p_flat = self.predictor(z_flat)
        zt_flat = self.target_embedding(x, z_flat)
        loss = byol_loss(self.unflatten(p_flat, b, m), self.unflatten(zt_flat, b, m))
        return {"loss": loss, "loss_byol": loss.detach(), "z": z_flat.detach()}
