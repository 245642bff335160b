"""Typed configuration: a recipe is a tree of dataclasses loaded from YAML.

A recipe file has one mapping per section (``data``, ``views``, ``model``, ``method``, ``optim``,
``train``, ``eval``, ``adapt``). Values are checked against the dataclass field types once, at
load; an unknown key fails with its dotted name and the nearest valid key. Command-line
overrides use the same dotted names: ``--set method.sv_weight=0.2``.

Example::

    recipe = load_recipe("blood_smear", overrides=["train.batch_size=64"])
    recipe.train.batch_size  # 64

The ``method`` section is the one section whose fields depend on a value: each method declares
its own settings beside it (``cellssl/methods/<name>.py``) as a dataclass that subclasses
:class:`MethodConfig` (the fields every method shares: ``name``, ``momentum_base``,
``momentum_end``), with each field's range, choices and one line of documentation in its metadata
(:func:`setting`). This module may import only ``errors``, so it cannot look the methods up: a
method's module registers its settings here when it is imported (``register_method`` in
``cellssl.methods.base`` calls :func:`register_method_settings`), and building a recipe reads that
registry (:func:`method_settings`). Whoever builds a recipe therefore imports ``cellssl.methods``
first (the engine's checkpoint module does, so every command does). The recipe keys stay flat
(``method.sv_weight``); a key of another method is refused unless it holds that method's default,
which is how recipes, run folders and checkpoints written before the split (every method's fields
in one list) still load.
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
    # a streaming source (--data pipe:/file:/http(s) URL of shards, cellssl.data.stream): the cells each
    # loader worker shuffles among, and how long a shard may give no data before it is an error
    shuffle_buffer: int = 1000
    stream_timeout_s: float = 120.0
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


def setting(default: Any, within: Range | None = None, doc: str = "", choices: tuple[str, ...] = ()) -> Any:
    """A method setting: a dataclass field with ``default``, whose metadata holds its allowed
    range (``within``), its allowed words (``choices``) and one line of documentation (``doc``).

    Recipe validation, ``cellssl list methods`` and :func:`value_range` read them from the field,
    so a method declares each setting once, beside the method::

        vicreg_sim: float = setting(25.0, Range(0), "λ, weight of the invariance term")
    """
    return field(default=default, metadata={"range": within, "choices": tuple(choices), "doc": doc})


@dataclass
class MethodConfig:
    """The settings every self-supervised method shares; each method's own settings subclass it.

    A method's settings dataclass lives in its file (``cellssl/methods/<name>.py``) and is
    registered with the method; ``recipe.method`` is an instance of it, so ``recipe.method.sv_weight``
    is a field of MSBReg's settings. Build one with :func:`method_config`.
    """

    name: str = ""  # the registered method; "" = the method these settings are registered for
    momentum_base: float = setting(0.99, _PROB, "EMA momentum τ at step 0 (cosine schedule to momentum_end)")
    momentum_end: float = setting(1.0, _PROB, "EMA momentum τ at the last step")

    def __post_init__(self) -> None:
        if not self.name:
            self.name = next((n for n, cls in METHOD_SETTINGS.items() if cls is type(self)), "")

    def check(self, recipe: Recipe) -> None:
        """Checks of these settings against the rest of ``recipe`` that types and ranges cannot
        express (ConfigError); none by default, a method's settings override it."""


DEFAULT_METHOD = "msbreg"
# name -> settings dataclass of each method, filled by cellssl.methods.register_method at import time
METHOD_SETTINGS: dict[str, type[MethodConfig]] = {}


def register_method_settings(name: str, settings: type[MethodConfig]) -> None:
    """Register ``settings`` (a dataclass subclassing :class:`MethodConfig`) as the settings of
    method ``name``: recipes with ``method.name: <name>`` take their ``method.*`` keys from its fields."""
    if not (isinstance(settings, type) and issubclass(settings, MethodConfig) and dataclasses.is_dataclass(settings)):
        raise TypeError(f"the settings of method '{name}' must be a dataclass subclassing MethodConfig, "
                        f"got {settings!r}")
    METHOD_SETTINGS[name] = settings


