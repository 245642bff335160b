"""Carry a pretrained model to a new lab: continued self-supervised training, or AdaBN only.

``adapt(checkpoint, target_folder, out)`` restarts the source run's recipe on the target lab's
*unlabelled* images from the source weights (online and EMA target), with a smaller learning
rate (``adapt.lr_scale``), a slower EMA (``adapt.momentum_base``) and a short schedule
(``adapt.max_steps``). Optionally a fraction of source-lab images is mixed in
(``source_fraction``) to keep what the model knew. ``bn_only=True`` is the seconds-long
alternative: re-estimate BatchNorm statistics on the target images (AdaBN) and write the
checkpoint. Both write ``OUT/checkpoints/last.pt``, a normal checkpoint every evaluation
command accepts (with ``"adapted": "continued" | "adabn"`` and ``"source_checkpoint"`` added).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cellssl.augment.views import build_eval_transform
from cellssl.config import apply_overrides, recipe_from_dict, recipe_to_dict, save_recipe, with_method
from cellssl.data.datasets import TransformedDataset, build_dataset
from cellssl.engine.checkpoint import (
    check_new_run,
    is_pretrained_spec,
    load_checkpoint,
    load_state_checked,
    pretrained_recipe,
    save_atomic,
)
from cellssl.engine.distributed import resolve_device
from cellssl.engine.fit import fit
from cellssl.engine.watchdog import RunStopped, exit_code_for, stopped_message
from cellssl.errors import ConfigError, DataError
from cellssl.eval.knn import knn_monitor
from cellssl.methods import build_method
from cellssl.models import build_backbone
from cellssl.models.bn import adapt_batchnorm

__all__ = ["adapt", "MixedDataset", "build_mixed_dataset", "adapted_recipe"]

DEFAULT_SOURCE_FRACTION = 0.25  # used when a source folder is given without a fraction (and the recipe says 0)


class MixedDataset:
    """Target images plus a fixed random subset of source images, both unlabelled.

    Behaves like :class:`~cellssl.data.datasets.ImageDataset` for training: ``channels``,
    ``samples`` (path, -1), ``classes`` (empty), ``labels``, ``root``, ``load(i)``,
    ``__getitem__(i) -> (float32 (H, W, C), -1)``, ``__len__``. ``domain[i]`` is 0 for target,
    1 for source images.
    """
    def __init__(self, target: Any, source: Any, source_indices: Sequence[int], transform=None):
        if target.channels != source.channels:
            raise DataError(
                f"source images have {source.channels} channel(s), target images {target.channels}: "
                "mix only folders with the same channels"
            )
        self.target, self.source = target, source
        self.index = [(0, i) for i in range(len(target))] + [(1, int(j)) for j in source_indices]
        self.channels = target.channels
        self.root = target.root
        self.classes: list[str] = []
        self.labelled = False
        self.transform = transform
        self.samples = [(self._part(d).samples[i][0], -1) for d, i in self.index]

    def _part(self, d: int) -> Any:
        return self.target if d == 0 else self.source

    @property
    def domain(self) -> np.ndarray:
        return np.array([d for d, _ in self.index], dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        return np.full(len(self.index), -1, dtype=np.int64)

    @property
    def source_fraction(self) -> float:
        return float(self.domain.mean()) if self.index else 0.0

    def load(self, i: int) -> tuple[np.ndarray, int]:
        d, j = self.index[int(i)]
        img, _ = self._part(d).load(j)
        return img, -1

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, y = self.load(i)
        return (self.transform(img) if self.transform is not None else img), y

    def __repr__(self) -> str:
        return (f"MixedDataset({len(self.target)} target + {len(self.index) - len(self.target)} source images, "
                f"channels={self.channels})")


def build_mixed_dataset(data_cfg: Any, target: str | Path, source: str | Path, source_fraction: float,
                        seed: int = 0) -> MixedDataset:
    """Target folder + a random subset of the source folder so that source images make up
    ``source_fraction`` of the mixture: ``n_s = round(f / (1 - f) · n_t)`` (capped at the source size)."""
    f = float(source_fraction)
    if not 0.0 <= f < 1.0:
        raise ConfigError(f"source_fraction must be in [0, 1), got {f}")
    tgt = build_dataset(data_cfg, target, labelled=False)
    src = build_dataset(data_cfg, source, labelled=False)
    n_s = min(len(src), int(round(f / (1.0 - f) * len(tgt))))
    idx = np.sort(np.random.default_rng(seed).choice(len(src), size=n_s, replace=False)) if n_s else []
    return MixedDataset(tgt, src, idx)


def _explicit(overrides: Sequence[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def adapted_recipe(source_config: dict, data: str | Path, out: str | Path, *, max_steps: int | None = None,
                   max_minutes: float | None = None, method: str | None = None, device: str | None = None,
                   overrides: Sequence[str] = ()) -> Any:
    """The recipe for continued training: the source run's recipe with the target data, ``out``,
    ``optim.lr × adapt.lr_scale``, ``method.momentum_base = adapt.momentum_base`` and
    ``train.max_steps = max_steps or adapt.max_steps``, ``train.compile`` off. ``overrides`` (``key=value``) are applied
    first; a value given there explicitly (optim.lr, method.momentum_base, train.max_steps) is kept as is."""
    values = copy.deepcopy(source_config)
    if method:  # another method's own settings start from their defaults (the shared ones are kept)
        values = with_method(values, str(method))
    overrides = list(overrides)
    apply_overrides(values, overrides)
    r = recipe_from_dict(values)  # validates the overrides and fills defaults
    if not _explicit(overrides, "optim.lr"):
        r.optim.lr = r.optim.lr * r.adapt.lr_scale
    if not _explicit(overrides, "method.momentum_base"):
        r.method.momentum_base = r.adapt.momentum_base
    if max_steps is not None:
        r.train.max_steps = int(max_steps)
    elif not _explicit(overrides, "train.max_steps"):
        r.train.max_steps = int(r.adapt.max_steps)
    if not _explicit(overrides, "train.compile"):
        # a few hundred steps: torch.compile's start (~45 s for resnet18 on 2 CPU cores, docs/tuning.md)
        # costs more than its ~15 % a step gives back
        r.train.compile = False
    if max_minutes is not None:
        r.train.max_minutes = float(max_minutes)
    if device is not None:
        r.train.device = str(device)
    r.data.path = str(data)
    r.train.out = str(out)
    if not r.name.endswith("-adapt"):
        r.name = f"{r.name}-adapt"
    return recipe_from_dict(_asdict(r))  # re-validate (e.g. method name)


def _asdict(recipe: Any) -> dict:
    return recipe_to_dict(recipe)


def _tag_checkpoint(path: Path, kind: str, source_checkpoint: str | Path, **extra: Any) -> None:
    ckpt = load_checkpoint(path)
    ckpt["adapted"] = kind
    ckpt["source_checkpoint"] = str(source_checkpoint)
    ckpt.update(extra)
    save_atomic(ckpt, path)


def _adabn(checkpoint: str | Path, data: str | Path, out: Path, device: str | None, overrides: Sequence[str]) -> Path:
    """AdaBN: BN statistics of backbone (+ projector, predictor, EMA target) re-estimated on ``data``."""
    ckpt = load_checkpoint(checkpoint)
    values = apply_overrides(copy.deepcopy(ckpt["config"]), list(overrides))
    recipe = recipe_from_dict(values)
    in_chans = int(ckpt["in_chans"])
    ds = build_dataset(recipe.data, data, labelled=False)
    if ds.channels != in_chans:
        raise DataError(f"{data} has {ds.channels}-channel images but {checkpoint} was trained on {in_chans}")
    dev = resolve_device(device or "auto")
    backbone = build_backbone(recipe.model, in_chans, recipe.data.image_size)
    method = build_method(recipe.method, recipe.model, backbone)
    load_state_checked(method, ckpt["model"], f"{recipe.method.name} model", checkpoint)
    method.to(dev)
    tds = TransformedDataset(ds, build_eval_transform(recipe.data, ds.channels))
    online = [method.backbone, method.projector] + ([method.predictor] if method.predictor is not None else [])
    chains = [nn.Sequential(*online)]
    if getattr(method, "target_backbone", None) is not None:
        chains.append(nn.Sequential(method.target_backbone, method.target_projector))
    for chain in chains:
        adapt_batchnorm(chain, tds, dev, batch_size=min(128, max(2, len(tds))), seed=recipe.train.seed)
    method.cpu()
    recipe.train.out = str(out)
    new = dict(ckpt)
    new["model"] = {k: v.detach().cpu().clone() for k, v in method.state_dict().items()}
    new["config"] = _asdict(recipe)
    new["config"]["data"]["path"] = str(data)
    new["adapted"] = "adabn"
    new["source_checkpoint"] = str(checkpoint)
    path = out / "checkpoints" / "last.pt"
    save_atomic(new, path)

    save_recipe(recipe_from_dict(new["config"]), out / "config.yaml")
    return path


def adapt(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    method: str | None = None,
    source: str | Path | None = None,
    source_fraction: float | None = None,
    bn_only: bool = False,
    resume: bool = False,
    device: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Adapt the model in ``checkpoint`` to the unlabelled images in ``data``; returns the new checkpoint.

    Args:
        checkpoint: the source-lab checkpoint (``cellssl pretrain``), or starting weights
            ``pretrained:<timm tag | exported folder | file>`` (continued SSL from, e.g., ImageNet weights).
        data: the target lab's images (any layout; labels are ignored).
        out: run folder; the checkpoint is ``out/checkpoints/last.pt``.
        max_steps / max_minutes: length of the continued run (default ``adapt.max_steps``).
        method: SSL method for continued training (default: the checkpoint's; with another method
            only the backbone, and heads whose shapes match, are carried over).
        source, source_fraction: mix source-lab images into the training set so they make up
            ``source_fraction`` of it (default ``adapt.source_fraction``; 0.25 when ``source`` is
            given and the recipe says 0).
        bn_only: AdaBN only (no training): re-estimate BatchNorm statistics on ``data``.
        resume: continue an interrupted adaptation in ``out`` (the recipe is taken from
            ``out/checkpoints/last.pt``; explicit max_steps/max_minutes/device/overrides still apply).
        device: auto | cpu | cuda | cuda:N (default: the recipe's).
        overrides: ``section.key=value`` recipe overrides (e.g. ``train.batch_size=64``).
        overwrite: replace a run already in ``out`` (otherwise refused, unless ``resume``).

    A run stopped by SIGINT or SIGTERM writes the checkpoint of its current step and raises
    :class:`~cellssl.engine.watchdog.RunStopped` (``--resume`` continues it). With ``resume`` and
    another length than the run was planned with, the rest of the schedule is re-planned (``engine.fit``).
    """
    out = Path(out)
    overrides = list(overrides or ())
    if bn_only:
        return _bn_only(checkpoint, data, out, resume=resume, device=device, overrides=overrides, overwrite=overwrite)
    length = {"max_steps": max_steps, "max_minutes": max_minutes, "device": device}
    if resume:
        recipe, source_checkpoint, init_from = _resumed_recipe(checkpoint, out, overrides, **length)
    else:
        recipe, source_checkpoint, init_from = _new_recipe(checkpoint, data, out, method, overrides, **length)
        check_new_run(out, what="an adaptation run", overwrite=overwrite)
    dataset, fraction = _source_mix(recipe, data, source, source_fraction)
    result = fit(recipe, resume=resume, init_from=init_from, dataset=dataset, log_prefix="adapt", overwrite=overwrite,
                 knn_monitor=knn_monitor(recipe))
    _tag_checkpoint(result.checkpoint, "continued", source_checkpoint, source_fraction=fraction)
    code = exit_code_for(result.stopped_early)
    if code:  # SIGINT / SIGTERM: the checkpoint of the current step is written, the run is not finished
        raise RunStopped(stopped_message(result.stopped_early, result.step, result.total_steps, result.checkpoint),
                         code)
    return result.checkpoint


