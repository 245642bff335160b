"""Barlow Twins: redundancy reduction through the cross-correlation matrix.

Zbontar, Jing, Misra, LeCun, Deny, *Barlow Twins: Self-Supervised Learning via Redundancy
Reduction*, arXiv:2103.03230 (ICML 2021). The embeddings of two views are standardised per
dimension over the batch and their cross-correlation matrix C (D × D) is pushed towards the
identity:

    C_ij = Σ_b ẑ^A_bi ẑ^B_bj / B,   ẑ = (z − mean_b z) / std_b z
    L = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij²                              (eq. 1–2)

with λ = 0.0051 (paper default). The standardisation is the paper's batch norm without
affine parameters, done inside the loss (biased batch variance, ε = 1e-5 as in BatchNorm1d);
over a DDP-gathered batch this equals the official all-reduced C with synchronised BN. For
M > 2 views the loss (and each term) is averaged over the M(M−1)/2 pairs of views.

Example::

    za, zb = torch.randn(64, 128), torch.randn(64, 128)
    barlow_loss(za, zb)   # scalar
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from cellssl.config import MethodConfig, Range, setting
from cellssl.methods.base import SSLMethod, check_shape, gather_with_grad, off_diagonal, pair_mean, register_method


def standardise(z: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-dimension batch standardisation ``(z − mean) / sqrt(var + ε)`` (biased var): (B, D) -> (B, D)."""
    check_shape("z", z, ndim=2)
    z = z.float()
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def cross_correlation(z_a: Tensor, z_b: Tensor, eps: float = 1e-5) -> Tensor:
    """C = ẑ_aᵀ ẑ_b / B of the standardised embeddings ``(B, D)`` -> ``(D, D)`` in float32."""
    check_shape("z_a", z_a, ndim=2)
    check_shape("z_b", z_b, like=z_a)
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        return standardise(z_a, eps).T @ standardise(z_b, eps) / z_a.shape[0]


def barlow_terms(z_a: Tensor, z_b: Tensor, lambd: float = 0.0051) -> tuple[Tensor, Tensor]:
    """(on-diagonal Σ_i (1 − C_ii)², weighted off-diagonal λ Σ_{i≠j} C_ij²) for two views ``(B, D)``."""
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        c = cross_correlation(z_a, z_b)
        diag = torch.diagonal(c)
        on = (1 - diag).pow(2).sum()
        off = off_diagonal(c).pow(2).sum()
        return on, lambd * off


def barlow_loss(z_a: Tensor, z_b: Tensor, lambd: float = 0.0051) -> Tensor:
    """Barlow Twins loss (arXiv:2103.03230 eq. 1–2).

    Args:
        z_a, z_b: projector outputs ``(B, D)`` of two views of the same B images (B ≥ 2).
        lambd: λ, the weight of the redundancy-reduction (off-diagonal) term.
    Returns:
        Scalar float32 ``Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²``: 0 when C is the identity
        (views perfectly correlated dimension-wise, dimensions decorrelated).
    """
    on, off = barlow_terms(z_a, z_b, lambd)
    return on + off


@dataclass
class BarlowSettings(MethodConfig):
    """Barlow Twins' recipe setting (``method.*``; arXiv:2103.03230)."""

    barlow_lambda: float = setting(0.0051, Range(0), "λ, weight of the off-diagonal (redundancy) term")


@register_method("barlow", settings=BarlowSettings)
class BarlowTwins(SSLMethod):
    """Barlow Twins (arXiv:2103.03230): backbone + projector, no predictor, no target.

    Recipe settings (``method.*``, :class:`BarlowSettings`): ``barlow_lambda`` λ. The terms are
    :func:`barlow_terms` of the batch gathered across DDP ranks. The projector ends in a plain Linear:
    the paper's affine-free BN before C is the standardisation inside the loss, so the returned
    ``z`` keeps its real scale for the collapse monitor.
    """

    uses_target = False
    uses_predictor = False
    loss_terms = {"loss_on_diag": (), "loss_off_diag": ("barlow_lambda",)}
    cfg: BarlowSettings

    def forward(self, views: Tensor) -> dict[str, Tensor]:
        """Losses for views ``(B, M, C, H, W)``, M ≥ 2, averaged over the pairs of views.

        Returns ``loss`` (= ``loss_on_diag + loss_off_diag``), ``loss_on_diag``,
        ``loss_off_diag`` (λ-weighted; both detached) and ``z`` (detached ``(B·M, D)``, view-major).
        """
        x, b, m = self.flatten_views(views, min_views=2)
        z_flat = self.online(x)
        z = self.unflatten(z_flat, b, m)
        zg = [gather_with_grad(z[:, i].contiguous()) for i in range(m)]
        l_on, l_off = pair_mean(functools.partial(barlow_terms, lambd=self.cfg.barlow_lambda), zg)
        return {
            "loss": l_on + l_off,
            "loss_on_diag": l_on.detach(),
            "loss_off_diag": l_off.detach(),
            "z": z_flat.detach(),
        }
