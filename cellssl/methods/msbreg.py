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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cellssl.config import MethodConfig, Range, Recipe, setting
from cellssl.errors import ConfigError
from cellssl.methods.base import SSLMethod, check_shape, gather_with_grad, normalised_centred, register_method


def _cos_dist(a_hat: Tensor, b: Tensor) -> Tensor:
    """2 − 2 cos(a, b) along the last dimension (``a_hat`` already unit length)."""
    return 2 - 2 * (a_hat * F.normalize(b, dim=-1)).sum(dim=-1)


def centroid_loss(p: Tensor, z_target: Tensor, variant: str = "per_view", p_local: Tensor | None = None) -> Tensor:
    """Multi-view centroid loss (attraction), MSBReg §3 / msbreg.md eq. (1).

    The online and target sides never contain the same view (except in the ``same_views``
    ablation), so the loss can only be lowered by making views of one image agree.

    Args:
        p: online predictions ``(N, M, D)`` (N images, M global views).
        z_target: target embeddings ``(N, M, D)``; detached here, so no gradient reaches the target.
        variant:
            ``"per_view"`` (default): each online view against the target centroid of the *other*
            views, L = (1/NM) Σ_im (2 − 2 cos(p̂_im, c'_{i,−m})), c'_{i,−m} = mean_{m'≠m} ẑ'_im';
            with M = 2 this is BYOL's symmetric loss.
            ``"halves"``: views split into halves A, B (M even); the online centroid of A against
            the target centroid of B and vice versa, L = (1/2N) Σ_i [d(c_iA, c'_iB) + d(c_iB, c'_iA)];
            with M = 2 it equals ``per_view``.
            ``"same_views"`` (ablation only): online centroid against the target centroid of the
            same views, L = (1/N) Σ_i (2 − 2 cos(mean_m p̂_im, mean_m ẑ'_im)). Each online view
            can predict its own target view and reach 0 without any invariance between views.
        p_local: optional online predictions of local crops ``(N, L, D)`` (multi-crop); each is
            pulled to the target centroid of all M global views, and the global and local terms
            are averaged with weights M and L (every online view counts once).

    Returns:
        Scalar loss in [0, 4].
    """
    check_shape("p", p, ndim=3)
    check_shape("z_target", z_target, like=p)
    n, m, _ = p.shape
    p_hat = F.normalize(p.float(), dim=-1)
    zt_hat = F.normalize(z_target.detach().float(), dim=-1)
    if variant == "per_view":
        if m < 2:
            raise ValueError("the per_view centroid loss needs at least 2 views")
        others = (zt_hat.sum(dim=1, keepdim=True) - zt_hat) / (m - 1)
        loss = _cos_dist(p_hat, others).mean()
    elif variant == "halves":
        if m % 2:
            raise ValueError(f"the halves centroid loss needs an even number of views, got {m}")
        h = m // 2
        ca, cb = F.normalize(p_hat[:, :h].mean(1), dim=-1), F.normalize(p_hat[:, h:].mean(1), dim=-1)
        loss = 0.5 * (_cos_dist(ca, zt_hat[:, h:].mean(1)) + _cos_dist(cb, zt_hat[:, :h].mean(1))).mean()
    elif variant == "same_views":
        loss = _cos_dist(F.normalize(p_hat.mean(dim=1), dim=-1), zt_hat.mean(dim=1)).mean()
    else:
        raise ValueError(f"unknown centroid variant {variant!r}: use 'per_view', 'halves' or 'same_views'")
    if p_local is None or p_local.shape[1] == 0:
        return loss
    check_shape("p_local", p_local, ndim=3)
    if p_local.shape[0] != n or p_local.shape[2] != p.shape[2]:
        raise ValueError(f"p_local must have shape (N, L, D) with N={n}, D={p.shape[2]}, got {tuple(p_local.shape)}")
    n_local = p_local.shape[1]
    local = _cos_dist(F.normalize(p_local.float(), dim=-1), zt_hat.mean(dim=1, keepdim=True)).mean()
    return (m * loss + n_local * local) / (m + n_local)


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
        Scalar float32 loss; for logdet, ≥ −log(1/D + ε) with equality for a perfectly flat spectrum.

    The Cholesky path never reads a value back to the host (no GPU sync, no graph break under
    ``torch.compile``): C + εI is factorised in float64, where it is positive definite for any
    finite batch (its eigenvalues are ≥ ε, its trace ≤ 1 + Dε) down to ε ≈ 1e-12; a factorisation
    that still fails (non-finite embeddings) gives NaN, which the training loop's non-finite guard
    skips and names.
    """
    check_shape("z", z, ndim=2)
    with torch.autocast(device_type=z.device.type, enabled=False):
        zc = normalised_centred(z)
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
        z64 = zc.double()
        cov = z64.T @ z64 / b + eps * torch.eye(d, dtype=torch.float64, device=zc.device)
        chol, info = torch.linalg.cholesky_ex(cov)
        logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
        return torch.where(info == 0, -logdet / d, torch.nan).to(zc.dtype)


def sample_brownian_directions(n: int, d: int, generator: torch.Generator,
                               device: torch.device | str = "cpu") -> Tensor:
    """Fresh random unit directions r_i ~ N(0, I_D)/‖·‖, one per image: ``(N, D)``.

    Drawn on the CPU from ``generator`` (seeded from the run's seed and saved in checkpoints,
    so a resumed run draws the same kicks on any device), then copied to ``device`` (from pinned
    memory to a GPU: an asynchronous copy, no sync).
    """
    r = F.normalize(torch.randn(n, d, generator=generator), dim=-1)
    if torch.device(device).type == "cuda":
        r = r.pin_memory()
    return r.to(device, non_blocking=True)


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
    check_shape("z", z, ndim=3)
    if r.shape != (z.shape[0], z.shape[2]):
        raise ValueError(f"r must have shape (N, D) = {(z.shape[0], z.shape[2])}, got {tuple(r.shape)}")
    zh = F.normalize(z.float(), dim=-1)
    return (zh * r.detach().float().unsqueeze(1)).sum(dim=-1).mean()


def sv_inputs(z: Tensor, mode: str = "per_view") -> list[Tensor]:
    """The batches the singular-value loss is computed on, from online embeddings ``(N, M, D)``.

    ``"per_view"`` (default): the M batches ``z[:, m]`` ``(N, D)``; the loss is their mean, so
    the spread *between* views of one image is never counted as dispersion.
    ``"centroid"``: one batch of per-image centroids mean_m ẑ_im ``(N, D)``.
    ``"stacked"`` (ablation only): one batch of all views ``(N·M, D)``; its gradient pushes views
    of the same image apart, against the attraction.
    """
    check_shape("z", z, ndim=3)
    if mode == "per_view":
        return list(z.unbind(dim=1))
    if mode == "centroid":
        return [F.normalize(z.float(), dim=-1).mean(dim=1)]
    if mode == "stacked":
        return [z.transpose(0, 1).reshape(-1, z.shape[-1])]
    raise ValueError(f"unknown sv_on {mode!r}: use 'per_view', 'centroid' or 'stacked'")


@dataclass
class MSBRegSettings(MethodConfig):
    """MSBReg's recipe settings (``method.*``, docs: shared msbreg.md), besides the EMA momentum."""

    centroid_weight: float = setting(1.0, Range(0), "λ_MC, weight of the multi-view centroid loss (attraction)")
    sv_weight: float = setting(0.1, Range(0), "λ_SV, weight of the singular-value loss (global dispersion)")
    brownian_weight: float = setting(0.1, Range(0), "λ_BD, weight of the Brownian diffusive loss (local dispersion)")
    centroid_variant: str = setting(
        "per_view", doc="per_view: each online view against the target centroid of the other views (msbreg.md "
        "eq. 1); halves: online centroid of one half of the views against the target centroid of the other; "
        "same_views: of the same views (ablation only: satisfiable without invariance)",
        choices=("per_view", "halves", "same_views"))
    sv_variant: str = setting("logdet", doc="logdet: −logdet(C + εI) / D of the batch covariance C (msbreg.md eq. 2); "
                              "flat: ‖λ/Σλ − 1/D‖² of its eigenvalues", choices=("logdet", "flat"))
    sv_eps: float = setting(1e-4, Range(0, lo_open=True), "ε of the logdet form (keeps it finite when B < D)")
    sv_on: str = setting(
        "per_view", doc="per_view: the singular-value loss on each view's batch, averaged; centroid: on the "
        "per-image centroids of the views; stacked: on all views in one batch (ablation only: it rewards "
        "pushing two views of one image apart)", choices=("per_view", "centroid", "stacked"))

    def check(self, recipe: Recipe) -> None:
        """``centroid_variant: halves`` needs an even ``views.n_views``."""
        if self.centroid_variant == "halves" and recipe.views.n_views % 2:
            raise ConfigError(
                f"method.centroid_variant=halves splits the views into two equal halves: views.n_views must be "
                f"even, got {recipe.views.n_views}"
            )


