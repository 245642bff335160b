"""AdaBN (Li et al. 2016): adapt a backbone to a new lab by re-estimating BatchNorm statistics.

A network's BatchNorm layers normalise with running mean/variance estimated on the source
data. A different microscope, stain or protocol shifts those statistics; recomputing them on
unlabelled target images (no gradient, no weight change) often recovers much of the lost
accuracy at the cost of one pass over a few thousand images.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torch import nn
from torch.utils.data import DataLoader, Dataset

from cellssl.errors import DataError
from cellssl.eval.features import _batch_images

__all__ = ["adapt_batchnorm", "adapt_batchnorm_folder", "batchnorm_layers"]


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """All BatchNorm layers (1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d) that track running stats."""
    return [
        m for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


@torch.no_grad()
def adapt_batchnorm(
    backbone: nn.Module,
    dataset: Dataset,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    max_images: int = 2000,
    seed: int = 0,
    num_workers: int = 0,
) -> nn.Module:
    """Replace every BatchNorm layer's running statistics by those of ``dataset`` (AdaBN).

    Args:
        backbone: the network (modified in place).
        dataset: target-domain items ``(tensor (C, S, S), label)`` (label ignored) or tensors.
        max_images: at most this many random images (``seed``) are used.

    Math: running stats are reset and ``momentum=None`` makes PyTorch keep the cumulative
    average over batches: after B batches ``mu = (1/B) sum_b mean(x_b)``,
    ``var = (1/B) sum_b var_unbiased(x_b)``. Only BN layers run in train mode (dropout and
    friends stay in eval), under ``no_grad``: parameters (weights, affine gamma/beta) never
    change, only the buffers ``running_mean``, ``running_var``, ``num_batches_tracked``.

    Returns:
        ``backbone`` in eval mode, momentum of every BN layer restored.
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    layers = batchnorm_layers(backbone)
    if not layers:
        warnings.warn("the backbone has no BatchNorm layers: AdaBN changes nothing (e.g. ViTs use LayerNorm)",
                      UserWarning, stacklevel=2)
        return backbone.eval()
    n = len(dataset)
    if n == 0:
        raise DataError("AdaBN needs at least one target image")
    idx = np.arange(n)
    if n > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_images, replace=False))
    loader = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    momenta = [m.momentum for m in layers]
    backbone.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for batch in loader:
            x = _batch_images(batch).to(device).float()
            if x.shape[0] < 2 and seen > 0:
                continue  # a single-image tail batch has no variance to contribute
            backbone(x)
            seen += x.shape[0]
    finally:
        for m, mom in zip(layers, momenta):
            m.momentum = mom
        backbone.eval()
    return backbone


def adapt_batchnorm_folder(
    backbone: nn.Module,
    folder: str | Path,
    data_cfg: Any,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    max_images: int = 2000,
    seed: int = 0,
    in_chans: int | None = None,
    num_workers: int = 0,
) -> nn.Module:
    """AdaBN on the images of ``folder`` (any layout :func:`~cellssl.data.datasets.build_dataset`
    reads; labels are ignored), read and normalised with ``data_cfg`` (the checkpoint recipe's
    :class:`~cellssl.config.DataConfig`) through the evaluation transform. ``in_chans`` (the
    backbone's input channels) is checked against the folder's images. Returns the backbone (eval)."""
    from cellssl.augment.views import build_eval_transform
    from cellssl.data.datasets import build_dataset
    from cellssl.eval.features import TransformedDataset

    ds = build_dataset(data_cfg, folder, labelled=False)
    if in_chans is not None and ds.channels != in_chans:
        raise DataError(
            f"AdaBN folder {folder} has {ds.channels}-channel images but the backbone takes {in_chans}; "
            "use target images with the same channels"
        )
    transform = build_eval_transform(data_cfg, ds.channels)
    return adapt_batchnorm(backbone, TransformedDataset(ds, transform), device, batch_size=batch_size,
                           max_images=max_images, seed=seed, num_workers=num_workers)
