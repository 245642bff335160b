"""MSBReg: multi-view centroid, singular-value and Brownian diffusive losses.

Moon, Buracas, Park, Kim, Canny, *An Embedding-Dynamic Approach to Self-supervised Learning*,
arXiv:2207.03552 (WACV 2023). No official code is public; the equations follow the paper's
description as written down in the project's ``msbreg.md`` (choices the paper leaves open are
recipe settings). Embeddings are particles moved by three forces:

1. attraction — the multi-view centroid loss pulls the centroid of an image's online
   predictions towards the centroid of the target's embeddings of its views;
2. global dispersion — the singular-value loss flattens the spectrum of the batch covariance;
3. local dispersion — the Brownian diffusive loss kicks each embedding in a fresh random
   direction every step.

    L = λ_MC · L_MC + λ_SV · L_SV + λ_BD · L_BD

Example::

    p = torch.randn(8, 4, 256)          # online predictions, N images × M views × D
    zt = torch.randn(8, 4, 256)         # target embeddings
    centroid_loss(p, zt)                # scalar
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cellssl.methods.base import SSLMethod, gather_with_grad, register_method


def _check_nmd(name: str, x: Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (N, M, D), got {tuple(x.shape)}")


def centroid_loss(p: Tensor, z_target: Tensor, variant: str = "centroid") -> Tensor:
    """Multi-view centroid loss (attraction), MSBReg §3 / msbreg.md eq. (1).

    Args:
        p: online predictions ``(N, M, D)`` (N images, M views).
        z_target: target embeddings ``(N, M, D)``; detached here, so no gradient reaches the target.
        variant: ``"centroid"``: c_i = mean_m p̂_im, c'_i = mean_m ẑ'_im,
            L = (1/N) Σ_i (2 − 2 cos(c_i, c'_i)).
            ``"per_view"``: each online view to the target centroid of the *other* views,
            L = (1/NM) Σ_im (2 − 2 cos(p̂_im, mean_{m'≠m} ẑ'_im')); with M = 2 this is BYOL's
            symmetric loss.

    Returns:
        Scalar loss in [0, 4].
    """
    _check_nmd("p", p)
    _check_nmd("z_target", z_target)
    if p.shape != z_target.shape:
        raise ValueError(f"p and z_target must have the same shape, got {tuple(p.shape)} and {tuple(z_target.shape)}")
    p_hat = F.normalize(p.float(), dim=-1)
    zt_hat = F.normalize(z_target.detach().float(), dim=-1)
    if variant == "centroid":
        c = p_hat.mean(dim=1)
        ct = zt_hat.mean(dim=1)
        return (2 - 2 * F.cosine_similarity(c, ct, dim=-1)).mean()
    if variant == "per_view":
        m = p.shape[1]
        if m < 2:
            raise ValueError("per_view centroid loss needs at least 2 views")
        others = (zt_hat.sum(dim=1, keepdim=True) - zt_hat) / (m - 1)
        return (2 - 2 * F.cosine_similarity(p_hat, others, dim=-1)).mean()
    raise ValueError(f"unknown centroid variant {variant!r}: use 'centroid' or 'per_view'")


def _normalised_centred(z: Tensor) -> Tensor:
    """Rows L2-normalised then centred over the batch: (B, D) -> (B, D) in float32/64."""
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    zh = F.normalize(z, dim=-1)
    return zh - zh.mean(dim=0, keepdim=True)


def covariance_spectrum(z: Tensor) -> Tensor:
    """Eigenvalues λ_k = s_k² / B of C = ẐᵀẐ / B via singular values (reference path).

    Args:
        z: embeddings ``(B, D)``; rows are normalised and centred first.
    Returns:
        ``(min(B, D),)`` eigenvalues, descending.
    """
    zc = _normalised_centred(z)
    return torch.linalg.svdvals(zc) ** 2 / zc.shape[0]


def singular_value_loss(z: Tensor, eps: float = 1e-4, variant: str = "logdet", method: str = "cholesky") -> Tensor:
    """Singular-value loss (global dispersion), msbreg.md eq. (2).

    Ẑ ∈ R^{B×D}: rows L2-normalised, centred over the batch; C = ẐᵀẐ / B with eigenvalues λ_k.
    The trace Σλ_k ≤ 1 is fixed by the normalisation, so a flat spectrum (embeddings spread
    evenly over all directions) is the minimiser of

        ``"logdet"``: L_SV = −(1/D) Σ_k log(λ_k + ε) = −(1/D) logdet(C + εI)
        ``"flat"``:   L_SV = ‖λ/Σλ − 1/D‖²

    Args:
        z: online embeddings ``(B, D)`` (all views stacked, or one view).
        eps: ε, keeps the log finite for a rank-deficient batch (B < D).
        variant: ``"logdet"`` or ``"flat"``.
        method: for logdet, ``"cholesky"`` (2 Σ log diag chol(C + εI), fast on GPU) or ``"svd"``
            (``torch.linalg.svdvals``, the reference).

    Returns:
        Scalar loss; for logdet, ≥ −log(1/D + ε) with equality for a perfectly flat spectrum.
    """
    if z.ndim != 2:
        raise ValueError(f"z must have shape (B, D), got {tuple(z.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        zc = _normalised_centred(z)
        b, d = zc.shape
        if variant == "flat":
            lam = torch.linalg.svdvals(zc) ** 2 / b
            lam = F.pad(lam, (0, d - lam.shape[0])) if lam.shape[0] < d else lam
            return ((lam / lam.sum().clamp_min(1e-12) - 1.0 / d) ** 2).sum()
        if variant != "logdet":
            raise ValueError(f"unknown singular-value variant {variant!r}: use 'logdet' or 'flat'")
        if method == "svd":
            lam = torch.linalg.svdvals(zc) ** 2 / b
            logs = torch.log(lam + eps)
            n_zero = d - lam.shape[0]  # eigenvalues that are exactly 0 when B < D
            return -(logs.sum() + n_zero * torch.log(torch.tensor(eps, dtype=zc.dtype, device=zc.device))) / d
        cov = zc.T @ zc / b + eps * torch.eye(d, dtype=zc.dtype, device=zc.device)
        chol, info = torch.linalg.cholesky_ex(cov)
        if bool(info.any()):  # numerically indefinite: fall back to eigenvalues
            lam = torch.linalg.eigvalsh(cov).clamp_min(eps)
            return -torch.log(lam).sum() / d
        return -2.0 * torch.log(torch.diagonal(chol)).sum() / d


def sample_brownian_directions(n: int, d: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """Fresh random unit directions r_i ~ N(0, I_D)/‖·‖, one per image: ``(N, D)``.

    Drawn on the CPU from ``generator`` (seeded from the run's seed and saved in checkpoints,
    so a resumed run draws the same kicks), then moved to ``device``.
    """
    r = torch.randn(n, d, generator=generator)
    return F.normalize(r, dim=-1).to(device, non_blocking=True)


def brownian_loss(z: Tensor, r: Tensor) -> Tensor:
    """Brownian diffusive loss (local dispersion), msbreg.md eq. (3).

        L_BD = (1/NM) Σ_{i,m} cos(ẑ_im, r_i)

    Minimising it moves each ẑ_im along the part of −r_i tangent to the unit sphere: with r_i
    fresh every step this is a random walk of each particle (shared by an image's M views).

    Args:
        z: online embeddings ``(N, M, D)``.
        r: directions ``(N, D)`` (unit length), constant w.r.t. the graph.
    Returns:
        Scalar loss in [−1, 1].
    """
    _check_nmd("z", z)
    if r.shape != (z.shape[0], z.shape[2]):
        raise ValueError(f"r must have shape (N, D) = {(z.shape[0], z.shape[2])}, got {tuple(r.shape)}")
    zh = F.normalize(z.float(), dim=-1)
    return (zh * r.detach().float().unsqueeze(1)).sum(dim=-1).mean()


def effective_rank(z: Tensor) -> Tensor:
    """exp(H(λ/Σλ)) of the normalised, centred batch ``(B, D)``: 1 when collapsed, D when flat."""
    with torch.no_grad():
        lam = covariance_spectrum(z.detach().float())
        p = lam / lam.sum().clamp_min(1e-12)
        h = -(p * torch.log(p.clamp_min(1e-12))).sum()
        return torch.exp(h)


@register_method("msbreg")
class MSBReg(SSLMethod):
    """MSBReg (arXiv:2207.03552): online backbone+projector+predictor, EMA target, three losses.

    Recipe settings (``method.*``): ``centroid_weight`` λ_MC, ``sv_weight`` λ_SV,
    ``brownian_weight`` λ_BD, ``centroid_variant``, ``sv_variant``, ``sv_eps``, ``sv_per_view``,
    ``momentum_base``/``momentum_end`` (τ schedule). Setting a weight to 0 switches that force off
    (and skips its computation), which gives the paper's ablation rows; with all dispersion off
    and M = 2 it is BYOL.
    """

    uses_target = True
    uses_predictor = True

    def __init__(self, backbone, model_cfg, cfg) -> None:
        super().__init__(backbone, model_cfg, cfg)
        self.noise = torch.Generator().manual_seed(0)

    def seed(self, seed: int) -> None:
        """Seed the Brownian noise generator (the engine passes the run's seed + rank)."""
        self.noise.manual_seed(int(seed) + 7919)

    def forward(self, views: Tensor) -> dict[str, Tensor]:
        """Losses for a batch of views ``(B, M, C, H, W)``.

        Returns a dict with ``loss`` (weighted total), ``loss_centroid``, ``loss_sv``,
        ``loss_brownian`` and ``z`` (detached online embeddings ``(B·M, D)`` for monitoring).
        """
        cfg = self.cfg
        x, b, m = self.flatten_views(views)
        z_flat = self.online(x)
        p_flat = self.predictor(z_flat)
        zt_flat = self.target(x)
        z = self.unflatten(z_flat, b, m)
        out: dict[str, Tensor] = {}
        zero = z_flat.new_zeros(()).float()
        l_mc = centroid_loss(self.unflatten(p_flat, b, m), self.unflatten(zt_flat, b, m), cfg.centroid_variant)
        l_sv = zero
        if cfg.sv_weight:
            if cfg.sv_per_view:
                l_sv = torch.stack(
                    [singular_value_loss(gather_with_grad(z[:, i]), cfg.sv_eps, cfg.sv_variant) for i in range(m)]
                ).mean()
            else:
                l_sv = singular_value_loss(gather_with_grad(z_flat), cfg.sv_eps, cfg.sv_variant)
        l_bd = zero
        if cfg.brownian_weight:
            r = sample_brownian_directions(b, z.shape[-1], self.noise, z.device)
            l_bd = brownian_loss(z, r)
        out["loss"] = cfg.centroid_weight * l_mc + cfg.sv_weight * l_sv + cfg.brownian_weight * l_bd
        out["loss_centroid"] = l_mc.detach()
        out["loss_sv"] = l_sv.detach()
        out["loss_brownian"] = l_bd.detach()
        out["z"] = z_flat.detach()
        return out

    def extra_state(self) -> dict:
        return {"noise": self.noise.get_state()}

    def load_extra_state(self, state: dict) -> None:
        if "noise" in state:
            self.noise.set_state(state["noise"])
