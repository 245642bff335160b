"""AdaBN (Li et al. 2016): re-estimate a network's BatchNorm statistics on new images.

A network's BatchNorm layers normalise with running mean/variance estimated on the source
data. A different microscope, stain or protocol shifts those statistics; recomputing them on
unlabelled target images (no gradient, no weight change) often recovers much of the lost
accuracy at the cost of one pass over a few thousand images. The folder-level entry point
(read and normalise a folder as the checkpoint's recipe says) is
:func:`cellssl.eval.features.adapt_batchnorm_folder`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cellssl.data.datasets import batch_images
from cellssl.errors import DataError

__all__ = ["adapt_batchnorm", "batchnorm_layers"]


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """All BatchNorm layers (1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d) that track running stats."""
    return [
        m for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


@torch.no_grad()
def adapt_batchnorm(backbone: nn.Module, dataset: Dataset, device: str | torch.device = "cpu", batch_size: int = 128,
                    max_images: int = 2000, seed: int = 0, num_workers: int = 0) -> nn.Module:
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
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    momenta = [m.momentum for m in layers]
    backbone.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    try:
        for batch in loader:
            x = batch_images(batch).to(device).float()
            if x.shape[0] < 2 and seen > 0:
                continue  # a single-image tail batch has no variance to contribute
            backbone(x)
            seen += x.shape[0]
    finally:
        for m, mom in zip(layers, momenta):
            m.momentum = mom
        backbone.eval()
    return backbone
