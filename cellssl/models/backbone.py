"""Backbones: any ``timm`` model as a feature extractor.

``build_backbone`` turns a name into a module mapping ``(B, C, H, W)`` images to ``(B, F)``
features (``F = module.num_features``). Weights start random, or from ``model.pretrained``
(:func:`pretrained_source`): a timm tag that timm downloads (``resnet50.a1_in1k``; needs internet
once, then timm's cache) or a local ``.safetensors`` / ``.pth`` file. Channel counts other than the
weights' use timm's input-convolution adaptation (``adapt_input_conv``).
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import timm
import torch
from timm.models import adapt_input_conv, get_pretrained_cfg, load_state_dict, split_model_name_tag
from torch import nn

from cellssl.config import ModelConfig
from cellssl.errors import ConfigError, did_you_mean

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
ACCEPTED_WEIGHTS = ("model.pretrained takes a .safetensors file, a weights-only state dict (.pth, .pt, .bin, .ckpt), "
                    "a cellssl checkpoint (RUN/checkpoints/last.pt), a `cellssl export` folder or a timm tag "
                    "(e.g. resnet18.a1_in1k)")
# model.pretrained values that mean "timm's default weights for model.backbone"
_DEFAULT_TAG_WORDS = ("true", "yes", "default", "timm", "imagenet")

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:240]


def pretrained_source(cfg: ModelConfig) -> tuple[str, str] | None:
    """Where ``cfg.pretrained`` points: ``("file", path)``, ``("timm", "arch.tag")`` or None.

    A value with a weights suffix (``.safetensors``, ``.pth``, ...), a path separator or an existing
    path is a file (a folder must hold ``model.safetensors`` or ``pytorch_model.bin``); ``true`` /
    ``default`` / ``imagenet`` mean timm's default tag of ``cfg.backbone``; anything else is a timm
    name ``arch[.tag]`` whose architecture must be ``cfg.backbone``'s. Raises ConfigError.
    """
    if cfg.pretrained is None or str(cfg.pretrained).strip().lower() in ("", "none", "false", "no", "random"):
        return None
    value = str(cfg.pretrained).strip()
    path = Path(value).expanduser()
    if path.suffix.lower() in WEIGHT_SUFFIXES or "/" in value or "\\" in value or path.exists():
        return "file", str(_weights_file(path))
    return "timm", _timm_weights(value, cfg.backbone)


def _weights_file(path: Path) -> Path:
    """The weights file ``model.pretrained`` names (a folder: its ``model.safetensors`` or
    ``pytorch_model.bin``); ConfigError when there is none."""
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise ConfigError(f"model.pretrained: folder {path} holds no model.safetensors or pytorch_model.bin; "
                              f"{ACCEPTED_WEIGHTS}")
        path = found[0]
    if not path.is_file():
        raise ConfigError(f"model.pretrained: weights file {path} does not exist")
    if path.suffix and path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ConfigError(f"model.pretrained: {path} is not a weights file ({path.suffix}); {ACCEPTED_WEIGHTS}")
    return path


def _timm_weights(value: str, backbone: str) -> str:
    """timm's ``arch.tag`` for ``model.pretrained=value`` (``true``/``default``/``imagenet``: ``backbone``'s
    default tag); ConfigError when its architecture is not ``backbone``'s or timm has no such weights."""
    if value.lower() in _DEFAULT_TAG_WORDS:
        value = backbone
    arch, tag = split_model_name_tag(value)
    own_arch, own_tag = split_model_name_tag(backbone)
    if arch != own_arch:
        raise ConfigError(
            f"model.pretrained={value} holds {arch} weights but model.backbone is {backbone}: "
            f"set model.backbone={arch} (--backbone {arch})"
        )
    name = f"{arch}.{tag or own_tag}" if (tag or own_tag) else arch
    tags = timm.list_pretrained(f"{arch}.*")
    if not tags:
        raise ConfigError(f"timm has no pretrained weights for {arch}: use a weights file for model.pretrained")
    if "." in name and name not in tags:
        raise ConfigError(f"timm has no pretrained tag '{name}'{did_you_mean(name, tags)}; "
                          f"available: {', '.join(tags[:8])}{', ...' if len(tags) > 8 else ''}")
    return name


