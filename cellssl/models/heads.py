"""Projector and predictor MLPs (BYOL-style: Linear-BN-ReLU-Linear), with batch statistics taken
over the batch of all DDP ranks.

Gradient convention under DDP (``W`` ranks, equal local batches): every batch statistic is
computed on the batch gathered with :func:`gather_with_grad`, whose backward sums the gradients
of all ranks into each rank's rows; each rank's loss is chosen so that the *mean over ranks* of
the per-rank losses equals the single-process loss on the whole batch. DDP then averages the
parameter gradients over ranks, which gives exactly the single-process gradient (a rank's
gradient w.r.t. its own inputs is ``W`` × the single-process one before that averaging).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_gather


def distributed_world() -> int:
    """The number of DDP ranks (1 when no process group is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) from all DDP ranks along dim 0 (rank order), keeping the gradient.

    The backward of ``torch.distributed.nn.functional.all_gather`` sums, over ranks, the gradient
    each rank's loss sends to rows of rank r, and hands the sum to rank r: with the convention of
    this module that makes the DDP-averaged gradient equal the single-process one. Every rank must
    call it with the same shape. Returns ``x`` itself when not distributed.
    """
    if distributed_world() == 1:
        return x
    return torch.cat(all_gather(x.contiguous()), dim=0)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the batch of all DDP ranks.

    Under DDP each rank holds B/W images; a plain BatchNorm would normalise with per-rank
    statistics, so the heads (and every loss after them) would differ from one process on the
    whole batch. Here mean and biased variance come from the gathered batch (with gradient), the
    running statistics get the same update on every rank, and a single process is exactly
    ``nn.BatchNorm1d``. Works on any backend (gloo on CPU too, where ``nn.SyncBatchNorm`` does not);
    ``model.sync_bn`` turns these into ``nn.SyncBatchNorm`` on GPUs, which computes the same thing.
    Inputs ``(B, C)``; under autocast the statistics and the output are float32.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or distributed_world() == 1 or x.ndim != 2:
            return super().forward(x)
        xg = gather_with_grad(x).float()  # statistics in float32 under bf16 autocast, as nn.BatchNorm1d's
        mean = xg.mean(dim=0)
        var = xg.var(dim=0, unbiased=False)
        if self.track_running_stats and self.running_mean is not None:
            n = xg.shape[0]
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / max(n - 1, 1), m)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(in, hidden) - BatchNorm1d (over all DDP ranks) - ReLU - Linear(hidden, out).

    Maps ``(B, in_dim)`` to ``(B, out_dim)``. Used as projector g (every method; the VICReg /
    Barlow Twins "expander") and predictor q (MSBReg/BYOL). The BatchNorm is
    :class:`GlobalBatchNorm1d`, so the heads are the same on 2 ranks as on 1 process.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        GlobalBatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
