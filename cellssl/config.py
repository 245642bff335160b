"""Typed configuration: a recipe is a tree of dataclasses loaded from YAML.

A recipe file has one mapping per section (``data``, ``views``, ``model``, ``method``, ``optim``,
``train``, ``eval``, ``adapt``). Values are checked against the dataclass field types once, at
load; an unknown key fails with its dotted name and the nearest valid key. Command-line
overrides use the same dotted names: ``--set method.sv_weight=0.2``.

Example::

    recipe = load_recipe("blood_smear", overrides=["train.batch_size=64"])
    recipe.train.batch_size  # 64
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from cellssl.errors import ConfigError, did_you_mean


def recipes_dir() -> Path:
    """The folder of shipped recipes.

    A source checkout (``pyproject.toml`` beside the package) uses its top-level ``recipes/``:
    the one copy in git, which the build maps to the package ``cellssl.recipes``. An installed
    package (wheel, ``pip install .``) finds that package's data with :mod:`importlib.resources`.
    """
    top = Path(__file__).resolve().parent.parent
    if (top / "pyproject.toml").is_file() and (top / "recipes").is_dir():
        return top / "recipes"
    try:
        root = importlib.resources.files("cellssl.recipes")
    except ModuleNotFoundError:
        return top / "recipes"
    # recipes/ has no __init__.py, so this is a namespace package (a MultiplexedPath): its files
    # are plain paths on disk, and their parent is the folder.
    for child in root.iterdir():
        return Path(str(child)).parent
    return top / "recipes"


RECIPES_DIR = recipes_dir()


@dataclass
class DataConfig:
    """Where images come from and how pixel values are read."""

    path: Optional[str] = None  # folder of images; None = the built-in synthetic smear set
    modality: str = "brightfield"  # brightfield | fluorescence
    channels: Optional[int] = None  # None = detect from the first readable image
    image_size: int = 64  # side of the square network input, in pixels
    intensity: str = "auto"  # auto | uint8 | percentile | minmax | none
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    percentile_scope: str = "image"  # image | dataset
    tiff_page: Optional[int] = None  # a page of a multi-page TIFF; None = project all pages
    tiff_projection: str = "max"  # max | mean, for multi-page stacks
    mean: Optional[list[float]] = None  # per-channel mean for input normalisation (None = 0.5)
    std: Optional[list[float]] = None  # per-channel std (None = 0.25)
    num_workers: int = 2
    max_bad_fraction: float = 0.5  # stop when more than this fraction of files is unreadable
    stain_normalize: str = "none"  # none | reinhard | macenko (bright-field only)
    stain_reference: Optional[str] = None  # image or folder the stain normaliser is fitted on
    # micrometres per pixel of these images (None = unknown); a checkpoint keeps it as the model's
    # scale, and a folder read with another declared scale (--um-per-px) is resampled to it
    um_per_px: Optional[float] = None
    synth_n: int = 800  # images in the built-in synthetic set
    synth_seed: int = 0


@dataclass
class ViewsConfig:
    """Multi-view augmentation (see ``cellssl.augment``)."""

    n_views: int = 2  # M global views per image
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.8, 1.25])
    rotate: bool = True  # any angle
    flip: bool = True
    hed_jitter: float = 0.04  # bright-field stain jitter in HED space (std of the shift)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.15
    hue: float = 0.03
    color_jitter_prob: float = 0.8
    # Views that survive a change of lab (all off by default; bright-field RGB only, refused otherwise):
    grayscale_p: float = 0.0  # probability of a greyscale view (luminance in all three channels)
    # RandStainNA-style stain augmentation: with probability randstain_p, re-stain the view to a style
    # sampled in LAB around randstain_mean (typical per-image mean L, a, b, then std L, a, b) with spread
    # randstain_std x randstain_sigma. Defaults: 300 pbc128 Wright-Giemsa smears (augment.views.lab_stain_stats
    # measures them for another training set).
    randstain_p: float = 0.0
    randstain_std: float = 1.0
    randstain_mean: list[float] = field(default_factory=lambda: [79.4, 10.8, 7.2, 15.6, 8.2, 13.2])
    randstain_sigma: list[float] = field(default_factory=lambda: [3.2, 1.7, 4.0, 2.8, 1.7, 2.9])
    channel_intensity: float = 0.25  # fluorescence: per-channel gain jitter
    gamma: list[float] = field(default_factory=lambda: [0.8, 1.25])
    blur_prob: float = 0.3
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.5])
    noise_prob: float = 0.2
    noise_std: float = 0.02
    poisson_prob: float = 0.0
    elastic_prob: float = 0.0
    # zoom out: with probability zoom_out_p a view shows the whole image shrunk by z, log z ~ U(0, log
    # zoom_out_max), on the background colour (scale jitter below 1x: another lab's cells are ~1.5x smaller)
    zoom_out_p: float = 0.0
    zoom_out_max: float = 1.5
    local_views: int = 0
    local_size: int = 32
    local_scale: list[float] = field(default_factory=lambda: [0.1, 0.4])


@dataclass
class ModelConfig:
    """Backbone (any timm name) and heads."""

    backbone: str = "resnet18"
    # stem (ResNets): default (7x7/2 + pool) | pool (3x3/1 + pool, 2x less downsampling) | small (3x3/1, no pool)
    stem: str = "default"
    proj_hidden: int = 1024
    proj_dim: int = 256
    pred_hidden: int = 1024
    sync_bn: bool = False
    channels_last: bool = True  # channels-last memory format on CUDA
    channels_last_cpu: bool = False  # the same on the CPU (benchmarks/cpu_speed.py measures it)
    drop_path: float = 0.0
    # starting weights: a timm tag (resnet50.a1_in1k) or a .safetensors/.pth file; None = random
    pretrained: Optional[str] = None


@dataclass
class MethodConfig:
    """Self-supervised method and its loss weights."""

    name: str = "msbreg"
    momentum_base: float = 0.99  # EMA momentum at step 0 (cosine schedule to momentum_end)
    momentum_end: float = 1.0
    # MSBReg (docs: shared msbreg.md)
    centroid_weight: float = 1.0
    sv_weight: float = 0.1
    brownian_weight: float = 0.1
    # centroid_variant: per_view = each online view against the target centroid of the *other*
    # views (default, msbreg.md eq. 1); halves = online centroid of one half of the views against
    # the target centroid of the other half, both ways; same_views = online centroid against the
    # target centroid of the same views (ablation only: satisfiable without invariance).
    centroid_variant: str = "per_view"
    sv_variant: str = "logdet"  # logdet | flat
    sv_eps: float = 1e-4
    # sv_on: per_view = the loss on each view's batch, averaged over views (default);
    # centroid = on the per-image centroids of the views; stacked = on all views stacked into one
    # batch (ablation only: it rewards pushing two views of one image apart).
    sv_on: str = "per_view"
    # baselines
    temperature: float = 0.2  # SimCLR NT-Xent
    vicreg_sim: float = 25.0
    vicreg_var: float = 25.0
    vicreg_cov: float = 1.0
    barlow_lambda: float = 0.0051


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    name: str = "adamw"  # adamw | lars | sgd
    lr: float = 2e-3
    scale_lr: bool = False  # multiply lr by batch_size / 256 (LARS convention)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_fraction: float = 0.05  # of the run's steps
    warmup_steps: Optional[int] = None  # overrides warmup_fraction when set
    min_lr_ratio: float = 0.01
    grad_clip: float = 0.0  # 0 = off
    # Predictor LR (methods with a predictor): lr × predictor_lr_scale, following the backbone's
    # warm-up + cosine schedule ("cosine") or held at its peak after warm-up ("constant",
    # the SimSiam / DirectPred setting).
    predictor_lr_scale: float = 1.0
    predictor_lr_schedule: str = "cosine"
    lars_eta: float = 0.02


@dataclass
class TrainConfig:
    """Length, device and bookkeeping of a run."""

    out: Optional[str] = None  # run folder; None = runs/<recipe>-<time>
    batch_size: int = 128
    epochs: Optional[int] = 10
    max_steps: Optional[int] = None  # overrides epochs when set
    # Wall-clock budget: the step time is measured over the first ``budget_probe_steps`` steps,
    # then the schedule (warm-up, cosine LR, EMA τ) is sized to the steps that fit and stored in
    # the checkpoint, so the run anneals fully and ``--resume`` keeps the same schedule.
    max_minutes: Optional[float] = None
    budget_probe_steps: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto (bf16 on CUDA, fp32 on CPU) | fast (bf16 on CUDA and on CPUs with AMX-BF16, else fp32)
    # | bf16 | fp16 | fp32 (cellssl.engine.hardware)
    precision: str = "auto"
    compile: bool = False  # torch.compile (inductor) the training step, on any device
    threads: Optional[int] = None  # torch CPU threads; None = torch default
    checkpoint_every: int = 100
    log_every: int = 10
    monitor_every: int = 50  # collapse monitor (effective rank, per-dim std)
    collapse_rank_fraction: float = 0.02  # warn when eff. rank < this x proj_dim
    collapse_std_fraction: float = 0.1  # warn when mean per-dim std < this / sqrt(D)
    stop_on_collapse: bool = False
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    # A stage of a step (waiting for a batch, forward, update, logging, checkpoint) that lasts longer
    # stops the run with a one-line error and a stack dump in the run folder (engine.watchdog); 0 = off.
    stall_timeout_s: float = 600.0
    progress: bool = True


@dataclass
class EvalConfig:
    """Evaluation defaults, and the online kNN monitor during pretraining."""

    knn_every: int = 0  # steps; 0 = off
    knn_data: Optional[str] = None  # labelled folder for the monitor
    knn_k: int = 20
    knn_temperature: float = 0.07
    ways: Optional[int] = None  # None = all classes
    shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    queries: int = 15
    episodes: int = 600
    batch_size: int = 256


@dataclass
class AdaptConfig:
    """Continued self-supervised training on a new lab's unlabelled images."""

    lr_scale: float = 0.2  # adapt lr = optim.lr * lr_scale
    momentum_base: float = 0.996
    max_steps: int = 300
    source_fraction: float = 0.0