def _bn_only(checkpoint: str | Path, data: str | Path, out: Path, *, resume: bool, device: str | None,
             overrides: list[str], overwrite: bool) -> Path:
    """``--bn-only``: AdaBN of a cellssl checkpoint into a new run folder (nothing to resume)."""
    if resume:
        raise ConfigError("--bn-only takes seconds and has nothing to resume; drop --resume")
    if is_pretrained_spec(checkpoint):
        raise ConfigError(f"--bn-only re-estimates a cellssl checkpoint's BatchNorm statistics; for {checkpoint} "
                          "use the evaluation commands' --adapt-bn DIR instead")
    check_new_run(out, what="an adaptation run", overwrite=overwrite)
    return _adabn(checkpoint, data, out, device, overrides)


def _resumed_recipe(checkpoint: str | Path, out: Path, overrides: list[str], *, max_steps: int | None,
                    max_minutes: float | None, device: str | None) -> tuple[Any, str, None]:
    """``--resume``: the recipe of the run in ``out`` (with the options given now) and the source
    checkpoint it recorded; ``(recipe, source checkpoint, None)`` (the weights come from the run)."""
    last = out / "checkpoints" / "last.pt"
    if not last.exists():
        raise ConfigError(f"--resume: no checkpoint at {last}; start without --resume")
    prev = load_checkpoint(last)
    recipe = recipe_from_dict(apply_overrides(copy.deepcopy(prev["config"]), overrides))
    if max_steps is not None:
        recipe.train.max_steps = int(max_steps)
    if max_minutes is not None:
        recipe.train.max_minutes = float(max_minutes)
    if device is not None:
        recipe.train.device = str(device)
    recipe.train.out = str(out)
    return recipe, prev.get("source_checkpoint", str(checkpoint)), None


