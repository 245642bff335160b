"""What every self-supervised method shares: encoder, heads, optional EMA target, registry.

A method is a loss plus its heads, and its settings. The engine calls ``method(views)`` for a
batch of views ``(B, M, C, H, W)`` and gets a dict of scalar losses (``"loss"`` is the one to
minimise, the others are logged), then ``method.after_step(step, total_steps)`` (the EMA update).

Adding a method touches its file, a recipe and a test: the file declares the method's settings
(a dataclass subclassing ``cellssl.config.MethodConfig``, each field made with
``cellssl.config.setting``: default, range or choices, one line of documentation) and registers
both with ``@register_method("name", settings=NameSettings)``. Recipes (``method.name: name``,
``--set method.<field>=...``), their validation and ``cellssl list methods`` read the registry.

Under DDP (W ranks, equal local batches of B/W images) every method is exact, not per rank:
each batch-wide statistic (MSBReg's singular-value spectrum, VICReg's std and covariance, Barlow
Twins' cross-correlation, SimCLR's negatives, the BatchNorm of the heads) is taken over the batch
gathered with ``gather_with_grad`` (gradient kept), and each rank returns a ``loss`` whose mean
over ranks is the single-process loss of the whole batch (a term of a statistic of the gathered
batch is the same on every rank; a per-image term is the mean over the rank's own images). DDP
averages the parameter gradients over ranks, so a step on 2 ranks equals a step on 1 process
(``tests/test_ddp_gradients.py`` checks it for every method). Random inputs (MSBReg's Brownian
directions) are drawn per rank from a per-rank seed: the same distribution, not the same draws.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellssl.config import (
    MethodConfig,
    ModelConfig,
    method_settings,
    register_method_settings,
    unregister_method_settings,
)
from cellssl.errors import ConfigError, did_you_mean
from cellssl.models import cosine_momentum, ema_update, gather_with_grad, make_target, mlp  # noqa: F401 (re-exported)

METHODS: dict[str, type["SSLMethod"]] = {}


def register_method(name: str, settings: type[MethodConfig]) -> Callable[[type["SSLMethod"]], type["SSLMethod"]]:
    """Class decorator adding a method to the registry under ``name``, with its settings dataclass
    (a subclass of :class:`~cellssl.config.MethodConfig` declared beside it): the recipe's
    ``method.*`` keys for this method are the fields of ``settings``."""

    def wrap(cls: type[SSLMethod]) -> type[SSLMethod]:
        register_method_settings(name, settings)
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def unregister_method(name: str) -> None:
    """Remove method ``name`` and its settings from the registries (a method registered for a moment)."""
    METHODS.pop(name, None)
    unregister_method_settings(name)


def build_method(method_cfg: MethodConfig, model_cfg: ModelConfig, backbone: nn.Module) -> "SSLMethod":
    """Instantiate ``method_cfg.name`` around ``backbone`` (which maps (B,C,H,W) to (B,F));
    ``method_cfg`` is that method's settings (``cellssl.config.method_config(name, ...)``)."""
    if method_cfg.name not in METHODS:
        raise ConfigError(
            f"unknown method '{method_cfg.name}'{did_you_mean(method_cfg.name, METHODS)}; "
            f"available: {', '.join(sorted(METHODS))}"
        )
    cls, settings = METHODS[method_cfg.name], method_settings(method_cfg.name)
    if type(method_cfg) is not settings:
        raise TypeError(f"method '{cls.name}' takes {settings.__name__}, got {type(method_cfg).__name__}: "
                        f"build it with cellssl.config.method_config({cls.name!r}, ...)")
    return cls(backbone, model_cfg, method_cfg)