@dataclass
class Recipe:
    """A whole run: every section with its defaults."""

    name: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)


_CHOICES = {
    "data.modality": ("brightfield", "fluorescence"),
    "data.intensity": ("auto", "uint8", "percentile", "minmax", "none"),
    "data.percentile_scope": ("image", "dataset"),
    "data.tiff_projection": ("max", "mean"),
    "data.stain_normalize": ("none", "reinhard", "macenko"),
    "model.stem": ("default", "pool", "small"),
    "method.centroid_variant": ("per_view", "halves", "same_views"),
    "method.sv_on": ("per_view", "centroid", "stacked"),
    "optim.predictor_lr_schedule": ("cosine", "constant"),
    "method.sv_variant": ("logdet", "flat"),
    "optim.name": ("adamw", "lars", "sgd"),
    "train.precision": ("auto", "fast", "bf16", "fp16", "fp32"),
}


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``lo`` / ``hi`` bounds (None = unbounded), each closed or open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return not (self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi))

    def describe(self) -> str:
        """``"at least 1"``, ``"> 0"``, ``"in [0, 1)"``, ..."""
        lo, hi = (None if b is None else str(int(b)) if float(b).is_integer() else f"{b:g}" for b in (self.lo, self.hi))
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"> {lo}" if self.lo_open else f"at least {lo}"
        return f"< {hi}" if self.hi_open else f"at most {hi}"


