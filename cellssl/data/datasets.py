"""Datasets of single-cell images: folders (labelled or not), CSV manifests, MedMNIST ``.npz``,
shard folders (``cellssl datasets shard``, :mod:`cellssl.data.shards`).

:class:`ImageDataset` yields ``(image, label)`` with ``image`` a float32 (H, W, C) array in
[0, 1] (or ``transform(image)``); :class:`MultiViewDataset` turns it into the multi-view
batches a self-supervised method trains on. Unreadable files (and, unless the recipe fixes
``data.channels``, files with another channel count than most of the folder's) never stop a long
run: they are skipped with one warning each and left out (features: no row; training:
:func:`collate_readable` drops them from their batch); only when more than
``DataConfig.max_bad_fraction`` of the files is bad does a :class:`DataError` stop it.
"""

from __future__ import annotations

import csv
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from cellssl.config import DataConfig
from cellssl.data import stain
from cellssl.data.io import (
    IMAGE_SUFFIXES,
    ImageReadError,
    array_to_float,
    channel_range,
    convert_channels,
    is_hidden_name,
    is_image_file,
    is_output_folder,
    list_images,
    read_image,
    read_raw_image,
    scale_intensity,
)
from cellssl.data.shards import ShardReader, has_loose_shards, is_shard_folder, is_stream_spec
from cellssl.errors import ConfigError, DataError

BLOODMNIST_CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
_SUFFIX_TEXT = ".png .jpg .tif ..."
_PROBE = 16  # files read at build time (evenly spaced) to decide the channel count / fail fast on an unreadable folder
PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "file_name", "image", "image_path", "img",
                "source")
LABEL_COLUMNS = ("label", "class", "labels", "class_name", "classname", "cell_type", "celltype", "category", "target")


class DataWarning(UserWarning):
    """An unreadable file that was skipped, or a doubtful manifest row."""


class OddChannelsError(ImageReadError):
    """A readable image whose channel count differs from the dataset's (most of its images')."""


