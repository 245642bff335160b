"""Exponential moving average (delayed-parameter) target network, BYOL-style."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float, end: float = 1.0) -> float:
    """τ(t) = end - (end - base) · (cos(π t / T) + 1) / 2  (BYOL eq. for the target decay).

    Rises from ``base`` at step 0 to ``end`` at ``total_steps``.
    """
    if total_steps <= 0:
        return base
    t = min(max(step, 0), total_steps) / total_steps
    return end - (end - base) * (math.cos(math.pi * t) + 1) / 2


def make_target(online: nn.Module) -> nn.Module:
    """A frozen deep copy of ``online``: same weights, ``requires_grad=False``."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """θ' ← τ θ' + (1 − τ) θ for parameters; buffers (BN statistics) are copied.

    Uses fused multi-tensor ops (``torch._foreach_lerp_``), not a Python loop of kernels.
    """
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("target and online networks have different parameter lists")
    if t_params:
        torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)
    t_bufs = [b for b in target.buffers() if b.dtype.is_floating_point]
    o_bufs = [b for b in online.buffers() if b.dtype.is_floating_point]
    if t_bufs:
        torch._foreach_copy_(t_bufs, o_bufs)