_POS = Range(0, lo_open=True)  # > 0
_NONNEG = Range(0)  # >= 0
_PROB = Range(0, 1)  # [0, 1]
_FRACTION = Range(0, 1, hi_open=True)  # [0, 1)
_SEED = Range(0, 2**32 - 1)  # what NumPy accepts

# Allowed ranges of the numeric recipe values (each element of a list value), checked by
# ``validate`` on every recipe; the CLI options that set a recipe value read the same entry
# (cellssl.cli.RecipeValue). Every float must also be finite.
_RANGES: dict[str, Range] = {
    "data.channels": Range(1), "data.image_size": Range(8), "data.percentiles": Range(0, 100),
    "data.std": _POS, "data.num_workers": _NONNEG, "data.max_bad_fraction": _PROB, "data.synth_n": Range(1),
    "data.synth_seed": _SEED, "data.um_per_px": _POS,
    "views.n_views": Range(2), "views.crop_scale": Range(0, 1, lo_open=True), "views.crop_ratio": _POS,
    "views.hed_jitter": _NONNEG, "views.brightness": _NONNEG, "views.contrast": _NONNEG,
    "views.saturation": _NONNEG, "views.hue": Range(0, 0.5), "views.color_jitter_prob": _PROB,
    "views.grayscale_p": _PROB, "views.randstain_p": _PROB, "views.randstain_std": _NONNEG,
    "views.randstain_mean": Range(-128, 128), "views.randstain_sigma": _NONNEG, "views.zoom_out_p": _PROB,
    "views.zoom_out_max": Range(1),
    "views.channel_intensity": _NONNEG, "views.gamma": _POS, "views.blur_prob": _PROB, "views.blur_sigma": _NONNEG,
    "views.noise_prob": _PROB, "views.noise_std": _NONNEG, "views.poisson_prob": _PROB, "views.elastic_prob": _PROB,
    "views.local_views": _NONNEG, "views.local_size": Range(8), "views.local_scale": Range(0, 1, lo_open=True),
    "model.proj_hidden": Range(1), "model.proj_dim": Range(1), "model.pred_hidden": Range(1),
    "model.drop_path": _FRACTION,
    "method.momentum_base": _PROB, "method.momentum_end": _PROB, "method.centroid_weight": _NONNEG,
    "method.sv_weight": _NONNEG, "method.brownian_weight": _NONNEG, "method.sv_eps": _POS,
    "method.temperature": _POS, "method.vicreg_sim": _NONNEG, "method.vicreg_var": _NONNEG,
    "method.vicreg_cov": _NONNEG, "method.barlow_lambda": _NONNEG,
    "optim.lr": _POS, "optim.weight_decay": _NONNEG, "optim.momentum": _FRACTION, "optim.warmup_fraction": _FRACTION,
    "optim.warmup_steps": _NONNEG, "optim.min_lr_ratio": _PROB, "optim.grad_clip": _NONNEG,
    "optim.predictor_lr_scale": _POS, "optim.lars_eta": _POS,
    "train.batch_size": Range(2), "train.epochs": Range(1), "train.max_steps": Range(1), "train.max_minutes": _POS,
    "train.budget_probe_steps": Range(1), "train.seed": _SEED, "train.threads": Range(1),
    "train.checkpoint_every": Range(1), "train.log_every": Range(1), "train.monitor_every": Range(1),
    "train.collapse_rank_fraction": _NONNEG, "train.collapse_std_fraction": _NONNEG, "train.max_nonfinite": Range(1),
    "train.stall_timeout_s": _NONNEG,
    "eval.knn_every": _NONNEG, "eval.knn_k": Range(1), "eval.knn_temperature": _POS, "eval.ways": Range(2),
    "eval.shots": Range(1), "eval.queries": Range(1), "eval.episodes": Range(1), "eval.batch_size": Range(1),
    "adapt.lr_scale": _POS, "adapt.momentum_base": _PROB, "adapt.max_steps": Range(1),
    "adapt.source_fraction": _FRACTION,
}

