"""Optimisers (AdamW, SGD, LARS) with weight-decay exclusions, and the LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from cellssl.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017, arXiv:1708.03888) as used by BYOL/MSBReg on large batches.

    For parameters with ``lars=True`` the update is scaled by the trust ratio
    η‖w‖ / (‖g + wd·w‖); biases and norm parameters (``lars=False``) take plain SGD+momentum.
    A ``found_inf`` attribute (a 0-dim tensor, as torch's fused optimisers take from a GradScaler)
    of 1 leaves weights and momentum untouched for that step, decided on the device.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - torch signature
        loss = closure() if closure is not None else None
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, g_norm = torch.norm(p), torch.norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    g = g.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                new = torch.clone(g).detach() if buf is None else buf.mul(group["momentum"]).add_(g)
                if found_inf is not None:  # a skipped step: keep the old buffer, move nothing
                    skip = found_inf.to(p.device).bool()
                    new = torch.where(skip, torch.zeros_like(new) if buf is None else buf, new)
                    p.sub_(torch.where(skip, torch.zeros_like(new), new), alpha=group["lr"])
                else:
                    p.add_(new, alpha=-group["lr"])
                state["momentum_buffer"] = new
        return loss


def param_groups(model: nn.Module, weight_decay: float, predictor_prefix: str | None = None) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases / norm parameters (not). With
    ``predictor_prefix`` (e.g. ``"predictor."``) the parameters under it form two more groups,
    marked ``predictor=True``, so that they can take their own LR."""
    parts = (False, True) if predictor_prefix else (False,)
    groups = {(pred, nd): [] for pred in parts for nd in (False, True)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_pred = bool(predictor_prefix) and name.startswith(predictor_prefix)
        groups[(is_pred, p.ndim <= 1 or name.endswith(".bias"))].append(p)
    return [
        {"params": params, "weight_decay": 0.0 if nd else weight_decay, "lars": not nd, "predictor": pred}
        for (pred, nd), params in groups.items()
        if params or not pred
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, batch_size: int, fused: bool = False) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.name`` over ``model``'s trainable parameters.

    The peak LR is ``cfg.lr`` (× batch_size/256 when ``cfg.scale_lr``); each group remembers it
    as ``base_lr`` for the schedule. A ``predictor`` sub-module (BYOL, MSBReg) gets
    ``cfg.predictor_lr_scale`` × that LR and, with ``predictor_lr_schedule: constant``, no decay.
    ``fused``: torch's fused AdamW/SGD kernels, which skip a step on the device when given
    ``found_inf`` (LARS does so in any case).
    """
    lr = cfg.lr * (batch_size / 256 if cfg.scale_lr else 1.0)
    has_pred = getattr(model, "predictor", None) is not None
    separate = has_pred and (cfg.predictor_lr_scale != 1.0 or cfg.predictor_lr_schedule != "cosine")
    groups = param_groups(model, cfg.weight_decay, "predictor." if separate else None)
    if cfg.name == "adamw":
        for g in groups:
            g.pop("lars")
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), **({"fused": True} if fused else {}))
    elif cfg.name == "sgd":
        for g in groups:
            g.pop("lars")
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=False,
                              **({"fused": True} if fused else {}))
    else:
        opt = LARS(groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    for g in opt.param_groups:
        is_pred = g.pop("predictor", False)
        g["base_lr"] = lr * (cfg.predictor_lr_scale if is_pred else 1.0)
        g["constant_lr"] = bool(is_pred and cfg.predictor_lr_schedule == "constant")
    return opt


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_ratio·base_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def warmup_steps_for(cfg: OptimConfig, total_steps: int) -> int:
    """Warm-up length in steps: ``warmup_steps`` when set, else ``warmup_fraction·total``."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round(cfg.warmup_fraction * total_steps))


def set_lr(opt: torch.optim.Optimizer, step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Set every group's LR for ``step`` (groups marked ``constant_lr`` stay at their peak after
    warm-up); returns the LR of the first group."""
    warm = warmup_steps_for(cfg, total_steps)
    for g in opt.param_groups:
        if g.get("constant_lr"):
            g["lr"] = lr_at(step, warm, g["base_lr"], warm, 1.0)
        else:
            g["lr"] = lr_at(step, total_steps, g["base_lr"], warm, cfg.min_lr_ratio)
    return opt.param_groups[0]["lr"]