def _hub_host() -> str:

    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def _download_possible(name: str, timeout: float = 3.0) -> bool:
    """False only when timm's weights ``name`` are on the Hugging Face hub, not in the local cache,
    and the hub's host does not answer within ``timeout`` s (then the hub client would retry for a
    minute before failing). Offline mode and proxies are left to the hub client."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    try:
        repo = get_pretrained_cfg(name).hf_hub_id
    except Exception:
        return True
    if not repo:
        return True
    cached = (huggingface_hub.try_to_load_from_cache(repo, f) for f in ("model.safetensors", "pytorch_model.bin"))
    if any(isinstance(c, str) for c in cached):
        return True
    try:
        socket.create_connection((_hub_host(), 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _classifier_keys(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def load_weights_file(model: nn.Module, path: str | Path, name: str = "the backbone") -> None:
    """Load a ``.safetensors`` / weights-only ``.pth`` state dict into a (headless) timm ``model``.

    Accepted layouts: a timm/torchvision-style state dict (classifier weights are dropped), one
    wrapped in ``state_dict`` / ``model`` (timm's loader), or a cellssl checkpoint (its
    ``backbone.*`` keys). When the file's input convolution has another channel count than the
    model's, timm's ``adapt_input_conv`` converts it (sum for 1 channel, repeat-and-scale for more);
    when its kernel differs (``model.stem`` replaced), that layer keeps its random init with a warning.
    Any other mismatch raises a one-line ConfigError.
    """
    path = Path(path)
    try:
        state = load_state_dict(str(path), use_ema=False)
    except Exception as exc:
        why = ("it is not a file of plain tensors (another format, or pickled Python objects, which are never "
               "loaded)" if "weights_only" in str(exc)
               else _first_line(exc))  # torch's advice (weights_only=False) is nothing a user of the CLI can do
        raise ConfigError(f"cannot read pretrained weights {path}: {why}; {ACCEPTED_WEIGHTS}") from None
    own = model.state_dict()
    if not any(k in own for k in state) and any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    heads = _classifier_keys(model)
    state = {k: v for k, v in state.items() if k in own or not any(k.startswith(h + ".") for h in heads)}
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    for conv in ((first,) if isinstance(first, str) else tuple(first or ())):
        key = f"{conv}.weight"
        if key not in state or key not in own or state[key].shape == own[key].shape:
            continue
        w, target = state[key], own[key]
        if w.ndim == 4 and w.shape[0] == target.shape[0] and w.shape[2:] == target.shape[2:]:
            state[key] = adapt_input_conv(int(target.shape[1]), w, base_chans=int(w.shape[1]))
        else:
            warnings.warn(f"{path.name}: {key} {tuple(w.shape)} does not fit this stem {tuple(target.shape)}; "
                          "that layer starts from random weights", UserWarning, stacklevel=3)
            state[key] = target
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        detail = (f"{len(shapes)} shape mismatches (e.g. {shapes[0]}: {tuple(state[shapes[0]].shape)} vs "
                  f"{tuple(own[shapes[0]].shape)})" if shapes else
                  f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else
                  f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise ConfigError(f"pretrained weights {path} do not fit {name}: {detail}; "
                          "are they for this model.backbone?")
    model.load_state_dict(state)


def build_backbone(cfg: ModelConfig, in_chans: int, image_size: int | None = None, *,
                   load_pretrained: bool = False) -> nn.Module:
    """Create ``cfg.backbone`` from timm with no classifier (``num_classes=0``).

    Args:
        cfg: model section of the recipe (``backbone`` is any ``timm.create_model`` name).
        in_chans: image channels C (1 for single-channel fluorescence, 3 for RGB, N for stacks).
        image_size: input side, passed to models that need it (ViTs).
        load_pretrained: start from ``cfg.pretrained`` (see :func:`pretrained_source`). Off for
            callers that load a checkpoint right after (no download just to be overwritten).

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
    if image_size is not None and cfg.backbone.split("_")[0] in ("vit", "deit", "swin", "eva", "beit"):
        kwargs["img_size"] = image_size
    source = pretrained_source(cfg) if load_pretrained else None
    if source is not None and source[0] == "timm":
        model = _create_pretrained(source[1], kwargs)
    else:
        try:
            model = timm.create_model(cfg.backbone, **kwargs)
        except Exception as exc:  # timm raises many types for bad sizes/arguments
            raise ConfigError(f"cannot build backbone '{cfg.backbone}' for {in_chans} channels: {exc}") from None
    if cfg.stem != "default":
        _change_stem(model, cfg, in_chans, pretrained=source[1] if source and source[0] == "timm" else None)
    if source is not None and source[0] == "file":
        load_weights_file(model, source[1], f"backbone {cfg.backbone} ({in_chans} channels, stem {cfg.stem})")
    if image_size is not None:
        check_input_size(model, cfg.backbone, in_chans, image_size)
    return model


def _create_pretrained(name: str, kwargs: dict) -> nn.Module:
    """timm's model ``name`` with its pretrained weights (downloaded once); a one-line ConfigError
    with the way out when they cannot be had (no internet, offline mode, a proxy)."""
    way_out = (f"without internet, download them elsewhere (timm.create_model('{name}', pretrained=True) "
               "fills the Hugging Face cache) or set model.pretrained to a local .safetensors/.pth file")
    if not _download_possible(name):
        raise ConfigError(f"cannot get pretrained weights '{name}' (not in the cache and "
                          f"{_hub_host()} cannot be reached); {way_out}")
    try:
        return timm.create_model(name, **{**kwargs, "pretrained": True})
    except Exception as exc:  # no network, HF_HUB_OFFLINE, a proxy: one line, with the way out
        raise ConfigError(f"cannot get pretrained weights '{name}' ({_first_line(exc)}); {way_out}") from None


def _change_stem(model: nn.Module, cfg: ModelConfig, in_chans: int, pretrained: str | None) -> None:
    """``model.stem`` pool/small on a ResNet-style backbone (ConfigError on others); warns that the
    ``pretrained`` timm weights' stem is not used."""
    if not (hasattr(model, "conv1") and hasattr(model, "maxpool")):
        raise ConfigError(f"model.stem={cfg.stem!r} applies to ResNet-style backbones only, not {cfg.backbone}")
    _replace_resnet_stem(model, in_chans, cfg.stem)
    if pretrained is not None:
        warnings.warn(f"model.stem={cfg.stem} replaces the pretrained 7x7 stem of {pretrained}: "
                      "conv1 starts from random weights", UserWarning, stacklevel=3)


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


class PixelFeatures(nn.Module):
    """The raw-pixel baseline as a "backbone": each image area-averaged to ``side``×``side`` and
    flattened, ``(B, C, H, W) -> (B, C·side·side)``. No parameters; the ``pixels:<side>`` spec of
    every evaluation command (e.g. ``--checkpoint pixels:16``), the counterpart of ``random:``."""

    def __init__(self, in_chans: int, side: int = 16) -> None:
        super().__init__()
        if side < 1:
            raise ConfigError(f"pixels:{side}: the side must be a positive number of pixels, e.g. pixels:16")
        self.side = int(side)
        self.num_features = int(in_chans) * self.side * self.side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, self.side).flatten(1)