@register_method("msbreg", settings=MSBRegSettings)
class MSBReg(SSLMethod):
    """MSBReg (arXiv:2207.03552): online backbone+projector+predictor, EMA target, three losses.

    Recipe settings (``method.*``, :class:`MSBRegSettings`): ``centroid_weight`` λ_MC, ``sv_weight`` λ_SV,
    ``brownian_weight`` λ_BD, ``centroid_variant`` (per_view | halves | same_views),
    ``sv_on`` (per_view | centroid | stacked), ``sv_variant``, ``sv_eps``,
    ``momentum_base``/``momentum_end`` (τ schedule). Setting a weight to 0 switches that force off
    (and skips its computation), which gives the paper's ablation rows; with all dispersion off
    and M = 2 it is BYOL. Local crops (``views.local_views``, multi-crop) go through the online
    branch only and are pulled to the target centroid of the global views.
    """

    uses_target = True
    uses_predictor = True
    supports_local_views = True
    loss_terms = {"loss_centroid": ("centroid_weight",), "loss_sv": ("sv_weight", "sv_eps", "sv_variant"),
                  "loss_brownian": ("brownian_weight",)}

    cfg: MSBRegSettings

    def __init__(self, backbone, model_cfg, cfg) -> None:
        super().__init__(backbone, model_cfg, cfg)
        self.noise = torch.Generator().manual_seed(0)

    def seed(self, seed: int) -> None:
        """Seed the Brownian noise generator (the engine passes the run's seed + rank)."""
        self.noise.manual_seed(int(seed) + 7919)

    def step_inputs(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        """The step's Brownian directions ``(B, D)`` (when the Brownian force is on), drawn from the
        method's generator: what :meth:`forward` would draw itself, for a compiled forward."""
        if not self.cfg.brownian_weight:
            return {}
        return {"directions": sample_brownian_directions(batch_size, self.proj_dim, self.noise, device)}

    def forward(self, views: Tensor, local: Tensor | None = None,
                directions: Tensor | None = None) -> dict[str, Tensor]:
        """Losses for a batch of global views ``(B, M, C, H, W)`` and optional local crops
        ``(B, L, C, h, w)``; ``directions`` ``(B, D)``: the Brownian kicks (default: drawn here from
        the method's generator; :meth:`step_inputs` draws the same outside a compiled graph).

        Returns a dict with ``loss`` (weighted total), ``loss_centroid``, ``loss_sv``,
        ``loss_brownian`` and ``z`` (detached online embeddings of the global views ``(B·M, D)``).
        """
        cfg = self.cfg
        x, b, m = self.flatten_views(views)
        z_flat = self.online(x)
        p_flat = self.predictor(z_flat)
        zt_flat = self.target_embedding(x, z_flat)
        z = self.unflatten(z_flat, b, m)
        p_local = None
        if local is not None and local.shape[1] > 0:
            xl, _, n_local = self.flatten_views(local)
            p_local = self.unflatten(self.predictor(self.online(xl)), b, n_local)
        out: dict[str, Tensor] = {}
        l_mc = centroid_loss(self.unflatten(p_flat, b, m), self.unflatten(zt_flat, b, m), cfg.centroid_variant,
                             p_local=p_local)
        # A force that is off reports 0, computed from the batch: under torch.compile (torch 2.14) an output
        # made from no input (new_zeros) left the compiled graph's loss without gradient.
        zero = l_mc.detach() * 0
        l_sv = zero
        if cfg.sv_weight:
            batches = sv_inputs(z, cfg.sv_on)
            l_sv = torch.stack([singular_value_loss(gather_with_grad(zb), cfg.sv_eps, cfg.sv_variant)
                                for zb in batches]).mean()
        l_bd = zero
        if cfg.brownian_weight:
            if directions is None:
                directions = sample_brownian_directions(b, z.shape[-1], self.noise, z.device)
            l_bd = brownian_loss(z, directions)
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