# Command-line options that are not recipe values, checked the same way: key -> (type, range).
OPTIONS: dict[str, tuple[type, Range]] = {
    "views --n": (int, Range(1)),
    "finetune --labels-per-class": (int, Range(1)),
    "finetune --val-fraction": (float, _FRACTION),
    "--split": (float, Range(0, 1, lo_open=True, hi_open=True)),
    "datasets tile --size": (int, Range(8)),
    "datasets shard --shard-size": (int, Range(1)),
}


def check_value(key: str, value: Any, label: str | None = None) -> None:
    """Raise ConfigError when ``value`` (or an element of a list value) of ``key`` is a
    non-finite float or outside ``key``'s range; ``label`` names it in the message (default ``key``)."""
    rng = value_range(key)
    for x in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        if isinstance(x, float) and not math.isfinite(x):
            raise ConfigError(f"{label or key} must be a finite number, got {x}")
        if rng is not None and x not in rng:
            raise ConfigError(f"{label or key} must be {rng.describe()}, got {x!r}")


def value_range(key: str) -> Range | None:
    """The allowed range of recipe value (or :data:`OPTIONS` entry) ``key``, or None."""
    return _RANGES.get(key) or (OPTIONS[key][1] if key in OPTIONS else None)


def value_type(key: str, element: bool = False) -> Any:
    """The annotated type of recipe value ``key`` (``"train.max_steps"``) or of an :data:`OPTIONS`
    key; ``element=True``: without ``Optional`` and, for a list value, of one element."""
    if key in OPTIONS:
        return OPTIONS[key][0]
    section, _, name = key.partition(".")
    cls = typing.get_type_hints(Recipe).get(section)
    hints = typing.get_type_hints(cls) if cls is not None and dataclasses.is_dataclass(cls) else {}
    if name not in hints:
        raise KeyError(key)
    tp = hints[name]
    while element and typing.get_origin(tp) in (Union, types.UnionType, list):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return tp