def unregister_method_settings(name: str) -> None:
    """Remove method ``name``'s settings from the registry (a method defined for a moment, in a test)."""
    METHOD_SETTINGS.pop(name, None)


def method_settings(name: str) -> type[MethodConfig]:
    """The settings dataclass of method ``name``; ConfigError naming the registered ones otherwise."""
    if not METHOD_SETTINGS:
        raise RuntimeError("no method is registered: import cellssl.methods before building a recipe "
                           "(cellssl.config cannot import it, see docs/architecture.md)")
    if name not in METHOD_SETTINGS:
        raise ConfigError(f"unknown method.name '{name}'{did_you_mean(str(name), METHOD_SETTINGS)}; "
                          f"available: {', '.join(sorted(METHOD_SETTINGS))}")
    return METHOD_SETTINGS[name]


def method_config(name: str = DEFAULT_METHOD, **values: Any) -> MethodConfig:
    """The settings of method ``name`` with ``values`` changed from their defaults (not validated:
    :func:`validate` checks a whole recipe)."""
    return method_settings(name)(name=name, **values)


def method_keys(settings: type[MethodConfig]) -> list[str]:
    """The recipe keys (``method.<field>``) of a method's settings dataclass."""
    return [f"method.{f.name}" for f in dataclasses.fields(settings)]


def setting_lines(settings: type[MethodConfig], own_only: bool = False) -> list[str]:
    """One line per setting of a method's settings dataclass: ``method.<field>=<default>``, its
    range or choices, its documentation (``own_only``: without the fields every method shares)."""
    shared = {f.name for f in dataclasses.fields(MethodConfig)}
    lines = []
    for f in dataclasses.fields(settings):
        if f.name == "name" or (own_only and f.name in shared):
            continue
        rng, choices = f.metadata.get("range"), f.metadata.get("choices", ())
        allowed = f" ({rng.describe() if rng else ' | '.join(choices)})" if rng or choices else ""
        lines.append(f"method.{f.name}={f.default}{allowed}: {f.metadata.get('doc') or ''}")
    return lines


def with_method(values: dict[str, Any], name: str) -> dict[str, Any]:
    """A recipe mapping switched to method ``name`` (a copy): the ``method`` section keeps the
    settings every method shares (:class:`MethodConfig`'s) and drops the previous method's own
    (unchanged when it is already ``name``'s)."""
    method = values.get("method") if isinstance(values.get("method"), dict) else {}
    if method.get("name", DEFAULT_METHOD) == name:
        return values
    shared = {f.name for f in dataclasses.fields(MethodConfig)}
    return {**values, "method": {**{k: v for k, v in method.items() if k in shared}, "name": name}}


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
    # the checkpoint, so the run anneals fully and ``--resume`` keeps the same schedule. The first steps
    # run slower than the rest (measured: ~1.2 s against ~1.05 s for an MSBReg step after compiling),
    # so the schedule is re-sized ``budget_replans`` more times at even steps through the run, each from
    # the rate measured since the last sizing (0 = size it once).
    max_minutes: Optional[float] = None
    budget_probe_steps: int = 10
    budget_replans: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto (bf16 on CUDA, fp32 on CPU) | fast (bf16 on CUDA and on CPUs with AMX-BF16, else fp32)
    # | bf16 | fp16 | fp32 (cellssl.engine.hardware)
    precision: str = "auto"
    # The EMA target's forward (MSBReg, BYOL): auto (bf16 autocast in an fp32 run on a CPU with native
    # bf16 dot products, AVX512-BF16 or AMX-BF16, where it is 2x faster; else as the run) | same (as the
    # run) | bf16 (cellssl.engine.hardware)
    target_precision: str = "auto"
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
    # features averaged over the 8 rotations/flips of each crop (cellssl.models.orientation):
    # auto = dihedral when views.rotate and views.flip (the model was trained to ignore orientation)
    tta: str = "auto"


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
    method: MethodConfig = field(default_factory=method_config)  # the method's own settings (its file)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)


