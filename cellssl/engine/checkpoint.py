"""Checkpoints: atomic writes, safe loads, and rebuilding a backbone from one.

A training checkpoint is a dict of tensors and plain Python values (loadable with
``torch.load(weights_only=True)``):

    format: "cellssl-1"   step: int   epoch: int   config: resolved recipe (nested dict)
    method: str            model: method state_dict (backbone., projector., predictor., target_*)
    optimizer, scaler: state dicts   extra: method state (Brownian RNG)   rng: RNG states
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models import get_pretrained_cfg, split_model_name_tag
from torch import nn

import cellssl.methods  # noqa: F401  (registers every method's settings: the recipes read here are built from them)
from cellssl.config import ModelConfig, Recipe, migrate_checkpoint_config, recipe_from_dict, recipe_to_dict
from cellssl.errors import CheckpointError, ConfigError, DataError, disk_full_as_error
from cellssl.models import build_backbone, ema_update
from cellssl.models.backbone import PixelFeatures

FORMAT = "cellssl-1"


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an infinity."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_new_run(out: str | Path, *, what: str = "a run", overwrite: bool = False,
                  checkpoint: str = "checkpoints/last.pt", resumable: bool = True) -> None:
    """Refuse to start a fresh run in ``out`` when it already holds ``checkpoint`` (nothing is
    overwritten silently); ``overwrite=True`` allows it. ``resumable``: the message offers ``--resume``."""
    last = Path(out) / checkpoint
    if overwrite or not last.exists():
        return
    try:
        held = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        held = {}
    step = held.get("step") if isinstance(held, dict) else None
    at = f" at {'epoch' if held.get('kind') == 'finetune' else 'step'} {step}" if isinstance(step, int) else ""
    how = "continue it with --resume, replace it with --overwrite" if resumable else "replace it with --overwrite"
    raise ConfigError(f"{out} already holds {what} ({checkpoint}{at}): {how}, or choose another --out")


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file; a full
    disk is a one-line :class:`~cellssl.errors.DiskFullError` (the space needed, what is kept). A
    checkpoint whose ``model`` weights are not all finite is refused (CheckpointError): the
    file already at ``path`` is kept.
    """
    path = Path(path)
    model = obj.get("model") if isinstance(obj, dict) else None
    bad = nonfinite_tensors(model) if isinstance(model, dict) else []
    if bad:
        raise CheckpointError(f"refusing to write {path}: {len(bad)} weight tensor(s) are non-finite "
                              f"(e.g. {bad[0]}); the previous file is kept")
    path.parent.mkdir(parents=True, exist_ok=True)
    with disk_full_as_error(path, tensor_bytes(obj), lambda: _kept(path)):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists, tuples): about the size of its file."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _kept(path: Path) -> str:
    """What a failed write of the checkpoint ``path`` leaves: the previous file (its step), or nothing."""
    if not path.is_file():
        return f"no earlier {path.name} was there, nothing was written"
    try:
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step")
    except Exception:
        step = None
    return f"the previous {path.name}{f' (step {step})' if isinstance(step, int) else ''} is kept"


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as checkpoint-safe values."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    if not state:
        return
    py = state["python"]
    random.setstate((state["python_version"], tuple(int(v) for v in py[:-1]), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a cellssl checkpoint with ``weights_only=True``; clear errors for bad files."""
    path = Path(path)
    if path.is_dir():
        inside = path / "checkpoints" / "last.pt"
        hint = f" (e.g. {inside})" if inside.is_file() else ""
        raise CheckpointError(f"checkpoint {path} is a folder: pass the checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot load checkpoint {path}: {first[:200]} (is it a cellssl checkpoint? "
            "only weights-only checkpoints are loaded)"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cellssl checkpoint (no '{FORMAT}' format tag)")
    if ckpt.get("incomplete"):
        raise CheckpointError(
            f"checkpoint {path} is from a {ckpt.get('kind', 'training')} run that did not finish (best epoch so far: "
            f"{ckpt.get('epoch', '?')}; its unsure calibration was never made): run `cellssl {ckpt.get('kind', '')}` "
            "to the end again (with --overwrite) and use the best.pt it writes"
        )
    bad = nonfinite_tensors(ckpt.get("model") or {})
    if bad:
        raise CheckpointError(
            f"checkpoint {path} has non-finite weights ({len(bad)} of {len(ckpt['model'])} tensors, e.g. {bad[0]}): "
            "it cannot be used; take an earlier checkpoint or retrain (e.g. with a lower optim.lr)"
        )
    if isinstance(ckpt.get("config"), dict):
        ckpt["config"] = migrate_checkpoint_config(ckpt["config"])
    return ckpt


def load_state_checked(module: nn.Module, state: dict, what: str, path: str | Path) -> None:
    """``load_state_dict`` that reports a shape/key mismatch in one line instead of a traceback."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        detail = []
        if shapes:
            k = shapes[0]
            detail.append(f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs "
                          f"{tuple(own[k].shape)})")
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise CheckpointError(f"checkpoint {path} does not match this {what}: {'; '.join(detail)}")
    module.load_state_dict(state)


def init_weights_from(method: nn.Module, path: str | Path, in_chans: int, backbone: str) -> None:
    """Start ``method`` from another checkpoint's weights (``fit(init_from=...)``, continued training
    on a new lab): the backbone, and every head tensor whose shape matches (all of them when the
    method is the same); the EMA target starts at the loaded online weights. DataError for another
    channel count, ConfigError when no backbone tensor matches ``backbone``."""
    src = load_checkpoint(path)
    if int(src.get("in_chans", in_chans)) != in_chans:
        raise DataError(f"checkpoint {path} expects {src['in_chans']}-channel images, the data has {in_chans}")
    own = method.state_dict()
    usable = {k: v for k, v in src["model"].items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("backbone.") for k in usable):
        raise ConfigError(f"checkpoint {path} has no backbone matching {backbone}")
    method.load_state_dict(usable, strict=False)
    if method.uses_target:
        ema_update(method.target_backbone, method.backbone, 0.0)
        ema_update(method.target_projector, method.projector, 0.0)


def training_checkpoint(recipe: Recipe, method: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, *, step: int,
                        steps_per_epoch: int, total_steps: int, schedule_fixed: bool, in_chans: int) -> dict:
    """The checkpoint of a training run at ``step`` (module docstring): weights, optimiser, scaler,
    method state, RNG states, the resolved recipe and the schedule (``total_steps``, whether a
    time budget has fixed it), so that ``--resume`` continues exactly."""
    return {
        "format": FORMAT,
        "step": step,
        "epoch": step // max(1, steps_per_epoch),
        "total_steps": total_steps,
        "schedule_fixed": schedule_fixed,
        "method": recipe.method.name,
        "in_chans": in_chans,
        "config": recipe_to_dict(recipe),
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "extra": method.extra_state(),
        "momentum": float(method.momentum),
        "rng": rng_state(),
    }


def restore_training(path: Path, recipe: Recipe, method: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: Any) -> dict:
    """Load a :func:`training_checkpoint` into ``method``, ``optimizer``, ``scaler`` and the RNGs
    (``--resume``); returns it. ConfigError when there is none or it was trained with another method."""
    if not path.exists():
        raise ConfigError(f"--resume: no checkpoint at {path}; start without --resume")
    ckpt = load_checkpoint(path)
    if ckpt.get("method") != recipe.method.name:
        raise ConfigError(f"--resume: {path} was trained with method '{ckpt.get('method')}', the recipe says "
                          f"'{recipe.method.name}'")
    load_state_checked(method, ckpt["model"], f"{recipe.method.name} model", path)
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    method.load_extra_state(ckpt.get("extra", {}))
    set_rng_state(ckpt.get("rng", {}))
    method.momentum = ckpt.get("momentum", method.momentum)
    return ckpt


def describe(info: dict) -> str:
    """``"msbreg / resnet18 (3 ch, 64 px), step 200"`` of a checkpoint or of :func:`load_backbone`'s info."""
    cfg = info.get("config") or {}
    size = info.get("image_size") or cfg.get("data", {}).get("image_size", "?")
    return (f"{info.get('method', '?')} / {cfg.get('model', {}).get('backbone', '?')} "
            f"({info.get('in_chans', '?')} ch, {size} px), step {info.get('step', '?')}")


PRETRAINED_PREFIXES = ("pretrained:", "imagenet:")


def is_pretrained_spec(spec: str | Path) -> bool:
    """True for ``pretrained:...`` / ``imagenet:...`` backbone specs (see :func:`pretrained_recipe`)."""
    return str(spec).startswith(PRETRAINED_PREFIXES)


def _exported_config(path: Path) -> dict | None:
    """The ``config.json`` of an exported model folder (or beside a weights file), if any."""
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {cfg}: {exc}") from None


def pretrained_recipe(spec: str | Path, image_size: int | None = None, in_chans: int | None = None):
    """The recipe of a backbone that starts from published or exported weights, without training.

    ``spec`` is ``pretrained:<timm name>[.<tag>]`` (timm downloads the weights; ``imagenet:`` is a
    synonym: the ``random:`` baseline's counterpart), ``pretrained:<folder or file>`` with a
    ``config.json`` beside it (``cellssl export`` output, or a timm / Hugging Face model folder), or
    ``pretrained:<timm name>=<file>``. Inputs are normalised as the weights expect: an export's own
    recipe, else the weights' RGB mean/std when the data has 3 channels (``in_chans``, default 3).
    Returns a :class:`~cellssl.config.Recipe` with ``model.pretrained`` set.
    """
    body = str(spec).split(":", 1)[1].strip()
    if not body:
        raise CheckpointError(f"{spec}: name the weights, e.g. pretrained:resnet50.a1_in1k or pretrained:model/")
    recipe, own_export = _weights_recipe(str(spec), body)
    if not recipe.model.backbone:
        raise CheckpointError(f"{spec}: the config.json beside the weights names no architecture")
    if image_size:
        recipe.data.image_size = int(image_size)
    if not own_export:  # the weights' RGB statistics: for 3-channel data only
        for key in ("mean", "std"):
            v = getattr(recipe.data, key)
            ok = v is not None and len(v) == 3 and (in_chans or 3) == 3
            setattr(recipe.data, key, [float(x) for x in v] if ok else None)
        recipe.name = f"pretrained-{recipe.model.backbone}"
    return recipe


def _weights_recipe(spec: str, body: str) -> tuple[Recipe, bool]:
    """The recipe of the weights ``body`` names (``NAME=FILE``, an exported folder or file, a timm tag)
    and whether it is a cellssl export's own full recipe."""
    arch, weights = None, body
    if "=" in body:
        arch, weights = (x.strip() for x in body.split("=", 1))
    path = Path(weights).expanduser()
    exported = _exported_config(path) if (path.exists() and arch is None) else None
    recipe = Recipe()
    if exported is not None and isinstance(exported.get("cellssl", {}).get("recipe"), dict):
        recipe = recipe_from_dict(exported["cellssl"]["recipe"])  # our own export: the full recipe
        recipe.model.pretrained = str(path)
        return recipe, True
    if exported is not None:  # a timm / Hugging Face model folder
        recipe.model.backbone = str(exported.get("architecture") or "")
        recipe.model.pretrained = str(path)
        pcfg = exported.get("pretrained_cfg") or {}
        recipe.data.mean, recipe.data.std = pcfg.get("mean"), pcfg.get("std")
    elif arch is not None or path.exists() or "/" in weights:
        if arch is None:
            raise CheckpointError(f"{spec}: no config.json beside {path} says which architecture the weights are for; "
                                  f"name it: pretrained:resnet18={weights}")
        if not path.exists():
            raise CheckpointError(f"{spec}: weights {path} do not exist")
        recipe.model.backbone, recipe.model.pretrained = arch, str(path)
    else:  # a timm tag: timm downloads the weights
        recipe.model.backbone, recipe.model.pretrained = split_model_name_tag(weights)[0], weights
        try:
            pcfg = get_pretrained_cfg(weights)
        except Exception:  # an unknown tag: build_backbone names the available ones
            pcfg = None
        if pcfg is not None:
            recipe.data.mean, recipe.data.std = list(pcfg.mean), list(pcfg.std)
    return recipe, False


def load_backbone(spec: str | Path, in_chans: int | None = None, image_size: int | None = None,
                  map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """A frozen-feature backbone from a checkpoint, or a random-init one for baselines.

    Args:
        spec: a checkpoint path; ``"pixels:<side>"`` for the raw-pixel baseline (images area-averaged
            to side×side and flattened); ``"random:<timm name>"`` for a randomly initialised backbone
            built the same way (same stem choice) as a pretrained one; or ``"pretrained:..."`` /
            ``"imagenet:..."`` for published or exported starting weights (:func:`pretrained_recipe`);
            an exported model folder (``cellssl export``) is read as ``pretrained:<folder>``.
        in_chans, image_size: needed for ``random:`` specs (defaults 3 and 64); checked against
            the checkpoint otherwise.

    Returns:
        ``(backbone, info)``; ``backbone`` maps (B, C, H, W) -> (B, F) and is in eval mode;
        ``info`` has ``config`` (recipe dict), ``in_chans``, ``image_size``, ``method``, ``step``.
    """
    spec = str(spec)
    if Path(spec).is_dir() and (Path(spec) / "config.json").is_file():  # an exported model folder
        spec = f"pretrained:{spec}"
    if spec.startswith("pixels:"):
        side = spec.split(":", 1)[1].strip() or "16"
        if not side.isdigit():
            raise CheckpointError(f"{spec}: give the side in pixels, e.g. pixels:16")
        recipe = Recipe()
        recipe.model.backbone = spec
        recipe.data.image_size = image_size or recipe.data.image_size
        chans = in_chans or 3
        info = {"config": recipe_to_dict(recipe), "in_chans": chans, "image_size": recipe.data.image_size,
                "method": "raw pixels", "step": 0}
        return PixelFeatures(chans, int(side)).eval(), info
    if spec.startswith("random:"):
        recipe = Recipe()
        recipe.model.backbone = spec.split(":", 1)[1]
        recipe.data.image_size = image_size or recipe.data.image_size
        chans = in_chans or 3
        torch.manual_seed(0)
        backbone = build_backbone(recipe.model, chans, recipe.data.image_size)
        info = {"config": recipe_to_dict(recipe), "in_chans": chans, "image_size": recipe.data.image_size,
                "method": "random", "step": 0}
        return backbone.eval(), info
    if is_pretrained_spec(spec):
        recipe = pretrained_recipe(spec, image_size, in_chans)
        chans = in_chans or 3
        torch.manual_seed(0)
        backbone = build_backbone(recipe.model, chans, recipe.data.image_size, load_pretrained=True)
        info = {"config": recipe_to_dict(recipe), "in_chans": chans, "image_size": recipe.data.image_size,
                "method": "pretrained", "step": 0}
        return backbone.eval(), info
    ckpt = load_checkpoint(spec, map_location)
    recipe = recipe_from_dict(ckpt["config"])
    chans = int(ckpt["in_chans"])
    if in_chans is not None and in_chans != chans:
        raise CheckpointError(
            f"checkpoint {spec} was trained on {chans}-channel images but the data has {in_chans} channels"
        )
    model_cfg: ModelConfig = recipe.model
    backbone = build_backbone(model_cfg, chans, recipe.data.image_size)
    state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    load_state_checked(backbone, state, f"backbone ({model_cfg.backbone})", spec)
    info = {"config": ckpt["config"], "in_chans": chans, "image_size": recipe.data.image_size,
            "method": ckpt.get("method"), "step": ckpt.get("step")}
    return backbone.eval(), info
