"""Projector and predictor MLPs (BYOL-style: Linear-BN-ReLU-Linear)."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in, hidden) - BatchNorm1d - ReLU - Linear(hidden, out).

    Maps ``(B, in_dim)`` to ``(B, out_dim)``. Used as projector g (every method; the VICReg /
    Barlow Twins "expander") and predictor q (MSBReg/BYOL).
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
