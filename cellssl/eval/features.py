"""Frozen features of a backbone on a folder of images, computed once and reused.

Every evaluation (few-shot, linear probe, kNN, embedding export) starts here: a checkpoint (or a
``random:<timm name>`` baseline, built by the very same :func:`~cellssl.engine.checkpoint.load_backbone`
path) is loaded, the folder is read and normalised with the checkpoint recipe's
:class:`~cellssl.config.DataConfig` (so images look exactly as they did in pretraining), and the
backbone maps every image ``(C, S, S)`` to one feature vector ``(F,)``, averaged over the 8
rotations and flips of the image when the recipe trained for that (``eval.tta``,
:mod:`cellssl.models.orientation`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cellssl.augment.views import build_eval_transform
from cellssl.config import recipe_from_dict
from cellssl.data.datasets import DataWarning, TransformedDataset, batch_images, build_dataset
from cellssl.data.io import ImageReadError, output_file, relative_path
from cellssl.data.parts import Parts, open_parts
from cellssl.data.scale import match_scale
from cellssl.engine.checkpoint import describe, load_backbone
from cellssl.engine.distributed import resolve_device
from cellssl.errors import DataError
from cellssl.eval.settings import DEFAULT_PART_ROWS
from cellssl.models.bn import adapt_batchnorm
from cellssl.models.orientation import orientation_mean, resolve_tta

EMBED_PART_ROWS = DEFAULT_PART_ROWS  # embed writes a larger set in parts of this many rows (resumable; docs/scale.md)

__all__ = [
    "FeatureSet",
    "FeatureOptions",
    "feature_options",
    "save_embeddings",
    "read_embeddings",
    "source_mismatch",
    "adapt_batchnorm_folder",
    "extract_features",
    "load_features",
    "embed",
    "EMBED_PART_ROWS",
    "EmbeddingParts",
    "embedding_parts",
    "assemble_npz",
    "subsample_per_class",
    "align_labels",
    "class_lut",
]


@dataclass
class FeatureSet:
    """Features of one image folder.

    Attributes:
        features: float32 array (N, F), one row per image.
        labels: int64 array (N,), class index into ``classes``; -1 for unlabelled images.
        paths: N file paths as strings, relative to ``root`` when possible.
        classes: class names (empty when unlabelled).
        info: what produced the features: ``spec`` (checkpoint path or ``random:...``),
            ``description``, ``method``, ``step``, ``backbone``, ``in_chans``, ``image_size``,
            ``config`` (recipe dict), ``adapt_bn`` (folder or None), ``data`` (folder),
            ``skipped_images`` (bad files left out, no row).
        root: the data folder.
        rows: the dataset rows (indices into the folder's samples) of these features, or None.
    """

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    classes: list[str]
    info: dict = field(default_factory=dict)
    root: str = ""
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def labelled(self) -> bool:
        """True when every image has a class label (``labels >= 0``) and classes are known."""
        return bool(self.classes) and len(self.labels) > 0 and bool((self.labels >= 0).all())

    def subset(self, idx: Sequence[int] | np.ndarray) -> "FeatureSet":
        """The rows ``idx`` (same classes, info and root)."""
        idx = np.asarray(idx, dtype=np.int64)
        return FeatureSet(
            features=self.features[idx],
            labels=self.labels[idx],
            paths=[self.paths[i] for i in idx],
            classes=list(self.classes),
            info=dict(self.info),
            root=self.root,
            rows=None if self.rows is None else self.rows[idx],
        )


@dataclass
class FeatureOptions:
    """How features are computed: the settings every evaluation command shares (``fewshot``,
    ``knn``, ``linear``, ``embed``, ``select``; their functions take ``options=`` and/or any of these
    fields as keywords, e.g. ``device="cpu"``).

    Attributes:
        image_size: network input side; None = the checkpoint recipe's (64 for ``random:``).
        batch_size, num_workers: feature extraction batch and DataLoader workers.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (or a ``torch.device``).
        adapt_bn: a folder of target images: re-estimate BatchNorm statistics on it (AdaBN) first.
        max_per_class: keep at most this many random images per class (quick runs), drawn with ``seed``.
        seed: for that subsample and the command's own randomness (episodes, splits, AdaBN sample).
        progress: show a progress bar on long extractions.
        um_per_px: micrometres per pixel of the folders read; with the checkpoint recipe's
            ``data.um_per_px`` the images are resampled to the model's scale (:mod:`cellssl.data.scale`).
        tta: ``auto`` | ``none`` | ``dihedral``: average each image's features over its 8 rotations
            and flips (:func:`cellssl.models.orientation.orientation_mean`, 8× the forward passes);
            None = the checkpoint recipe's ``eval.tta`` (``auto``: dihedral when its views rotate and flip).
    """

    image_size: int | None = None
    batch_size: int = 256
    device: str | torch.device = "auto"
    adapt_bn: str | Path | None = None
    max_per_class: int | None = None
    num_workers: int = 0
    seed: int = 0
    progress: bool = True
    um_per_px: float | None = None
    tta: str | None = None


def feature_options(options: FeatureOptions | None = None, **fields: Any) -> FeatureOptions:
    """``options`` (default :class:`FeatureOptions`) with ``fields`` replaced (TypeError naming an unknown one)."""
    return dataclasses.replace(options or FeatureOptions(), **fields)


def extract_features(backbone: nn.Module, dataset: Dataset, device: str | torch.device = "cpu", batch_size: int = 256,
                     num_workers: int = 0, progress: bool = True, tta: str = "none") -> np.ndarray:
    """Backbone features of every item of ``dataset``, in order.

    Args:
        backbone: module mapping images (B, C, S, S) -> features (B, F).
        dataset: yields ``(tensor (C, S, S), label)``.
        device: where the forward passes run.
        tta: ``none`` | ``dihedral`` (the mean over the image's 8 rotations and flips).

    Returns:
        float32 array (N, F), row i = ``backbone(dataset[i][0])`` (or its orientation mean),
        computed in eval mode without gradients (the module's previous train/eval mode is restored
        afterwards).
    """
    return _extract(backbone, dataset, device, batch_size, num_workers, progress, tta)[0]


class _ReadableRows(Dataset):
    """Item k: ``{"image": eval-transformed row keep[k] of ``ds``, "readable": True}``, or zeros and
    ``readable`` False when that file is bad (warned once by the dataset, which also enforces
    ``data.max_bad_fraction``): the row is then left out, never replaced by a neighbour."""

    def __init__(self, ds: Any, transform: Any, keep: np.ndarray, size: int):
        self.ds, self.transform, self.keep = ds, transform, keep
        self.blank = torch.zeros(ds.channels, size, size)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, k: int) -> dict[str, Any]:
        j = int(self.keep[k])
        try:
            return {"image": self.transform(self.ds.read(j)), "readable": True}
        except ImageReadError as exc:
            self.ds.mark_bad(j, exc)
            return {"image": self.blank, "readable": False}


@torch.no_grad()
def _extract(backbone: nn.Module, dataset: Dataset, device: str | torch.device, batch_size: int, num_workers: int,
             progress: bool, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F) float32, readable (N,) bool) of every item of ``dataset`` (see
    :func:`extract_features`); ``readable`` is the items' ``"readable"`` flag, all True without it."""
    device = resolve_device(device)
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    out: list[np.ndarray] = []
    ok: list[np.ndarray] = []
    iterator: Any = loader
    if progress and len(loader) > 4:

        iterator = tqdm(loader, desc="features", unit="batch", leave=False)
    try:
        for batch in iterator:
            x = batch_images(batch).to(device, non_blocking=True).float()
            f = orientation_mean(backbone, x, tta)
            out.append(f.float().cpu().numpy())
            flags = batch.get("readable") if isinstance(batch, dict) else None
            ok.append(np.ones(len(x), bool) if flags is None else np.asarray(flags, dtype=bool))
    finally:
        backbone.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, bool)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32), np.concatenate(ok)


