"""Backbones: any ``timm`` model as a feature extractor.

``build_backbone`` turns a name into a module mapping ``(B, C, H, W)`` images to ``(B, F)``
features (``F = module.num_features``). No weights are downloaded: cellssl trains from scratch
or loads its own checkpoints.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from cellssl.config import ModelConfig
from cellssl.errors import ConfigError, did_you_mean

# Smallest input side each family accepts without its feature map shrinking to nothing.
_MIN_SIZE = {"vit": 16, "deit": 16, "swin": 32, "convnext": 32}


def _replace_resnet_stem(model: nn.Module, in_chans: int, stem: str) -> None:
    """Replace a ResNet's 7x7/2 conv with a 3x3/1 conv; ``stem="small"`` also drops the max-pool.

    Cells at 32-96 px lose much nucleus detail to the 4x downsampling stem. ``"pool"`` (3x3/1 +
    max-pool, 2x downsampling) costs about 4x the stage compute, ``"small"`` (CIFAR-style, no
    downsampling) about 16x.
    """
    conv = model.conv1
    model.conv1 = nn.Conv2d(in_chans, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    if stem == "small":
        model.maxpool = nn.Identity()


def build_backbone(cfg: ModelConfig, in_chans: int, image_size: int | None = None) -> nn.Module:
    """Create ``cfg.backbone`` from timm with no classifier (``num_classes=0``).

    Args:
        cfg: model section of the recipe (``backbone`` is any ``timm.create_model`` name).
        in_chans: image channels C (1 for single-channel fluorescence, 3 for RGB, N for stacks).
        image_size: input side, passed to models that need it (ViTs).

    Returns:
        A module mapping ``(B, C, H, W)`` to ``(B, F)``; ``F`` is ``module.num_features``.
    """
    if not timm.is_model(cfg.backbone):
        names = timm.list_models()
        raise ConfigError(
            f"unknown backbone '{cfg.backbone}'{did_you_mean(cfg.backbone, names)}; "
            "`cellssl list backbones` shows the timm names"
        )
    kwargs: dict = {"pretrained": False, "num_classes": 0, "in_chans": in_chans}
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    family = cfg.backbone.split("_")[0]
    if image_size is not None and family in ("vit", "deit", "swin", "eva", "beit"):
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(cfg.backbone, **kwargs)
    except Exception as exc:  # timm raises many types for bad sizes/arguments
        raise ConfigError(f"cannot build backbone '{cfg.backbone}' for {in_chans} channels: {exc}") from None
    if cfg.stem != "default":
        if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
            raise ConfigError(f"model.stem={cfg.stem!r} applies to ResNet-style backbones only, not {cfg.backbone}")
        _replace_resnet_stem(model, in_chans, cfg.stem)
    if image_size is not None:
        check_input_size(model, cfg.backbone, in_chans, image_size)
    return model


def check_input_size(model: nn.Module, name: str, in_chans: int, image_size: int) -> None:
    """Raise a ConfigError when ``image_size`` is too small for the backbone (one dry forward)."""
    minimum = _MIN_SIZE.get(name.split("_")[0], 8)
    if image_size < minimum:
        raise ConfigError(f"image size {image_size} is too small for {name}: use at least {minimum}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_chans, image_size, image_size))
    except Exception as exc:
        raise ConfigError(
            f"image size {image_size} does not fit backbone {name} ({str(exc).splitlines()[0]}); "
            "try a larger --image-size"
        ) from None
    finally:
        model.train(was_training)
    if out.ndim != 2:
        raise ConfigError(f"backbone {name} returned features of shape {tuple(out.shape)}, expected (B, F)")


def list_backbones(pattern: str = "*") -> list[str]:
    """timm model names matching ``pattern`` (for ``cellssl list backbones``)."""
    return timm.list_models(pattern)
