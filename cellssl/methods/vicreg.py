"""VICReg: variance-invariance-covariance regularisation.

Bardes, Ponce, LeCun, *VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning*, arXiv:2105.04906 (ICLR 2022). Two branches share backbone and
expander (Linear-BN-ReLU-Linear here); collapse is prevented by explicit batch statistics:

    ℓ(Z, Z') = λ s(Z, Z') + μ [v(Z) + v(Z')] / 2 + ν [c(Z) + c(Z')]        (eq. 6)

with s the mean squared error (eq. 5), v the hinge on each dimension's standard deviation
(eq. 1–2) and c the sum of squared off-diagonal covariances over d (eq. 3–4). The halving of
the variance sum follows the official code (facebookresearch/vicreg), for which the paper's
weights λ = μ = 25, ν = 1 were tuned. For M > 2 views the loss (and each term) is averaged
over the M(M−1)/2 pairs of views.

Example::

    za, zb = torch.randn(64, 128), torch.randn(64, 128)
    vicreg_loss(za, zb)   # scalar
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cellssl.config import MethodConfig, Range, setting
from cellssl.methods.base import SSLMethod, check_shape, gather_with_grad, off_diagonal, pair_mean, register_method


def invariance_loss(z_a: Tensor, z_b: Tensor) -> Tensor:
    """s(Z, Z') = (1 / B·D) Σ_b ‖z_b − z'_b‖² — the mean squared error (arXiv:2105.04906 eq. 5).

    Args:
        z_a, z_b: embeddings of two views ``(B, D)``, row b of each from the same image.
    Returns:
        Scalar float32.
    """
    check_shape("z_a", z_a, ndim=2)
    check_shape("z_b", z_b, ndim=2)
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        return F.mse_loss(z_a.float(), z_b.float())


def variance_loss(z: Tensor, eps: float = 1e-4, gamma: float = 1.0) -> Tensor:
    """v(Z) = (1/D) Σ_j max(0, γ − sqrt(Var(z_·j) + ε)) (arXiv:2105.04906 eq. 1–2).

    Args:
        z: embeddings ``(B, D)``, B ≥ 2; the variance is the unbiased batch variance.
        eps: ε, keeps the gradient of the square root finite at zero variance.
        gamma: γ, the target standard deviation.
    Returns:
        Scalar float32 in [0, γ]: 0 when every dimension has std ≥ γ, ≈ γ when collapsed.
    """
    check_shape("z", z, ndim=2)
    with torch.autocast(device_type=z.device.type, enabled=False):
        std = torch.sqrt(z.float().var(dim=0) + eps)
        return F.relu(gamma - std).mean()


def covariance_loss(z: Tensor) -> Tensor:
    """c(Z) = (1/D) Σ_{i≠j} C(Z)_ij², C(Z) = (1/(B−1)) Σ_b (z_b − z̄)(z_b − z̄)ᵀ (eq. 3–4).

    Args:
        z: embeddings ``(B, D)``, B ≥ 2.
    Returns:
        Scalar float32 ≥ 0: 0 when the dimensions are uncorrelated over the batch.
    """
    check_shape("z", z, ndim=2)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        b, d = z.shape
        zc = z - z.mean(dim=0, keepdim=True)
        cov = zc.T @ zc / (b - 1)
        return off_diagonal(cov).pow(2).sum() / d


ViewStats = tuple[Tensor, Tensor]  # (v(Z), c(Z)) of one view


def view_statistics(z: Tensor) -> ViewStats:
    """(v(Z), c(Z)) of one view's embeddings ``(B, D)``: the per-view half of :func:`vicreg_terms`."""
    return variance_loss(z), covariance_loss(z)


def vicreg_terms(z_a: Tensor, z_b: Tensor,
                 stats: tuple[ViewStats, ViewStats] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Unweighted (s(Z, Z'), [v(Z) + v(Z')] / 2, c(Z) + c(Z')) for two views ``(B, D)``.

    ``stats``: each view's :func:`view_statistics` when already computed (with M > 2 views every
    view is in M − 1 pairs; its O(B·D²) covariance is then computed once, not once per pair)."""
    (v_a, c_a), (v_b, c_b) = stats if stats is not None else (view_statistics(z_a), view_statistics(z_b))
    return invariance_loss(z_a, z_b), (v_a + v_b) / 2, c_a + c_b


def vicreg_loss(z_a: Tensor, z_b: Tensor, sim: float = 25.0, var: float = 25.0, cov: float = 1.0) -> Tensor:
    """VICReg loss of two views (arXiv:2105.04906 eq. 6, official-code variance halving).

    Args:
        z_a, z_b: expander outputs ``(B, D)`` of two views of the same B images.
        sim, var, cov: λ, μ, ν (paper defaults 25, 25, 1).
    Returns:
        Scalar float32 ``λ s + μ (v_a + v_b)/2 + ν (c_a + c_b)``.
    """
    return vicreg_weighted(*vicreg_terms(z_a, z_b), sim, var, cov)


def vicreg_weighted(s: Tensor, v: Tensor, c: Tensor, sim: float, var: float, cov: float) -> Tensor:
    """λ s + μ v + ν c: the terms of :func:`vicreg_terms` (or their means over pairs of views) weighted."""
    return sim * s + var * v + cov * c


@dataclass
class VICRegSettings(MethodConfig):
    """VICReg's loss weights (``method.*``; arXiv:2105.04906 eq. 6, the paper's defaults)."""

    vicreg_sim: float = setting(25.0, Range(0), "λ, weight of the invariance term s (mean squared error)")
    vicreg_var: float = setting(25.0, Range(0), "μ, weight of the variance hinge [v(Z) + v(Z')] / 2")
    vicreg_cov: float = setting(1.0, Range(0), "ν, weight of the covariance term c(Z) + c(Z')")


@register_method("vicreg", settings=VICRegSettings)
class VICReg(SSLMethod):
    """VICReg (arXiv:2105.04906): backbone + expander, no predictor, no target.

    Recipe settings (``method.*``, :class:`VICRegSettings`): ``vicreg_sim`` λ, ``vicreg_var`` μ,
    ``vicreg_cov`` ν. The terms are :func:`vicreg_terms` of the batch gathered across DDP ranks
    (the variance and covariance statistics as the official code takes them; the invariance term,
    a mean over images, is then the same on every rank).
    """

    uses_target = False
    uses_predictor = False
    loss_terms = {"loss_invariance": ("vicreg_sim",), "loss_variance": ("vicreg_var",),
                  "loss_covariance": ("vicreg_cov",)}
    cfg: VICRegSettings

    def forward(self, views: Tensor) -> dict[str, Tensor]:
        """Losses for views ``(B, M, C, H, W)``, M ≥ 2, averaged over the pairs of views.

        Returns ``loss`` (weighted total), ``loss_invariance``, ``loss_variance``,
        ``loss_covariance`` (unweighted, detached) and ``z`` (detached ``(B·M, D)``, view-major).
        """
        cfg = self.cfg
        x, b, m = self.flatten_views(views, min_views=2)
        z_flat = self.online(x)
        z = self.unflatten(z_flat, b, m)
        zg = [gather_with_grad(z[:, i].contiguous()) for i in range(m)]
        per_view = [(zi, view_statistics(zi)) for zi in zg]  # each view's v and c once, shared by its pairs
        l_inv, l_var, l_cov = pair_mean(lambda a, b: vicreg_terms(a[0], b[0], stats=(a[1], b[1])), per_view)
        loss = vicreg_weighted(l_inv, l_var, l_cov, cfg.vicreg_sim, cfg.vicreg_var, cfg.vicreg_cov)
        return {
            "loss": loss,
            "loss_invariance": l_inv.detach(),
            "loss_variance": l_var.detach(),
            "loss_covariance": l_cov.detach(),
            "z": z_flat.detach(),
        }