def adapt_batchnorm_folder(backbone: nn.Module, folder: str | Path, data_cfg: Any, device: str | torch.device = "cpu",
                           batch_size: int = 128, max_images: int = 2000, seed: int = 0, in_chans: int | None = None,
                           num_workers: int = 0) -> nn.Module:
    """AdaBN (:func:`cellssl.models.bn.adapt_batchnorm`) on the images of ``folder`` (any layout
    :func:`~cellssl.data.datasets.build_dataset` reads; labels are ignored), read and normalised with
    ``data_cfg`` (the checkpoint recipe's :class:`~cellssl.config.DataConfig`) through the evaluation
    transform. ``in_chans`` (the backbone's input channels) is checked against the folder's images.
    Returns the backbone (eval)."""
    ds = build_dataset(data_cfg, folder, labelled=False)
    if in_chans is not None and ds.channels != in_chans:
        raise DataError(
            f"AdaBN folder {folder} has {ds.channels}-channel images but the backbone takes {in_chans}; "
            "use target images with the same channels"
        )
    transform = build_eval_transform(data_cfg, ds.channels)
    return adapt_batchnorm(backbone, TransformedDataset(ds, transform), device, batch_size=batch_size,
                           max_images=max_images, seed=seed, num_workers=num_workers)


def subsample_per_class(labels: np.ndarray, max_per_class: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices keeping at most ``max_per_class`` random images of each label (all if None).

    Unlabelled data (all labels -1) is treated as one class, so this caps the total instead.
    """
    labels = np.asarray(labels)
    if not max_per_class or max_per_class <= 0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) > max_per_class:
            idx = rng.choice(idx, size=max_per_class, replace=False)
        keep.append(idx)
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.arange(0)


class FeatureExtractor:
    """Loads a backbone once (lazily, when the first folder tells the channel count) and extracts
    features of any number of folders with it.

    Args:
        checkpoint: a checkpoint path, ``random:<timm name>``, ``pixels:<side>`` or ``pretrained:...``
            (:func:`~cellssl.engine.checkpoint.load_backbone`).
        options, fields: :class:`FeatureOptions` (``max_per_class`` is :meth:`features`' default).
    """

    def __init__(self, checkpoint: str | Path, options: FeatureOptions | None = None, **fields: Any):
        self.options = feature_options(options, **fields)
        self.spec = str(checkpoint)
        self.device = resolve_device(self.options.device)
        self.adapt_bn = str(self.options.adapt_bn) if self.options.adapt_bn else None
        self.seed = self.options.seed
        # First load: tells the recipe (data config) and, for checkpoints, the channel count.
        self.backbone, self.info = load_backbone(self.spec, image_size=self.options.image_size, map_location="cpu")
        self.recipe = recipe_from_dict(self.info["config"])
        self.data_cfg = copy.deepcopy(self.recipe.data)
        if self.options.image_size:
            self.data_cfg.image_size = int(self.options.image_size)
        self.data_cfg.path = None
        self.tta = resolve_tta(self.options.tta, self.recipe, pixels=self.info.get("method") == "raw pixels")
        self.skipped: list[str] = []  # bad files left out of every folder extracted so far
        self._ready = False

    def prepare(self, channels: int) -> None:
        """Rebuild for ``channels`` if needed (random specs), move to device, AdaBN once."""
        if self._ready:
            if channels != self.info["in_chans"]:
                raise DataError(
                    f"images have {channels} channel(s) but the backbone takes {self.info['in_chans']}; "
                    "use folders with the same channels (or set data.channels)"
                )
            return
        if channels != self.info["in_chans"]:
            # Same code path for checkpoints: load_backbone raises a one-line CheckpointError.
            self.backbone, self.info = load_backbone(self.spec, in_chans=channels,
                                                     image_size=self.options.image_size, map_location="cpu")
            # pretrained: specs normalise by channel count (the weights' RGB mean/std fit 3 channels only)
            data = self.info["config"].get("data", {})
            self.data_cfg.mean, self.data_cfg.std = data.get("mean"), data.get("std")
        self.backbone = self.backbone.to(self.device).eval()
        if self.adapt_bn:
            self.backbone = adapt_batchnorm_folder(
                self.backbone, self.adapt_bn, self.data_cfg, self.device, batch_size=min(self.options.batch_size, 128),
                seed=self.seed, in_chans=int(self.info["in_chans"]),
            )
        self._ready = True

    def build(self, data: str | Path, labelled: bool | None = True,
              max_per_class: int | None = None) -> tuple[Any, np.ndarray]:
        """The ImageDataset of ``data`` (no transform) and the row indices kept (``max_per_class``)."""
        ds = build_dataset(self.data_cfg, data, labelled=labelled)
        if labelled and not ds.classes:
            raise DataError(f"{data} has no class sub-folders: labelled evaluation needs one folder per class")
        keep = subsample_per_class(ds.labels, max_per_class, self.seed)
        ds.pre_transform = match_scale(ds.pre_transform, self.options.um_per_px, self.data_cfg.um_per_px)
        return ds, keep

    def features(self, data: str | Path, labelled: bool | None = True, max_per_class: int | None = None) -> FeatureSet:
        """Features of the folder (or csv / npz) ``data`` as a :class:`FeatureSet` (at most
        ``max_per_class`` images per class; None: the options' ``max_per_class``)."""
        ds, keep = self.build(data, labelled, max_per_class or self.options.max_per_class)
        return self.dataset_features(ds, data, keep)

    def dataset_features(self, ds: Any, data: str | Path, keep: np.ndarray | None = None) -> FeatureSet:
        """Features of the rows ``keep`` (default all) of the built dataset ``ds`` of ``data``. A bad
        file (unreadable, or another channel count than most) has no row: it is warned about by
        name, counted in :attr:`skipped` (and in :meth:`describe`), and ``FeatureSet.rows`` tells
        which dataset rows the features are."""
        keep = np.arange(len(ds)) if keep is None else np.asarray(keep, dtype=np.int64)
        self.prepare(ds.channels)
        transform = build_eval_transform(self.data_cfg, ds.channels)
        opts = self.options
        feats, ok = _extract(self.backbone, _ReadableRows(ds, transform, keep, int(self.data_cfg.image_size)),
                             self.device, opts.batch_size, opts.num_workers, opts.progress, self.tta)
        bad = keep[~ok]
        if len(bad):
            self.skipped += [str(ds.samples[i][0]) for i in bad]
            warnings.warn(f"{len(bad)} of {len(keep)} images of {data} left out (unreadable or another channel "
                          "count than most, named above)", DataWarning, stacklevel=2)
        keep, feats = keep[ok], feats[ok]
        if not len(keep):
            raise DataError(f"no image of {data} could be read: run 'cellssl datasets check {data}'")
        root = Path(ds.root)
        classes, labels = _drop_empty_classes(list(ds.classes), ds.labels[keep], data)
        return FeatureSet(
            features=feats,
            labels=labels,
            paths=[relative_path(ds.samples[i][0], root) for i in keep],
            classes=classes,
            info=self.describe(data),
            root=str(root),
            rows=keep,
        )

    def describe(self, data: str | Path | None = None) -> dict:
        """Plain-JSON description of the backbone (and data) for reports."""
        cfg = self.info.get("config") or {}
        return {
            "spec": self.spec,
            "description": describe(self.info),
            "method": self.info.get("method"),
            "step": self.info.get("step"),
            "backbone": cfg.get("model", {}).get("backbone"),
            "in_chans": self.info.get("in_chans"),
            "image_size": int(self.data_cfg.image_size),
            "recipe": cfg.get("name"),
            "config": cfg,
            "adapt_bn": self.adapt_bn,
            "tta": self.tta,
            "data": str(data) if data is not None else None,
            "skipped_images": list(self.skipped),
            "um_per_px": self.options.um_per_px,  # of the data read (None: not declared)
            "model_um_per_px": self.data_cfg.um_per_px,  # the checkpoint recipe's scale
        }


def _drop_empty_classes(classes: list[str], labels: np.ndarray, data: Any) -> tuple[list[str], np.ndarray]:
    """Classes (and re-numbered labels (N,)) without those left with no image once bad files are
    left out (a class made only of unreadable files is no class), with a warning naming them."""
    used = np.unique(labels[labels >= 0])
    if not classes or len(used) == len(classes):
        return classes, labels
    gone = [c for k, c in enumerate(classes) if k not in set(used.tolist())]
    warnings.warn(f"class(es) {gone} of {data} have no readable image and are left out", DataWarning, stacklevel=3)
    lut = np.full(len(classes), -1, dtype=np.int64)
    lut[used] = np.arange(len(used))
    return [classes[k] for k in used], np.where(labels >= 0, lut[np.maximum(labels, 0)], -1)


def load_features(checkpoint: str | Path, data: str | Path, *, labelled: bool | None = True,
                  options: FeatureOptions | None = None, **fields: Any) -> FeatureSet:
    """Frozen backbone features of every image in ``data``.

    The backbone comes from :func:`~cellssl.engine.checkpoint.load_backbone` (a checkpoint or
    ``random:<timm name>``); images are read and normalised with the checkpoint recipe's data
    config (``image_size`` overrides the input side). With ``adapt_bn`` (a folder) BatchNorm
    statistics are first re-estimated on that folder (AdaBN). ``max_per_class`` keeps at most
    that many random images per class (``seed``) for quick runs. Settings: :class:`FeatureOptions`
    (``options`` and/or its fields as keywords).

    Returns:
        :class:`FeatureSet` with ``features`` (N, F) float32, ``labels`` (N,), ``paths``, ``classes``.
    """
    return FeatureExtractor(checkpoint, options, **fields).features(data, labelled=labelled)


def _spec_key(spec: Any) -> str | None:
    """A backbone spec or folder as compared between runs: an existing path resolved, else the text."""
    if spec is None:
        return None
    p = Path(str(spec)).expanduser()
    return str(p.resolve()) if p.exists() else str(spec)


def feature_source(info: dict) -> dict:
    """What made a FeatureSet (from its ``info``): backbone ``spec`` (a resolved path or
    ``random:...``), training ``step``, ``image_size``, ``adapt_bn`` folder, orientation averaging
    ``tta`` (``none`` when not recorded), ``description``."""
    return {"spec": _spec_key(info.get("spec")), "step": info.get("step"), "image_size": info.get("image_size"),
            "adapt_bn": _spec_key(info.get("adapt_bn")), "tta": info.get("tta") or "none",
            "description": info.get("description")}


SOURCE_NAMES = {"spec": "backbone", "step": "training step", "image_size": "image size", "adapt_bn": "AdaBN folder",
                "tta": "orientation averaging (--tta)"}


def source_mismatch(recorded: dict, current: dict) -> list[str]:
    """The ways two :func:`feature_source` records differ, e.g. ``["backbone random:resnet18 vs
    runs/a/last.pt"]`` (empty when the features could have come from ``current``)."""
    return [f"{SOURCE_NAMES[k]} {recorded.get(k)} vs {current.get(k)}" for k in SOURCE_NAMES
            if recorded.get(k) != current.get(k)]


def save_embeddings(fs: FeatureSet, path: str | Path) -> Path:
    """``fs`` as an ``.npz``: ``features`` (N, D) float32, ``paths`` (N,) str, ``source`` (JSON of
    :func:`feature_source`: what made them), ``skipped`` (bad files left out, relative paths);
    when labelled also ``labels`` (N,) int64 and ``classes`` (K,) str (what ``embed`` writes and
    ``select --features`` reads). Written under a temporary name renamed at the end, so a killed
    run leaves no ``.npz`` that looks complete."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"features": fs.features.astype(np.float32),
                                     "paths": np.asarray(fs.paths, dtype=str),
                                     "source": np.asarray(json.dumps(feature_source(fs.info))),
                                     "skipped": np.asarray([relative_path(p, fs.root) for p in
                                                            fs.info.get("skipped_images") or []], dtype=str)}
    if fs.labelled:
        arrays["labels"] = fs.labels.astype(np.int64)
        arrays["classes"] = np.asarray(fs.classes, dtype=str)
    with output_file(path) as tmp:
        np.savez(tmp, **arrays)
    return path


def read_embeddings(path: str | Path, what: str = "--features") -> dict[str, Any]:
    """The arrays of an ``embed``/``select`` ``.npz`` as a dict (``features`` float32 (N, D),
    ``paths`` list, ``skipped`` list, ``source`` dict or None for files written before it was
    recorded); a missing, truncated or foreign file is a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist: pass an embeddings.npz written by 'cellssl embed' or "
                        "'cellssl select' for this folder, or leave it out")
    try:
        with np.load(path) as f:
            if "features" not in f or "paths" not in f:
                raise DataError(f"{what} {path} has no 'features'/'paths' arrays: use a .npz from 'cellssl embed'")
            return {"features": np.asarray(f["features"], np.float32), "paths": [str(x) for x in f["paths"]],
                    "skipped": [str(x) for x in f["skipped"]] if "skipped" in f else [],
                    "source": json.loads(str(f["source"])) if "source" in f else None}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{what} {path} cannot be read ({type(exc).__name__}: {exc}): a truncated or damaged "
                        "file; embed the folder again (leave out --features)") from None


def embed(checkpoint: str | Path, data: str | Path, out: str | Path, *, part_rows: int = EMBED_PART_ROWS,
          options: FeatureOptions | None = None, **fields: Any) -> Path:
    """Write the features of ``data`` to ``out`` (``.npz``; a folder gets ``embeddings.npz``) with
    :func:`save_embeddings` (paths relative to ``data``; bad files are left out and listed in
    ``skipped``). Settings: :class:`FeatureOptions`. Returns the written path.

    A set of more than ``part_rows`` images is embedded in parts (:func:`embed_in_parts`): at most
    one part's features are in memory, each finished part is kept on disk, a rerun of a killed
    ``embed`` continues after the last complete part, and the same ``.npz`` is written at the end."""
    out = Path(out)
    if out.suffix != ".npz":
        out = out / "embeddings.npz" if (out.is_dir() or not out.suffix) else out.with_suffix(".npz")
    ex = FeatureExtractor(checkpoint, options, **fields)
    ds, keep = ex.build(data, None, ex.options.max_per_class)
    if len(keep) <= part_rows:
        return save_embeddings(ex.dataset_features(ds, data, keep), out)
    return embed_in_parts(ex, ds, data, keep, out, part_rows)


def parts_folder(out: str | Path) -> Path:
    """Where :func:`embed_in_parts` keeps the parts of ``out``: ``<out>.parts/`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _part_plan(ex: FeatureExtractor, data: str | Path, keep: np.ndarray, part_rows: int) -> dict:
    """What the parts of one embedding depend on (a rerun keeps parts only when it is the same)."""
    return {"source": feature_source(ex.describe(data)), "data": _spec_key(data), "rows": int(len(keep)),
            "rows_sha256": hashlib.sha256(np.ascontiguousarray(keep, np.int64).tobytes()).hexdigest(),
            "part_rows": int(part_rows)}


@dataclass
class EmbeddingParts:
    """The complete parts of one embedding (:func:`embedding_parts`) and what its output needs
    besides their rows: ``info`` (:meth:`FeatureExtractor.describe`), the dataset's ``classes``, the
    ``data`` spec and its ``root`` folder. :meth:`totals` sizes the whole without reading a feature."""

    parts: Parts
    info: dict
    classes: list[str]
    data: str | Path
    root: str
    _totals: "PartsTotals | None" = field(default=None, init=False, repr=False)

    def totals(self) -> "PartsTotals":
        """Rows, feature width, the widest path, whether every row is labelled and the skipped files
        of all parts, from the parts' ``.npy`` headers and small arrays (no feature is read; added
        up once, then kept); a DataError when no row could be read, a warning naming the count of
        skipped files."""
        if self._totals is None:
            self._totals = self._add_up()
        return self._totals

    def _add_up(self) -> "PartsTotals":
        n, dim, width, labelled, skipped = 0, 0, 1, bool(self.classes), []
        for name in self.parts.names:
            shape, _ = _npz_member_header(name, "features")
            n, dim = n + shape[0], max(dim, shape[1] if len(shape) == 2 else 0)
            width = max(width, _npz_member_header(name, "paths")[1].itemsize // 4)
            with np.load(name) as z:
                labelled = labelled and bool((z["labels"] >= 0).all())
                skipped += [str(x) for x in z["skipped"]]
        if not n:
            raise DataError(f"no image of {self.data} could be read: run 'cellssl datasets check {self.data}'")
        if skipped:
            warnings.warn(f"{len(skipped)} images of {self.data} left out (unreadable or another channel count "
                          "than most, named above)", DataWarning, stacklevel=4)
        return PartsTotals(n, dim, width, labelled, skipped)

    def chunks(self, features: bool = True) -> Iterator[tuple[int, FeatureSet]]:
        """``(start, rows)`` of each part in turn, one part read at a time: ``rows`` a
        :class:`FeatureSet` of the part's features (n, F; with ``features=False`` none are read from
        disk and the set holds (0, F)), labels, paths, the classes, info and root; ``start`` its
        first row in the whole output."""
        start, none = 0, np.zeros((0, self.totals().dim), np.float32)
        for k in range(len(self.parts.names)):
            z = self.parts.load(k, skip=() if features else ("features",))
            yield start, FeatureSet(features=z.get("features", none), labels=z["labels"],
                                    paths=[str(p) for p in z["paths"]], classes=list(self.classes), info=self.info,
                                    root=self.root, rows=z["rows"])
            start += len(z["rows"])


@dataclass
class PartsTotals:
    """What :meth:`EmbeddingParts.totals` adds up: ``n`` rows, ``dim`` features a row, ``width``
    characters of the longest path, ``labelled`` (every row has a class), ``skipped`` files."""

    n: int
    dim: int
    width: int
    labelled: bool
    skipped: list[str]


def embedding_parts(ex: FeatureExtractor, ds: Any, data: str | Path, keep: np.ndarray, out: Path,
                    part_rows: int = EMBED_PART_ROWS) -> EmbeddingParts:
    """The features of the rows ``keep`` of ``ds`` in parts of ``part_rows`` rows, kept on disk.

    Part k (``<out>.parts/part-00000k.npz``: ``features``, ``rows``, ``paths``, ``labels``,
    ``skipped``; :mod:`cellssl.data.parts`) is written atomically once its rows are done; parts
    already there from a killed run of the same embedding (``plan.json``: backbone, step, data,
    rows) are kept, so the rerun continues after the last complete part. The caller assembles its
    output from the returned parts and then removes them (``.parts.remove()``)."""
    parts = open_parts(parts_folder(out), _part_plan(ex, data, keep, part_rows), out=out, what="embedding",
                       names=SOURCE_NAMES)
    ex.prepare(ds.channels)
    transform = build_eval_transform(ex.data_cfg, ds.channels)
    root, opts, labels = Path(ds.root), ex.options, ds.labels  # (N,) once (a folder's is built per call)
    todo = parts.todo()
    for k in tqdm(todo, desc="embed parts", unit="part", disable=not opts.progress or len(todo) < 2):
        rows = keep[slice(*parts.bounds(k))]
        feats, ok = _extract(ex.backbone, _ReadableRows(ds, transform, rows, int(ex.data_cfg.image_size)),
                             ex.device, opts.batch_size, opts.num_workers, progress=False, tta=ex.tta)
        parts.save(k, {
            "features": feats[ok], "rows": rows[ok], "labels": labels[rows[ok]].astype(np.int64),
            "paths": np.asarray([relative_path(ds.samples[int(i)][0], root) for i in rows[ok]], dtype=str),
            "skipped": np.asarray([relative_path(ds.samples[int(i)][0], root) for i in rows[~ok]], dtype=str)})
    return EmbeddingParts(parts, ex.describe(data), list(ds.classes), data, str(root))


def embed_in_parts(ex: FeatureExtractor, ds: Any, data: str | Path, keep: np.ndarray, out: Path,
                   part_rows: int = EMBED_PART_ROWS) -> Path:
    """The features of the rows ``keep`` of ``ds`` in resumable parts (:func:`embedding_parts`),
    then streamed into ``out`` (the ``.npz`` of :func:`save_embeddings`, one part in memory at a
    time), then the parts folder removed. Unlike the one-pass path, a class left with no readable
    image is kept in ``classes``."""
    done = embedding_parts(ex, ds, data, keep, out, part_rows)
    path = assemble_npz(done, out)
    done.parts.remove()
    return path


def _npz_member_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of array ``key`` of the ``.npz`` ``path``, read from its ``.npy`` header only."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return tuple(shape), np.dtype(dtype)


def _write_npz_member(zf: zipfile.ZipFile, key: str, dtype: np.dtype, shape: tuple[int, ...],
                      chunks: Callable[[], Iterator[np.ndarray]]) -> None:
    """Member ``key`` of an ``.npz`` holding the concatenation of ``chunks()`` (rows), written chunk by
    chunk behind a ``.npy`` header of the whole ``shape``: ``np.load`` reads it as one array."""
    with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": tuple(shape)})
        for chunk in chunks():
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def assemble_npz(done: EmbeddingParts, out: Path) -> Path:
    """Stream the parts into ``out`` with the arrays of :func:`save_embeddings` (labels and classes
    when every kept image has a label)."""
    parts, tot = done.parts, done.totals()  # sizes first: the headers need the whole shapes
    with output_file(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_npz_member(zf, "features", np.float32, (tot.n, tot.dim), lambda: parts.arrays("features"))
        _write_npz_member(zf, "paths", np.dtype(f"<U{tot.width}"), (tot.n,), lambda: parts.arrays("paths"))
        small = {"source": np.asarray(json.dumps(feature_source(done.info))),
                 "skipped": np.asarray(tot.skipped, dtype=str)}
        if tot.labelled:
            _write_npz_member(zf, "labels", np.int64, (tot.n,), lambda: parts.arrays("labels"))
            small["classes"] = np.asarray(done.classes, dtype=str)
        for key, arr in small.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr)
    return out


def align_labels(train: FeatureSet, test: FeatureSet) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Map both sets' labels onto the train classes by class *name*.

    Returns ``(classes, y_train (N,), y_test (M,))``. A test class absent from train raises
    DataError (a classifier cannot predict a class it never saw).
    """
    for fs, name in ((train, "training"), (test, "test")):
        if not fs.labelled:
            raise DataError(f"the {name} data {fs.root or ''} is not labelled: it needs one sub-folder per class")
    classes = list(train.classes)
    if list(test.classes) == classes:
        return classes, train.labels.copy(), test.labels.copy()
    lut = class_lut(test.classes, test.labels, classes, f"the test data {test.root}", f"of {train.root}")
    return classes, train.labels.copy(), lut[test.labels]