def _new_recipe(checkpoint: str | Path, data: str | Path, out: Path, method: str | None, overrides: list[str], *,
                max_steps: int | None, max_minutes: float | None,
                device: str | None) -> tuple[Any, str, str | Path | None]:
    """A new adaptation: :func:`adapted_recipe` of the source's recipe; ``(recipe, source checkpoint,
    the checkpoint to start the weights from)`` (None for starting weights: ``fit`` loads ``model.pretrained``)."""
    if is_pretrained_spec(checkpoint):  # published/exported starting weights: fit loads model.pretrained
        source_config, init_from = recipe_to_dict(pretrained_recipe(checkpoint)), None
    else:
        source_config, init_from = load_checkpoint(checkpoint)["config"], checkpoint
    recipe = adapted_recipe(source_config, data, out, max_steps=max_steps, max_minutes=max_minutes, method=method,
                            device=device, overrides=overrides)
    return recipe, str(checkpoint), init_from


def _source_mix(recipe: Any, data: str | Path, source: str | Path | None,
                source_fraction: float | None) -> tuple[MixedDataset | None, float]:
    """The target images mixed with source images (None: the target folder alone) and the source
    fraction used; sets ``recipe.adapt.source_fraction`` to it."""
    fraction = source_fraction if source_fraction is not None else recipe.adapt.source_fraction
    if source is not None and source_fraction is None and not fraction:
        fraction = DEFAULT_SOURCE_FRACTION
    if source_fraction is not None and source_fraction > 0 and source is None:
        raise ConfigError("--source-fraction needs --source (the source lab's image folder)")
    dataset = None
    if source is not None and fraction > 0:
        dataset = build_mixed_dataset(recipe.data, data, source, fraction, seed=recipe.train.seed)
    recipe.adapt.source_fraction = float(fraction) if source is not None else 0.0
    return dataset, float(fraction) if dataset is not None else 0.0