class ImageDataset(Dataset):
    """Images with integer labels (-1 when unlabelled); item = (float32 (H, W, C) in [0, 1], label).

    Attributes: ``root``, ``samples`` (list of (path, label)), ``classes`` (empty when
    unlabelled), ``channels``, ``labelled``, ``bad_files`` (paths found unreadable so far in this
    process). ``pre_transform`` (e.g. stain normalisation) runs on the array before ``transform``.
    ``channels`` given (the recipe's ``data.channels``) converts 1 <-> 3 channels; otherwise the
    channel count of most images decides and an image with another count is a bad file.
    """

    def __init__(
        self,
        root: str | Path,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str] = (),
        *,
        cfg: DataConfig | None = None,
        channels: int | None = None,
        transform: Callable[[np.ndarray], Any] | None = None,
        pre_transform: Callable[[np.ndarray], np.ndarray] | None = None,
        value_range: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.root = Path(root)
        self.samples = [(Path(p), int(y)) for p, y in samples]
        self.classes = list(classes)
        self.labelled = bool(self.classes)
        self.cfg = cfg or DataConfig()
        self.transform = transform
        self.pre_transform = pre_transform
        self.value_range = value_range
        self.bad_files: set[Path] = set()
        self.fixed_channels = bool(channels)
        self.channels = int(channels) if channels else self._detect_channels()

    # --- reading -------------------------------------------------------------------------
    def _read(self, i: int, channels: int | None) -> np.ndarray:
        """Decode sample ``i`` to float32 (H, W, C); raises ImageReadError."""
        c = self.cfg
        return read_image(
            self.samples[i][0],
            modality=c.modality,
            intensity=c.intensity,
            percentiles=tuple(c.percentiles),
            tiff_page=c.tiff_page,
            tiff_projection=c.tiff_projection,
            channels=channels,
            value_range=self.value_range,
        )

    def _detect_channels(self) -> int:
        """The channel count of most of up to ``_PROBE`` evenly spaced images (ties: the larger
        count), so that one odd file cannot decide it; DataError if none of them is readable."""
        idx = np.unique(np.linspace(0, len(self.samples) - 1, min(_PROBE, len(self.samples))).astype(int))
        counts: Counter[int] = Counter()
        errors = []
        for i in idx:
            try:
                counts[int(self._read(int(i), None).shape[2])] += 1
            except ImageReadError as exc:
                errors.append(exc)
                self.mark_bad(int(i), exc)
        if counts:
            return majority_count(counts)
        raise DataError(
            f"none of {len(errors)} images probed in {self.root} could be read "
            f"(e.g. {errors[0] if errors else 'no files'}); run 'cellssl datasets check {self.root}'"
        )

    def mark_bad(self, i: int, exc: ImageReadError) -> None:
        """Record and warn (once per file) about a sample that is left out."""
        path = self.samples[i][0]
        if path in self.bad_files:
            return
        self.bad_files.add(path)
        what = "image" if isinstance(exc, OddChannelsError) else "unreadable image"
        warnings.warn(f"skipping {what} {path}: {exc.reason}", DataWarning, stacklevel=3)
        limit = self.cfg.max_bad_fraction * len(self.samples)
        if len(self.bad_files) > limit:
            raise DataError(
                f"{len(self.bad_files)} of {len(self.samples)} images in {self.root} are unreadable or have "
                f"another channel count than most (more than data.max_bad_fraction={self.cfg.max_bad_fraction}); "
                f"run 'cellssl datasets check {self.root}' to list them"
            )

    def raw(self, i: int) -> np.ndarray:
        """The stored pixels of sample ``i`` as (H, W, C) in the file's dtype (no scaling, no channel
        conversion); raises :class:`ImageReadError`. What ``datasets shard`` stores."""
        c = self.cfg
        return read_raw_image(self.samples[i][0], tiff_page=c.tiff_page, tiff_projection=c.tiff_projection)

    def read(self, i: int, convert: bool = True) -> np.ndarray:
        """Sample ``i`` as float32 (H, W, C) without ``transform``; unlike :meth:`load`, an
        unreadable file raises :class:`ImageReadError` instead of being replaced (for a row that
        must stay that file's, e.g. a prediction). ``convert=False`` keeps the file's own channel
        count (no 1 <-> 3 conversion); ``pre_transform`` runs only on ``channels``-channel images.
        Without ``data.channels`` in the recipe an image whose count differs from the dataset's
        raises :class:`OddChannelsError` (a bad file, never silently converted)."""
        img = self._read(i, self.channels if convert and self.fixed_channels else None)
        if convert and img.shape[2] != self.channels:
            raise OddChannelsError(
                self.samples[i][0], f"has {img.shape[2]} channel(s) but most images of {self.root} have "
                f"{self.channels} (set data.channels={self.channels} to convert such files instead)")
        if self.pre_transform is not None and img.shape[2] == self.channels:
            img = self.pre_transform(img)
        return img

    def load(self, i: int) -> tuple[np.ndarray, int]:
        """Sample ``i`` as (float32 (H, W, C), label) without ``transform``; a bad file is
        replaced by the next readable index (deterministic; :meth:`load_checked` says when)."""
        return self.load_checked(i)[:2]

    def load_checked(self, i: int) -> tuple[np.ndarray, int, bool]:
        """(image, label, ok) as :meth:`load`; ``ok`` is False when sample ``i`` itself was bad and
        the image and label are the next readable sample's (callers that must leave ``i`` out)."""
        n = len(self)
        for k in range(n):
            j = (i + k) % n
            if self.is_bad(j):
                continue
            try:
                img = self.read(j)
            except ImageReadError as exc:
                self.mark_bad(j, exc)
                continue
            return img, self.label_of(j), j == i
        raise DataError(f"no readable image left in {self.root}")

    def is_bad(self, i: int) -> bool:
        """True when sample ``i`` was found unreadable (and left out) earlier in this process."""
        return self.samples[i][0] in self.bad_files

    def label_of(self, i: int) -> int:
        """The label of sample ``i`` (-1 when unlabelled)."""
        return self.samples[i][1]

    # --- Dataset protocol ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img, label = self.load(int(i))
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    @property
    def labels(self) -> np.ndarray:
        """Integer labels, shape (N,); -1 for unlabelled samples."""
        return np.array([y for _, y in self.samples], dtype=np.int64)

    @property
    def paths(self) -> list[Path]:
        """File of each sample, in order."""
        return [p for p, _ in self.samples]

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.labelled else "unlabelled"
        return f"{type(self).__name__}({self.root}, {len(self)} images, {kind}, channels={self.channels})"