def parse_value(key: str, value: Any, label: str | None = None) -> Any:
    """Convert and check one value of ``key`` (one element, for a list value) exactly as in a
    recipe: type, finiteness, range; ConfigError naming ``label`` (default ``key``) otherwise."""
    out = _coerce(value, value_type(key, element=True), label or key)
    check_value(key, out, label)
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return f
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        value = str(value)
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(
                f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}"
                + did_you_mean(value, _CHOICES[key])
            )
        return value
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"unknown recipe key '{dotted}'"
                + did_you_mean(str(key), names).replace("'", f"'{prefix}", 1)
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def migrate_legacy(values: dict[str, Any]) -> dict[str, Any]:
    """Rewrite keys and values of older recipes/checkpoints to today's names (a copy).

    ``method.sv_per_view: true|false`` -> ``method.sv_on: per_view|stacked``;
    ``method.centroid_variant: centroid`` -> ``same_views`` (the same-view form it named).
    """
    method = values.get("method")
    if not isinstance(method, dict):
        return values
    method = dict(method)
    if "sv_per_view" in method:
        legacy = method.pop("sv_per_view")
        per_view = _coerce(legacy, bool, "method.sv_per_view")
        method["sv_on"] = "per_view" if per_view else "stacked"
    if method.get("centroid_variant") == "centroid":
        method["centroid_variant"] = "same_views"
    return {**values, "method": method}