TTA_CHOICES = ("auto", "none", "dihedral")  # eval.tta and the evaluation commands' --tta

# Allowed words of the string recipe values (a method's own: in its settings' field metadata).
_CHOICES = {
    "data.modality": ("brightfield", "fluorescence"),
    "data.intensity": ("auto", "uint8", "percentile", "minmax", "none"),
    "data.percentile_scope": ("image", "dataset"),
    "data.tiff_projection": ("max", "mean"),
    "data.stain_normalize": ("none", "reinhard", "macenko"),
    "model.stem": ("default", "pool", "small"),
    "optim.predictor_lr_schedule": ("cosine", "constant"),
    "optim.name": ("adamw", "lars", "sgd"),
    "train.precision": ("auto", "fast", "bf16", "fp16", "fp32"),
    "train.target_precision": ("auto", "same", "bf16"),
    "eval.tta": TTA_CHOICES,
}


# Allowed ranges of the numeric recipe values (each element of a list value), checked by
# ``validate`` on every recipe; the CLI options that set a recipe value read the same entry
# (cellssl.cli.RecipeValue). Every float must also be finite. The method settings' ranges are in
# their field metadata (:func:`setting`).
_RANGES: dict[str, Range] = {
    "data.channels": Range(1), "data.image_size": Range(8), "data.percentiles": Range(0, 100),
    "data.std": _POS, "data.num_workers": _NONNEG, "data.max_bad_fraction": _PROB, "data.synth_n": Range(1),
    "data.synth_seed": _SEED, "data.um_per_px": _POS,
    "data.shuffle_buffer": Range(1), "data.stream_timeout_s": _POS,
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
    "optim.lr": _POS, "optim.weight_decay": _NONNEG, "optim.momentum": _FRACTION, "optim.warmup_fraction": _FRACTION,
    "optim.warmup_steps": _NONNEG, "optim.min_lr_ratio": _PROB, "optim.grad_clip": _NONNEG,
    "optim.predictor_lr_scale": _POS, "optim.lars_eta": _POS,
    "train.batch_size": Range(2), "train.epochs": Range(1), "train.max_steps": Range(1), "train.max_minutes": _POS,
    "train.budget_probe_steps": Range(1), "train.budget_replans": _NONNEG, "train.seed": _SEED,
    "train.threads": Range(1),
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
    _check_number(value, value_range(key), label or key)


def _check_number(value: Any, rng: Range | None, label: str) -> None:
    """Raise ConfigError naming ``label`` when a number of ``value`` (one, or a list) is not finite
    or not in ``rng``; other values pass."""
    for x in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        if isinstance(x, float) and not math.isfinite(x):
            raise ConfigError(f"{label} must be a finite number, got {x}")
        if rng is not None and x not in rng:
            raise ConfigError(f"{label} must be {rng.describe()}, got {x!r}")


def _section_classes(section: str) -> list[type]:
    """The dataclasses recipe section ``section`` can be: one, or for ``method`` the shared
    :class:`MethodConfig` and every registered method's settings."""
    cls = typing.get_type_hints(Recipe).get(section)
    if cls is MethodConfig:
        return [MethodConfig, *METHOD_SETTINGS.values()]
    return [cls] if cls is not None and dataclasses.is_dataclass(cls) else []


def _field_of(key: str) -> tuple[type, dataclasses.Field] | None:
    """(dataclass, field) of recipe value ``key`` (``"method.sv_weight"``), or None."""
    section, _, name = key.partition(".")
    for cls in _section_classes(section):
        for f in dataclasses.fields(cls):
            if f.name == name:
                return cls, f
    return None


def _field_range(key: str, f: dataclasses.Field) -> Range | None:
    """The allowed range of recipe value ``key`` whose dataclass field is ``f``: the field's
    metadata (:func:`setting`), else :data:`_RANGES`."""
    return f.metadata.get("range") or _RANGES.get(key)


def _field_choices(key: str, f: dataclasses.Field) -> tuple[str, ...]:
    """The allowed words of string recipe value ``key`` (field ``f``); () = any string."""
    return tuple(f.metadata.get("choices") or _CHOICES.get(key, ()))


def value_range(key: str) -> Range | None:
    """The allowed range of recipe value (or :data:`OPTIONS` entry) ``key``, or None."""
    if key in OPTIONS:
        return OPTIONS[key][1]
    found = _field_of(key)
    return _field_range(key, found[1]) if found else None


def value_type(key: str, element: bool = False) -> Any:
    """The annotated type of recipe value ``key`` (``"train.max_steps"``) or of an :data:`OPTIONS`
    key; ``element=True``: without ``Optional`` and, for a list value, of one element."""
    if key in OPTIONS:
        return OPTIONS[key][0]
    found = _field_of(key)
    if found is None:
        raise KeyError(key)
    tp = typing.get_type_hints(found[0])[found[1].name]
    while element and typing.get_origin(tp) in (Union, types.UnionType, list):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return tp


def parse_value(key: str, value: Any, label: str | None = None) -> Any:
    """Convert and check one value of ``key`` (one element, for a list value) exactly as in a
    recipe: type, choices, finiteness, range; ConfigError naming ``label`` (default ``key``) otherwise."""
    out = _coerce(value, value_type(key, element=True), label or key)
    found = _field_of(key)
    _check_choice(out, _field_choices(key, found[1]) if found else (), label or key)
    check_value(key, out, label)
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _to_optional(value, tp, key)
    if origin is list:
        return _to_list(value, tp, key)
    convert = _SCALARS.get(tp)
    return convert(value, key) if convert else value


def _to_optional(value: Any, tp: Any, key: str) -> Any:
    """``Optional[X]``: None (also the words none / null) or an X."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    return _coerce(value, [a for a in typing.get_args(tp) if a is not type(None)][0], key)


def _to_list(value: Any, tp: Any, key: str) -> list:
    """``list[X]``: a list of X; one number or string is a list of one."""
    (inner,) = typing.get_args(tp)
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return [_coerce(v, inner, key) for v in value]


def _to_bool(value: Any, key: str) -> bool:
    """A boolean, or one of the words true/false/yes/no/1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _to_int(value: Any, key: str) -> int:
    """An integer, or a number / string of a whole number (``1e3``, ``"7"``)."""
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


def _to_float(value: Any, key: str) -> float:
    """A finite number (an int or a numeric string converts)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(f):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return f


def _to_str(value: Any, key: str) -> str:
    """A string (a number converts)."""
    if not isinstance(value, (str, int, float)):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value)


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _check_choice(value: Any, choices: tuple[str, ...], key: str) -> None:
    """ConfigError naming ``key`` when string ``value`` is not one of ``choices`` (() = any)."""
    if choices and isinstance(value, str) and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}" + did_you_mean(value, choices))


def _section_class(cls: type, values: dict[str, Any], prefix: str) -> type:
    """The dataclass a recipe section is built as: ``cls``, or for the ``method`` section the
    settings of the method its ``name`` gives (default :data:`DEFAULT_METHOD`)."""
    if cls is not MethodConfig:
        return cls
    return method_settings(_to_str(values.get("name", DEFAULT_METHOD), f"{prefix}name"))


def _unknown_key(cls: type, key: Any, prefix: str) -> ConfigError:
    """The error for key ``key`` that dataclass ``cls`` does not have: the nearest valid key, and
    for a method's settings which method the key belongs to and the method's keys."""
    names = [f.name for f in dataclasses.fields(cls)]
    near = did_you_mean(str(key), names).replace("'", f"'{prefix}", 1)
    if not issubclass(cls, MethodConfig):
        return ConfigError(f"unknown recipe key '{prefix}{key}'{near}")
    name = cls().name
    owners = [n for n, c in sorted(METHOD_SETTINGS.items()) if key in {f.name for f in dataclasses.fields(c)}]
    of = f" (a setting of {', '.join(owners)})" if owners else near
    return ConfigError(f"unknown recipe key '{prefix}{key}' for method '{name}'{of}; "
                       f"the keys of {name}: {', '.join(method_keys(cls))}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys, types and choices."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {values!r}")
    cls = _section_class(cls, values, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(cls, key, prefix)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
            _check_choice(kwargs[key], _field_choices(dotted, fields[key]), dotted)
    return cls(**kwargs)


def migrate_legacy(values: dict[str, Any]) -> dict[str, Any]:
    """Rewrite keys and values of older recipes/checkpoints to today's names (a copy).

    ``method.sv_per_view: true|false`` -> ``method.sv_on: per_view|stacked``;
    ``method.centroid_variant: centroid`` -> ``same_views`` (the same-view form it named);
    a ``method.*`` key of another method that holds that method's default is dropped (recipes,
    run folders and checkpoints written when one flat list held every method's settings).
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
    return {**values, "method": _drop_foreign_keys(method, only_defaults=True)}


def _drop_foreign_keys(method: dict[str, Any], only_defaults: bool) -> dict[str, Any]:
    """The ``method`` section without the keys that are not settings of its own method (all of
    them, or ``only_defaults``: those equal to the default of another method that has the key)."""
    name = method.get("name", DEFAULT_METHOD)
    if not isinstance(name, str) or name not in METHOD_SETTINGS:
        return method  # building the recipe names the unknown method
    own = {f.name for f in dataclasses.fields(METHOD_SETTINGS[name])}

    def foreign(key: Any, value: Any) -> bool:
        return key not in own and (_is_default_elsewhere(key, value) or (not only_defaults and _is_setting(key)))

    return {k: v for k, v in method.items() if not foreign(k, v)}


def _is_setting(key: Any) -> bool:
    """Whether ``key`` is a field of some registered method's settings."""
    return any(key in {f.name for f in dataclasses.fields(c)} for c in METHOD_SETTINGS.values())


def _is_default_elsewhere(key: Any, value: Any) -> bool:
    """Whether ``value`` is the default of setting ``key`` of some registered method."""
    for cls in METHOD_SETTINGS.values():
        f = next((f for f in dataclasses.fields(cls) if f.name == key), None)
        if f is not None and _same_value(value, typing.get_type_hints(cls)[key], f.default, key):
            return True
    return False


def _same_value(value: Any, tp: Any, default: Any, key: str) -> bool:
    """Whether ``value`` converted to ``tp`` equals ``default`` (False when it does not convert)."""
    try:
        return _coerce(value, tp, key) == default
    except ConfigError:
        return False


def migrate_checkpoint_config(values: dict[str, Any]) -> dict[str, Any]:
    """The recipe stored in an older checkpoint, made valid today (a copy): ``train.max_steps: 0``
    and ``train.threads: 0`` were once accepted and read as "not set"; they are null now. The
    ``method`` section keeps only its method's own settings (older checkpoints stored every
    method's fields; the others never acted on the run, whatever their values)."""
    if not isinstance(values, dict):
        return values
    if isinstance(values.get("method"), dict):
        values = {**values, "method": _drop_foreign_keys(values["method"], only_defaults=False)}
    train = values.get("train")
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
    """The recipe as plain nested dicts (for YAML and checkpoints); ``method`` holds the shared
    settings and the method's own, in one flat mapping."""
    return dataclasses.asdict(recipe)


def validate(recipe: Recipe) -> None:
    """Every numeric value finite and in its range (field metadata or :data:`_RANGES`), then
    cross-field checks that types alone cannot express (the method's own in its ``check``)."""
    for section in dataclasses.fields(recipe):
        part = getattr(recipe, section.name)
        if dataclasses.is_dataclass(part):
            for f in dataclasses.fields(part):
                key = f"{section.name}.{f.name}"
                _check_number(getattr(part, f.name), _field_range(key, f), key)
    if type(recipe.method) is not method_settings(recipe.method.name):
        raise ConfigError(f"method.name '{recipe.method.name}' does not match its settings "
                          f"({type(recipe.method).__name__}): build them with cellssl.config.method_config")
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
    recipe.method.check(recipe)


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