def pair_mean(terms: Callable[[Tensor, Tensor], tuple[Tensor, ...]], zs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Each loss term of ``terms(z_i, z_j)`` averaged over the M(M−1)/2 pairs i < j of the per-view
    embeddings ``zs`` (M tensors ``(B, D)``): how a two-view loss is used with M ≥ 2 views."""
    per_pair = [terms(zs[i], zs[j]) for i, j in itertools.combinations(range(len(zs)), 2)]
    return tuple(torch.stack(term).mean() for term in zip(*per_pair))


def off_diagonal(x: Tensor) -> Tensor:
    """The D(D−1) off-diagonal entries of a square matrix ``(D, D)`` as a flat vector."""
    n = x.shape[0]
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


_SHAPE_NAMES = {2: "(B, D)", 3: "(N, M, D)", 5: "(B, M, C, H, W)"}


def check_shape(name: str, x: Tensor, ndim: int | None = None, like: Tensor | None = None) -> None:
    """The one shape check of the losses: raise ``ValueError`` naming ``name`` and the received
    shape unless ``x`` has ``ndim`` dimensions ((B, D), (N, M, D) or (B, M, C, H, W)) and/or the
    same shape as ``like``."""
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have shape {_SHAPE_NAMES.get(ndim, f'{ndim}-D')}, got {tuple(x.shape)}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} must have the same shape as the first input {tuple(like.shape)}, "
                         f"got {tuple(x.shape)}")


def stack_views(x: Tensor | Sequence[Tensor], name: str, min_views: int = 2) -> Tensor:
    """Per-view embeddings as one ``(N, M, D)`` tensor: a list of M tensors ``(N, D)`` is stacked on
    dim 1; checked with :func:`check_shape` and for at least ``min_views`` views (ValueError)."""
    if isinstance(x, (list, tuple)):
        x = torch.stack(list(x), dim=1)
    check_shape(name, x, ndim=3)
    if x.shape[1] < min_views:
        raise ValueError(f"{name} needs at least {min_views} views, got M = {x.shape[1]}")
    return x


# ----- the batch spectrum: the SV loss and the collapse monitor ------------------------------
def normalised_centred(z: Tensor) -> Tensor:
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
    zc = normalised_centred(z)
    return torch.linalg.svdvals(zc) ** 2 / zc.shape[0]


def effective_rank(z: Tensor) -> Tensor:
    """exp(H(λ/Σλ)) of the normalised, centred batch ``(B, D)``: 1 when collapsed, D when flat."""
    with torch.no_grad():
        lam = covariance_spectrum(z.detach().float())
        p = lam / lam.sum().clamp_min(1e-12)
        h = -(p * torch.log(p.clamp_min(1e-12))).sum()
        return torch.exp(h)


class SSLMethod(nn.Module):
    """Base class: backbone + projector (+ predictor) (+ EMA target of backbone + projector).

    Attributes:
        backbone: (B, C, H, W) -> (B, F).
        projector: (B, F) -> (B, D), D = ``model_cfg.proj_dim``.
        predictor: (B, D) -> (B, D) or None.
        target_backbone / target_projector: frozen EMA copies, or None.
    """

    name = "base"
    uses_target = False
    uses_predictor = False
    supports_local_views = False  # multi-crop: small local crops through the online branch
    channels_last = False  # the backbone sees channels-last batches (use_channels_last)
    target_dtype: torch.dtype | None = None  # the target's forward under this autocast (use_target_dtype)
    # Each logged loss term -> the settings fields that weight or shape it (named when it goes non-finite).
    loss_terms: dict[str, tuple[str, ...]] = {}

    def __init__(self, backbone: nn.Module, model_cfg: ModelConfig, cfg: MethodConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        feat = backbone.num_features
        self.projector = mlp(feat, model_cfg.proj_hidden, model_cfg.proj_dim)
        self.predictor = (
            mlp(model_cfg.proj_dim, model_cfg.pred_hidden, model_cfg.proj_dim) if self.uses_predictor else None
        )
        self.target_backbone = make_target(backbone) if self.uses_target else None
        self.target_projector = make_target(self.projector) if self.uses_target else None
        self.momentum = cfg.momentum_base
        self.proj_dim = model_cfg.proj_dim

    # ----- pieces the methods combine -------------------------------------------------
    def flatten_views(self, views: Tensor, min_views: int = 1) -> tuple[Tensor, int, int]:
        """(B, M, C, H, W) -> (M·B, C, H, W), view-major (rows m·B … m·B+B−1 are view m); M ≥ ``min_views``.
        The 4-D batch is what the backbone sees: channels-last after :meth:`use_channels_last`."""
        check_shape("views", views, ndim=5)
        b, m = views.shape[:2]
        if m < min_views:
            raise ValueError(f"views needs at least {min_views} views, got M = {m}")
        x = views.transpose(0, 1).reshape(m * b, *views.shape[2:])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, b, m

    @staticmethod
    def unflatten(x: Tensor, b: int, m: int) -> Tensor:
        """(M·B, D) view-major -> (B, M, D)."""
        return x.reshape(m, b, -1).transpose(0, 1)

    def online(self, x: Tensor) -> Tensor:
        """Online embedding z = g(f(x)): (N, C, H, W) -> (N, D)."""
        return self.projector(self.backbone(x))

    @torch.no_grad()
    def target(self, x: Tensor) -> Tensor:
        """Target embedding z' = g'(f'(x)), no gradient: (N, C, H, W) -> (N, D), float32.

        After :meth:`use_target_dtype` (bf16) the forward runs under that autocast: the target is never
        differentiated, so only its forward's precision matters, and the losses normalise z' in float32.
        Its weights stay float32 (the EMA's small updates need them)."""
        if self.target_dtype is None:
            return self.target_projector(self.target_backbone(x))
        with torch.autocast(device_type=x.device.type, dtype=self.target_dtype):
            return self.target_projector(self.target_backbone(x)).float()

    def target_embedding(self, x: Tensor, z_online: Tensor) -> Tensor:
        """The target's embedding of ``x`` (no gradient), given the online one ``z_online`` of the same
        batch. With EMA momentum 0 throughout (``method.momentum_base = momentum_end = 0``) the target's
        weights equal the online's at every step (τ = 0 copies them) and, in training mode (BatchNorm
        on the same batch), so does its output: ``z_online`` is returned detached, without the second
        forward (SimSiam's stop-gradient target; with ``model.drop_path`` it shares the online's drop pattern)."""
        if self.training and self.cfg.momentum_base == 0 and self.cfg.momentum_end == 0:
            return z_online.detach()
        return self.target(x)

    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the target with τ on BYOL's cosine schedule (no-op without target)."""
        if not self.uses_target:
            return
        self.momentum = cosine_momentum(step, total_steps, self.cfg.momentum_base, self.cfg.momentum_end)
        ema_update(self.target_backbone, self.backbone, self.momentum)
        ema_update(self.target_projector, self.projector, self.momentum)

    def use_channels_last(self) -> SSLMethod:
        """Weights and every batch the backbone sees in channels-last memory format (faster
        convolutions on GPUs; ``model.channels_last`` on CUDA). Returns ``self``."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def use_target_dtype(self, dtype: torch.dtype | None) -> SSLMethod:
        """Run the EMA target's forward under autocast to ``dtype`` (bf16), or as the run (None);
        ``train.target_precision`` through :func:`cellssl.engine.hardware.target_autocast_dtype`.
        Returns ``self``; a method without a target keeps None."""
        self.target_dtype = dtype if self.uses_target else None
        return self

    def seed(self, seed: int) -> None:
        """Seed the method's own random draws (the engine passes the run's seed + 1000 × rank before
        training); no-op for a method that draws nothing (MSBReg seeds its Brownian directions)."""

    def step_inputs(self, batch_size: int, device: torch.device) -> dict[str, Tensor]:
        """Random inputs of the next step's forward, drawn here, outside a compiled graph, and
        passed to ``forward`` as keywords (``train.compile``); none for most methods."""
        return {}

    def forward(self, views: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_state(self) -> dict:
        """Method state that is not a tensor parameter (e.g. RNG), for checkpoints."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Inverse of :meth:`extra_state`."""