def migrate_checkpoint_config(values: dict[str, Any]) -> dict[str, Any]:
    """The recipe stored in an older checkpoint, made valid today (a copy): ``train.max_steps: 0``
    and ``train.threads: 0`` were once accepted and read as "not set"; they are null now."""
    train = values.get("train") if isinstance(values, dict) else None
    if not isinstance(train, dict):
        return values
    zero = [k for k in ("max_steps", "threads") if train.get(k) == 0 and not isinstance(train.get(k), bool)]
    return {**values, "train": {**train, **{k: None for k in zero}}} if zero else values


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    """Build a validated :class:`Recipe` from a nested mapping (unknown keys raise; older key
    names are migrated first, see :func:`migrate_legacy`)."""
    recipe = _build(Recipe, migrate_legacy(values), "")
    validate(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain nested dicts (for YAML and checkpoints)."""
    return dataclasses.asdict(recipe)


def validate(recipe: Recipe) -> None:
    """Every numeric value finite and in its range (:data:`_RANGES`), then cross-field checks
    that types alone cannot express."""
    for section in dataclasses.fields(recipe):
        part = getattr(recipe, section.name)
        if dataclasses.is_dataclass(part):
            for f in dataclasses.fields(part):
                check_value(f"{section.name}.{f.name}", getattr(part, f.name))
    for key in ("views.crop_scale", "views.crop_ratio", "views.gamma", "views.blur_sigma", "views.local_scale",
                "data.percentiles"):
        section, name = key.split(".")
        pair = getattr(getattr(recipe, section), name)
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ConfigError(f"{key} must be [low, high] with low <= high, got {pair}")
    for key, n in (("randstain_mean", 6), ("randstain_sigma", 6)):
        if len(getattr(recipe.views, key)) != n:
            raise ConfigError(f"views.{key} must hold {n} numbers (L, a, b means, then L, a, b stds), "
                              f"got {getattr(recipe.views, key)}")
    if recipe.views.randstain_mean[3:] and min(recipe.views.randstain_mean[3:]) <= 0:
        raise ConfigError(f"views.randstain_mean: the last three values are LAB stds and must be > 0, "
                          f"got {recipe.views.randstain_mean}")
    if recipe.method.centroid_variant == "halves" and recipe.views.n_views % 2:
        raise ConfigError(
            f"method.centroid_variant=halves splits the views into two equal halves: views.n_views must be even, "
            f"got {recipe.views.n_views}"
        )


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``recipes/``."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe name (``blood_smear``, ``ablation/centroid``) or a path to a YAML file -> the file's path.

    A path ``recipes/...`` that does not exist from the working directory is looked up among the
    shipped recipes, so ``--overlay recipes/ablation/centroid.yaml`` works from any folder.
    """
    p = Path(name_or_path)
    if p.is_dir():
        raise ConfigError(f"recipe {p} is a folder: pass a recipe name or a .yaml file")
    if p.exists() and p.is_file():
        return p
    rel = Path(*p.parts[1:]) if p.parts[:1] == ("recipes",) else p
    shipped = RECIPES_DIR / (rel if rel.suffix in (".yaml", ".yml") else rel.with_name(rel.name + ".yaml"))
    if not p.is_absolute() and shipped.is_file():
        return shipped
    if p.suffix in (".yaml", ".yml") or p.exists():
        raise ConfigError(f"recipe file {p} does not exist")
    names = available_recipes()
    raise ConfigError(
        f"unknown recipe '{name_or_path}'{did_you_mean(name_or_path, names)}; "
        f"available: {', '.join(names) or '(none)'}, or pass a path to a .yaml file"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1"`` -> (["a", "b"], 1); the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` style overrides to a nested mapping (in place; also returned)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': {part} is not a section")
        node[parts[-1]] = value
    return values


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections (data:, model:, ...)")
    return values


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Nested-dict merge: values of ``top`` win; sections are merged key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(name_or_path: str | None = "blood_smear", overrides: list[str] | None = None,
                overlays: list[str] | None = None) -> Recipe:
    """Load a recipe by name or path, merge YAML ``overlays`` (e.g. ``recipes/ablation/*.yaml``),
    apply ``--set`` overrides, validate, return it."""
    values: dict[str, Any] = {}
    if name_or_path:
        path = resolve_recipe_path(name_or_path)
        values = _read_yaml(path)
        values.setdefault("name", path.stem)
    for overlay in overlays or []:
        values = deep_merge(values, _read_yaml(resolve_recipe_path(overlay)))
    apply_overrides(values, overrides or [])
    return recipe_from_dict(values)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
