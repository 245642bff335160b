"""Projector and predictor MLPs (BYOL-style: Linear-BN-ReLU-Linear)."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, *, last_bn: bool = False) -> nn.Sequential:
    """Linear(in, hidden) - BatchNorm1d - ReLU - Linear(hidden, out) [- BatchNorm1d].

    Maps ``(B, in_dim)`` to ``(B, out_dim)``. Used as projector g and predictor q
    (MSBReg/BYOL); ``last_bn=True`` gives the Barlow Twins / VICReg style expander end.
    """
    layers: list[nn.Module] = [
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=not last_bn),
    ]
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