def class_lut(classes: Sequence[str], labels: np.ndarray, train_classes: Sequence[str], where: str,
              train_where: str = "") -> np.ndarray:
    """Look-up table from the class indices of a labelled set (``classes``, its ``labels``) to the
    indices of ``train_classes``, matched by name (-1 for a class the set lists but never uses).
    DataError naming the classes the set uses that training never saw (they cannot be predicted)."""
    train = list(train_classes)
    used = set(np.unique(np.asarray(labels)).tolist())
    missing = [c for i, c in enumerate(classes) if c not in train and i in used]
    if missing:
        raise DataError(f"{where} has classes {missing} that are not among the training classes {train}"
                        f"{' ' + train_where if train_where else ''}: use the same class folder names")
    return np.array([train.index(c) if c in train else -1 for c in classes], dtype=np.int64)


def check_min_images(fs: FeatureSet, what: str, minimum: int = 2) -> None:
    """Raise DataError when ``fs`` has fewer than ``minimum`` images or fewer than 2 classes."""
    if len(fs) < minimum:
        raise DataError(f"{what} {fs.root} has {len(fs)} image(s); at least {minimum} are needed")
    present = np.unique(fs.labels[fs.labels >= 0])
    if len(present) < 2:
        raise DataError(f"{what} {fs.root} has {len(present)} class(es); classification needs at least 2")