class ArrayImageDataset(ImageDataset):
    """An :class:`ImageDataset` whose pixels come from an in-memory array (N, H, W[, C]), e.g.
    MedMNIST ``.npz``; ``samples`` holds pseudo-paths ``file.npz:split/index``."""

    def __init__(self, root: str | Path, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], split: str, **kw: Any):
        self.images = images
        samples = [(Path(f"{root}:{split}/{i}"), int(y)) for i, y in enumerate(labels)]
        super().__init__(root, samples, classes, **kw)

    def _read(self, i: int, channels: int | None) -> np.ndarray:
        c = self.cfg
        img = array_to_float(self.images[i], c.intensity, tuple(c.percentiles))
        return convert_channels(img, channels, self.samples[i][0]) if channels else img

    def raw(self, i: int) -> np.ndarray:
        img = np.asarray(self.images[i])
        return img[:, :, None] if img.ndim == 2 else img


def shard_cell_image(raw: np.ndarray, cfg: DataConfig, channels: int | None, where: str,
                     value_range: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """A stored shard cell ``raw`` (H, W, C, any dtype) as float32 (H, W, C') in [0, 1]: scaled by
    ``cfg.intensity`` / ``cfg.percentiles``, converted to ``channels`` when given (1 <-> 3; a count
    that cannot be converted is an ImageReadError naming ``where``). Shared by :class:`ShardDataset`
    and the stream (:mod:`cellssl.data.stream`)."""
    img = np.ascontiguousarray(scale_intensity(raw, cfg.intensity, tuple(cfg.percentiles), value_range),
                               dtype=np.float32)
    return convert_channels(img, channels, where) if channels else img


class _ShardSamples(Sequence):
    """``(path, label)`` of each cell of a shard folder, made on access (no list of N tuples)."""

    def __init__(self, root: Path, reader: ShardReader):
        self.root, self.reader = root, reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> tuple[Path, int]:  # type: ignore[override]
        return self.root / self.reader.path(i), int(self.reader.cells[i]["label"])


class ShardDataset(ImageDataset):
    """An :class:`ImageDataset` over a shard folder (``cellssl datasets shard``), map-style: cell i is
    read at its byte offset in its tar, so the training loop's sampler, rank sharding and exact
    resume work as for a folder. Memory: 20 bytes a cell (the offsets), plus the original paths
    (``samples``, ``paths``) only when a command asks for them (e.g. ``embed``).

    A corrupt member is skipped like an unreadable file (warning naming the shard and member);
    a missing index, a missing or truncated shard is refused when the dataset is built.
    """

    def __init__(self, root: str | Path, *, cfg: DataConfig | None = None, channels: int | None = None,
                 transform: Callable[[np.ndarray], Any] | None = None, labelled: bool | None = None):
        # ImageDataset.__init__ would list every sample; the reader holds them as offsets instead.
        self.root = Path(root)
        self.reader = ShardReader(self.root)
        self.classes = [] if labelled is False else list(self.reader.classes)
        self.labelled = bool(self.classes)
        if labelled and not self.labelled:
            raise DataError(f"shard folder {self.root} holds no labels: shard a labelled folder or manifest")
        self.cfg = cfg or DataConfig()
        self.transform, self.pre_transform, self.value_range = transform, None, None
        self._bad: set[int] = set()
        self.fixed_channels = bool(channels)  # as ImageDataset: a recipe's count converts, else odd files are bad
        self.channels = int(channels) if channels else self._detect_channels()

    @property
    def samples(self) -> Sequence[tuple[Path, int]]:  # type: ignore[override]
        return _ShardSamples(self.root, self.reader)

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def bad_files(self) -> set[Path]:  # type: ignore[override]
        """The original paths of the cells found unreadable so far (as ImageDataset's): looked up only
        when asked, so marking a cell bad during training reads no path."""
        return {self.samples[i][0] for i in self._bad}

    @property
    def labels(self) -> np.ndarray:
        return self.reader.labels if self.labelled else np.full(len(self.reader), -1, dtype=np.int64)

    @property
    def paths(self) -> list[Path]:
        return [self.root / p for p in self.reader.paths]

    def raw(self, i: int) -> np.ndarray:
        return self.reader.raw(i)

    def _read(self, i: int, channels: int | None) -> np.ndarray:
        return shard_cell_image(self.reader.raw(i), self.cfg, channels, self.reader.member(i), self.value_range)

    def is_bad(self, i: int) -> bool:
        return i in self._bad  # by index: no path is made per read

    def label_of(self, i: int) -> int:
        return int(self.reader.cells[i]["label"]) if self.labelled else -1

    def mark_bad(self, i: int, exc: ImageReadError) -> None:
        """Record and warn (once per cell) about a corrupt member, named by shard and member (by index:
        no path is looked up, so training never loads the original paths)."""
        if i in self._bad:
            return
        self._bad.add(i)
        warnings.warn(f"skipping unreadable cell {exc.path}: {exc.reason}", DataWarning, stacklevel=3)
        if len(self._bad) > self.cfg.max_bad_fraction * len(self):
            raise DataError(
                f"{len(self._bad)} of {len(self)} cells in {self.root} are unreadable "
                f"(more than data.max_bad_fraction={self.cfg.max_bad_fraction}); re-create the shards with "
                "'cellssl datasets shard'"
            )


class MultiViewDataset(Dataset):
    """Wraps an :class:`ImageDataset` and a multi-view transform.

    Item: ``{"views": Tensor (M, C, S, S) float32, "label": int, "index": int, "readable": bool}``
    plus ``"local": Tensor (L, C, s, s)`` when the transform makes local views. ``readable`` is
    False when image ``index`` was bad and a neighbour stands in; :func:`collate_readable` drops it.
    """

    def __init__(self, base: ImageDataset, transform: Callable[[np.ndarray], dict[str, torch.Tensor]]):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if hasattr(self.base, "load_checked"):
            img, label, ok = self.base.load_checked(int(i))
        else:  # a dataset of other datasets (e.g. adapt's mixture): its own load decides
            (img, label), ok = self.base.load(int(i)), True
        return view_item(self.transform(img), label, i, ok)


def view_item(out: dict[str, Any], label: int, i: int, readable: bool = True) -> dict[str, Any]:
    """One training item from a multi-view transform's ``out`` (``views`` (M, C, S, S)[, ``local``]):
    ``{"views", "label", "index", "readable"[, "local"]}`` (:class:`MultiViewDataset`, the stream)."""
    item: dict[str, Any] = {"views": out["views"], "label": int(label), "index": int(i), "readable": readable}
    if out.get("local") is not None:
        item["local"] = out["local"]
    return item


class TransformedDataset(Dataset):
    """``(transform(image), label)`` for the rows ``indices`` of an ImageDataset read without transform.

    ``base`` must offer ``load(i) -> (float32 (H, W, C), label)`` (``ImageDataset``) or
    ``__getitem__`` returning ``(array, label)``.
    """

    def __init__(self, base: Any, transform: Callable[[np.ndarray], torch.Tensor], indices: Sequence[int] | None = None):
        self.base = base
        self.transform = transform
        self.indices = np.arange(len(base)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        img, label = self.base.load(j) if hasattr(self.base, "load") else self.base[j]
        return self.transform(img), int(label)


def collate_readable(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate :class:`MultiViewDataset` items, leaving out those whose own image was bad (their
    ``readable`` is False: a neighbour stood in), so no image is seen twice in an epoch. A batch
    with no readable item keeps the stand-ins (a step is never empty). The ``readable`` key is dropped."""
    keep = [it for it in items if it.get("readable", True)] or items
    return default_collate([{k: v for k, v in it.items() if k != "readable"} for it in keep])


def majority_count(counts: Counter[int]) -> int:
    """The most common channel count of ``counts`` (ties: the larger count, i.e. colour over grey)."""
    return max(counts, key=lambda c: (counts[c], c))


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a DataLoader batch of these datasets: ``(x, y)`` (:class:`TransformedDataset`),
    ``{"views": x}`` (:class:`MultiViewDataset`, first view), ``{"image": x}``, or ``x`` itself."""
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "views"):
            if key in batch:
                x = batch[key]
                return x[:, 0] if key == "views" and x.ndim == 5 else x
    return batch


# --- layouts -------------------------------------------------------------------------------
def _class_folders(root: Path) -> list[Path]:
    """Immediate sub-folders of ``root`` that contain images (directly or below)."""
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden_name(p.name) and not is_output_folder(p))
    return [p for p in subs if list_images(p, recursive=True)]


def _no_images(root: Path) -> DataError:
    return DataError(
        f"no images found in {root}: expected image files ({_SUFFIX_TEXT}) or one sub-folder per class"
    )


def _folder_samples(root: Path, labelled: bool | None) -> tuple[list[tuple[Path, int]], list[str]]:
    """Samples of a folder: one sub-folder per class -> labelled, otherwise images anywhere below."""
    classes = _class_folders(root) if labelled is not False else []
    top_level = list_images(root, recursive=False)
    if labelled is None:
        labelled = bool(classes) and not top_level
    if labelled:
        if not classes:
            raise DataError(f"{root} has no class sub-folders with images: put each class in its own sub-folder, or use unlabelled data")
        samples = [(p, k) for k, d in enumerate(classes) for p in list_images(d, recursive=True)]
        return samples, [d.name for d in classes]
    samples = [(p, -1) for p in list_images(root, recursive=True)]
    if not samples:
        raise _no_images(root)
    return samples, []


def read_manifest(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (lower-case column names; ``[]`` when the first row is data) and the data rows
    ``(line number, cells)`` of a CSV manifest. A UTF-8 byte-order mark (Excel's "CSV UTF-8") is
    accepted; a first row that is neither an image path nor a header with a path column
    (:data:`PATH_COLUMNS`) is refused in one line, never read as an image."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, [x.strip() for x in r]) for r in reader if r and any(x.strip() for x in r)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}; save it as CSV (UTF-8)") from None
    if not rows or any(is_image_file(x) for x in rows[0][1]):
        return [], rows
    header = [h.lower() for h in rows[0][1]]
    if not any(h in PATH_COLUMNS for h in header):
        raise DataError(f"manifest {path}: first row '{','.join(rows[0][1])}' is neither an image path nor a "
                        f"known header: name the image column path (or {', '.join(PATH_COLUMNS[1:4])}, image) and "
                        "the label column label (or class)")
    return header, rows[1:]


def manifest_columns(header: Sequence[str], n_cols: int) -> tuple[int, int | None]:
    """(path column, label column or None) of a manifest with ``header`` (``[]``: none) whose
    first row has ``n_cols`` cells: known names first (:data:`PATH_COLUMNS`, :data:`LABEL_COLUMNS`),
    else path then label by position."""
    if not header:
        return 0, (1 if n_cols > 1 else None)
    p_col = next(header.index(n) for n in PATH_COLUMNS if n in header)
    l_col = next((header.index(n) for n in LABEL_COLUMNS if n in header), None)
    if l_col is None and len(header) == 2:
        l_col = 1 - p_col
    return p_col, l_col


def _check_manifest_labels(path: Path, files: list[Path], names: list[str], lines: list[int]) -> list[int]:
    """Rows of a manifest to keep: one per image. An image listed twice with the same (or a
    missing) label is kept once with a warning (a duplicate would leak across a train/test split);
    an image given two different labels is a DataError naming it; labels that differ only in
    case are warned about."""
    first: dict[Path, int] = {}
    keep, dups = [], []
    for k, (f, n) in enumerate(zip(files, names)):
        if f not in first:
            first[f] = k
            keep.append(k)
            continue
        j = first[f]
        if n and names[j] and n != names[j]:
            raise DataError(f"manifest {path} gives {f} two labels: '{names[j]}' (line {lines[j]}) and '{n}' "
                            f"(line {lines[k]}): keep the right one")
        if n and not names[j]:
            names[j] = n
        dups.append(k)
    if dups:
        k = dups[0]
        warnings.warn(f"manifest {path} lists {len(dups)} image(s) more than once (e.g. {files[k]} on lines "
                      f"{lines[first[files[k]]]} and {lines[k]}): each image is used once", DataWarning, stacklevel=3)
    by_case: dict[str, set[str]] = {}
    for n in names:
        if n:
            by_case.setdefault(n.casefold(), set()).add(n)
    for variants in by_case.values():
        if len(variants) > 1:
            shown = " and ".join(f"'{v}'" for v in sorted(variants))
            warnings.warn(f"manifest {path}: labels {shown} differ only in case and are read as {len(variants)} "
                          "classes: write them the same way if they are one", DataWarning, stacklevel=3)
    return keep


def _csv_samples(path: Path, labelled: bool | None) -> tuple[list[tuple[Path, int]], list[str]]:
    """Samples of a CSV manifest (:func:`read_manifest`; paths relative to the CSV), one per image."""
    header, rows = read_manifest(path)
    if not rows:
        raise DataError(f"manifest {path} lists no images: expected rows 'path,label' (paths relative to the CSV)")
    p_col, l_col = manifest_columns(header, len(rows[0][1]))
    files = [(path.parent / (r[p_col] if len(r) > p_col else "")).resolve() for _, r in rows]
    names = ["" if l_col is None or labelled is False else (r[l_col] if len(r) > l_col else "") for _, r in rows]
    keep = _check_manifest_labels(path, files, names, [n for n, _ in rows])
    files, names = [files[k] for k in keep], [names[k] for k in keep]
    if l_col is None or labelled is False:
        return [(p, -1) for p in files], []
    blank = sum(n == "" for n in names)
    if blank == len(names):
        if labelled:
            raise DataError(f"manifest {path} has no labels yet: fill in its label column "
                            "(e.g. the to_label.csv written by 'cellssl select')")
        return [(p, -1) for p in files], []
    if blank and labelled:
        # A partly filled manifest (an expert skipped unsure cells): train on the labelled rows.
        warnings.warn(f"manifest {path}: {blank} of {len(names)} rows have no label and are left out "
                      "(fill in their label column to use them)", DataWarning, stacklevel=3)
        files, names = [f for f, n in zip(files, names) if n], [n for n in names if n]
    uniq = sorted({n for n in names if n}, key=lambda s: (0, int(s), s) if s.lstrip("-").isdigit() else (1, 0, s))
    index = {n: k for k, n in enumerate(uniq)}
    # labelled=None keeps unlabelled rows as -1 (e.g. embedding a partly labelled manifest)
    return [(p, index[n] if n else -1) for p, n in zip(files, names)], uniq


def _npz_dataset(spec: str, cfg: DataConfig, labelled: bool | None, transform: Any) -> ArrayImageDataset:
    """MedMNIST-style ``file.npz[:split]`` with ``<split>_images`` / ``<split>_labels`` arrays."""
    file, _, split = spec.partition(".npz")
    file = Path(file + ".npz")
    split = split.lstrip(":") or "train"
    if not file.is_file():
        raise DataError(f"data path {file} does not exist")
    try:
        with np.load(file) as z:
            keys = list(z.keys())
            if f"{split}_images" not in keys:
                splits = sorted({k.rsplit('_', 1)[0] for k in keys if k.endswith('_images')})
                raise DataError(f"{file} has no split '{split}': use {file}:<split> with one of {', '.join(splits) or '(none)'}")
            images = z[f"{split}_images"]
            labels = z[f"{split}_labels"].reshape(len(images), -1)[:, 0] if f"{split}_labels" in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # a truncated .npz: BadZipFile
        raise DataError(f"cannot read {file}: {exc} (a truncated or damaged .npz?)") from None
    if len(images) == 0:
        raise DataError(f"{file}:{split} holds no images")
    if labels is None or labelled is False:
        labels, classes = np.full(len(images), -1), []
    else:
        n_cls = int(labels.max()) + 1
        classes = BLOODMNIST_CLASSES if "blood" in file.name.lower() and n_cls == 8 else [str(k) for k in range(n_cls)]
    return ArrayImageDataset(file, images, labels, classes, split, cfg=cfg, channels=cfg.channels, transform=transform)


def default_synthetic_path(cfg: DataConfig) -> Path:
    """Make sure the built-in synthetic set for ``cfg`` exists; return its folder."""
    from cellssl.data.synth import default_synth_dir, ensure_synthetic  # start-up time: scipy, only without data

    size = max(64, cfg.image_size)
    return ensure_synthetic(default_synth_dir(cfg.synth_n, cfg.synth_seed, size), n=cfg.synth_n, seed=cfg.synth_seed, image_size=size)


def stain_normalizer(cfg: DataConfig) -> Callable[[np.ndarray], np.ndarray] | None:
    """The stain normaliser of ``cfg`` (:func:`cellssl.data.stain.build_stain_normalizer`), or None."""
    if cfg.stain_normalize in (None, "none"):
        return None
    return stain.build_stain_normalizer(cfg.stain_normalize, cfg.stain_reference)


def _dataset_range(ds: ImageDataset, cfg: DataConfig, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel percentiles over (up to) ``n`` evenly spaced images, for percentile_scope=dataset."""
    idx = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).astype(int))
    pix = []
    for i in idx:
        try:
            raw = read_raw_image(ds.samples[i][0], tiff_page=cfg.tiff_page, tiff_projection=cfg.tiff_projection)
        except ImageReadError:
            continue
        if raw.shape[2] == ds.channels:
            flat = raw.reshape(-1, raw.shape[2]).astype(np.float32)
            pix.append(flat[:: max(1, len(flat) // 4096)])
    if not pix:
        raise DataError(f"cannot compute dataset-wide percentiles for {ds.root}: no readable images")
    lo, hi = channel_range(np.concatenate(pix)[:, None, :], tuple(cfg.percentiles))
    return lo, hi


def build_dataset(
    cfg: DataConfig,
    path: str | Path | None = None,
    *,
    labelled: bool | None = None,
    transform: Callable[[np.ndarray], Any] | None = None,
) -> ImageDataset:
    """Build an :class:`ImageDataset` from ``path`` (default ``cfg.path``; None = synthetic set).

    Layouts: a folder with one sub-folder per class (labelled), a folder with images anywhere
    below (unlabelled; ``labelled=False`` forces this), a ``.csv`` manifest ``path[,label]``,
    or a MedMNIST ``file.npz[:split]`` (default split ``train``). Items are float32 (H, W, C)
    arrays in [0, 1] (or ``transform(array)``). Raises DataError for missing/empty inputs.
    """
    spec = str(path if path is not None else cfg.path) if (path is not None or cfg.path) else None
    if spec is None:
        spec = str(default_synthetic_path(cfg))
    if is_stream_spec(spec):
        raise DataError(f"{spec} is a streaming shard source: only 'cellssl pretrain' reads it; for this command "
                        "pass a shard folder on a local disk (copy the shards and their index.json there)")
    if ".npz" in Path(spec).name:
        ds: ImageDataset = _npz_dataset(spec, cfg, labelled, transform)
    elif is_shard_folder(Path(spec).expanduser()):
        if cfg.percentile_scope == "dataset":
            raise ConfigError("data.percentile_scope=dataset is not supported for a shard folder yet; "
                              "use data.percentile_scope=image")
        ds = ShardDataset(Path(spec).expanduser(), cfg=cfg, channels=cfg.channels, transform=transform, labelled=labelled)
    else:
        root = Path(spec).expanduser()
        if not root.exists():
            raise DataError(f"data path {root} does not exist: pass a folder of images, a .csv manifest or a .npz file")
        if root.is_file() and root.suffix.lower() == ".csv":
            samples, classes = _csv_samples(root, labelled)
        elif root.is_file() and root.suffix.lower() in IMAGE_SUFFIXES:
            samples, classes = [(root, -1)], []
        elif root.is_dir():
            try:
                samples, classes = _folder_samples(root, labelled)
            except DataError:
                if has_loose_shards(root):
                    raise DataError(f"{root} holds .tar shards but no index.json: re-create it with 'cellssl datasets "
                                    "shard SRC OUT' (the index lists the shards, their checksums and classes)") from None
                raise
        else:
            raise DataError(f"data path {root} is not a folder, .csv manifest or .npz file")
        ds = ImageDataset(root, samples, classes, cfg=cfg, channels=cfg.channels, transform=transform)
        if cfg.percentile_scope == "dataset" and cfg.intensity in ("auto", "percentile", "minmax"):
            first = read_raw_image(next(p for p, _ in ds.samples if p not in ds.bad_files), tiff_page=cfg.tiff_page, tiff_projection=cfg.tiff_projection)
            if cfg.intensity != "auto" or first.dtype != np.uint8:
                pct = (0.0, 100.0) if cfg.intensity == "minmax" else tuple(cfg.percentiles)
                ds.value_range = _dataset_range(ds, DataConfig(**{**cfg.__dict__, "percentiles": list(pct)}))
    ds.pre_transform = stain_normalizer(cfg)
    return ds


def split_indices(
    labels: Sequence[int] | np.ndarray,
    fractions: Sequence[float] = (0.8, 0.2),
    seed: int = 0,
    stratified: bool = True,
) -> list[np.ndarray]:
    """Random disjoint index sets covering ``labels`` in the given ``fractions`` (normalised).

    With ``stratified`` each class is split in the same proportions (every part gets at least one
    sample of a class when the class has enough). Returns one sorted int64 array per fraction.
    """
    labels = np.asarray(labels)
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) == 0 or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {list(fractions)}")
    fr = fr / fr.sum()
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if stratified else [np.arange(len(labels))]
    parts: list[list[np.ndarray]] = [[] for _ in fr]
    for idx in groups:
        idx = rng.permutation(idx)
        cuts = np.round(np.cumsum(fr)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
