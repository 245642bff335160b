"""Cells stored as shards: plain tar files (WebDataset layout) plus an index, for millions of cells.

``cellssl datasets shard SRC OUT --shard-size N`` writes::

    OUT/shard-000000.tar …   N cells each; member ``<key>.npy`` (the stored pixels, lossless:
                              any dtype, any channel count) and ``<key>.json`` (label, class,
                              original path, channels, dtype); ``key`` = the cell's 9-digit index
    OUT/cells.npy            one record per cell: shard number, byte offset and size of its
                              ``.npy`` member inside the tar, label (20 bytes a cell)
    OUT/paths.txt            the original path of each cell, one a line (read only by ``embed``)
    OUT/index.json           format, counts, classes, channels, dtypes and per-shard name, count,
                              bytes and sha256

The tars are written with ``webdataset.TarWriter``, so any WebDataset pipeline reads them too.
cellssl itself reads them map-style (:class:`ShardReader`): cell i is one ``pread`` at a known
offset, so the resumable, rank-sharded sampler of the training loop works unchanged and exact
resume comes for free. The per-cell records cost 20 bytes, i.e. 20 MB per million cells; the
original paths are loaded only when a command writes them out.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from cellssl.data.io import ImageReadError, output_folder, relative_path
from cellssl.errors import ConfigError, DataError

FORMAT = "cellssl-shards"
VERSION = 1
INDEX_NAME = "index.json"
CELLS_NAME = "cells.npy"
PATHS_NAME = "paths.txt"
CELL_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("size", "<i4"), ("label", "<i4")])
_MAX_OPEN = 64  # shard files kept open per process


def shard_name(k: int) -> str:
    """File name of shard ``k``: ``shard-000000.tar``."""
    return f"shard-{k:06d}.tar"


def cell_key(i: int) -> str:
    """Member stem of cell ``i`` (its index in the whole set): ``000000042``."""
    return f"{i:09d}"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def is_shard_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a shard ``index.json``."""
    return (Path(path) / INDEX_NAME).is_file()


def has_loose_shards(path: str | Path) -> bool:
    """True when folder ``path`` holds ``.tar`` files but no ``index.json`` (a broken shard set)."""
    path = Path(path)
    return path.is_dir() and not is_shard_folder(path) and any(path.glob("*.tar"))


def tar_member_spans(tar_path: str | Path, suffix: str = ".npy") -> dict[str, tuple[int, int]]:
    """``{stem: (data offset, size)}`` of the members of a tar ending in ``suffix`` (headers only)."""
    with tarfile.open(tar_path, "r:") as tar:
        return {m.name[: -len(suffix)]: (m.offset_data, m.size) for m in tar if m.name.endswith(suffix)}


def _cell_meta(label: int, classes: list[str], path: str, raw: np.ndarray) -> dict[str, Any]:
    return {"label": int(label), "class": classes[label] if 0 <= label < len(classes) else None,
            "path": path, "channels": int(raw.shape[2]), "dtype": str(raw.dtype)}


def write_shards(ds: Any, out: str | Path, shard_size: int,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write the cells of ``ds`` as tar shards of ``shard_size`` cells into the new folder ``out``.

    Args:
        ds: an image dataset (``cellssl.data.datasets.ImageDataset``: ``samples``, ``classes``,
            ``root``, ``raw(i)`` -> the stored pixels (H, W, C) in the file's dtype).
        out: the shard folder to create; refused when it exists and is not empty. Written to a
            hidden temporary folder renamed to ``out`` only when complete.
        shard_size: cells per shard (≥ 1).
        progress: optional callback ``(cells done, total)``.
    Returns:
        The index (also written to ``out/index.json``). Unreadable source files are skipped with a
        warning naming each and listed under ``"skipped"``.
    """
    if int(shard_size) < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists: nothing is overwritten; choose another output folder or delete it")
    classes = list(ds.classes)
    base = Path(ds.root) if Path(ds.root).is_dir() else Path(ds.root).parent
    n = len(ds.samples)
    cells = np.zeros(n, dtype=CELL_DTYPE)
    paths: list[str] = []
    shards: list[dict[str, Any]] = []
    skipped: list[str] = []
    channels, dtypes = set(), set()
    with output_folder(out) as tmp:
        writer, in_shard, keys = None, 0, []

        def close_shard() -> None:
            writer.close()
            tar = tmp / shard_name(len(shards))
            spans = tar_member_spans(tar)
            for j in keys:
                off, size = spans[cell_key(j)]
                cells[j]["shard"], cells[j]["offset"], cells[j]["size"] = len(shards), off, size
            shards.append({"name": tar.name, "count": len(keys), "bytes": tar.stat().st_size,
                           "sha256": sha256_file(tar)})

        kept = 0
        for i in range(n):
            path, label = ds.samples[i]
            rel = relative_path(path, base)
            try:
                raw = ds.raw(i)
            except ImageReadError as exc:
                warnings.warn(f"skipping unreadable image {path}: {exc.reason}", stacklevel=2)
                skipped.append(rel)
                continue
            if writer is None or in_shard == shard_size:
                if writer is not None:
                    close_shard()
                writer, in_shard, keys = wds.TarWriter(str(tmp / shard_name(len(shards))), mtime=0.0), 0, []
            meta = _cell_meta(label, classes, rel, raw)
            writer.write({"__key__": cell_key(kept), "npy": np.ascontiguousarray(raw), "json": meta})
            cells[kept]["label"] = label
            keys.append(kept)
            paths.append(rel)
            channels.add(meta["channels"])
            dtypes.add(meta["dtype"])
            kept += 1
            in_shard += 1
            if progress is not None:
                progress(i + 1, n)
        if writer is None:
            raise DataError(f"no readable image in {ds.root}: nothing to shard")
        close_shard()
        np.save(tmp / CELLS_NAME, cells[:kept])
        (tmp / PATHS_NAME).write_text("".join(p.replace("\n", " ") + "\n" for p in paths))
        index = {"format": FORMAT, "version": VERSION, "count": kept, "shard_size": int(shard_size),
                 "classes": classes, "channels": sorted(channels), "dtypes": sorted(dtypes),
                 "source": str(ds.root), "skipped": skipped, "shards": shards,
                 "cells_sha256": sha256_file(tmp / CELLS_NAME)}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
    return index


def load_index(root: str | Path) -> dict[str, Any]:
    """Read and check ``root/index.json``; a missing, unreadable or foreign index is a one-line DataError."""
    root = Path(root)
    path = root / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{root} has no {INDEX_NAME}: it is not a shard folder (write one with "
                        f"'cellssl datasets shard SRC {root}')")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read shard index {path} ({exc}); re-create the shards with 'cellssl datasets shard'") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
        raise DataError(f"{path} is not a cellssl shard index (format '{FORMAT}'); "
                        "re-create the shards with 'cellssl datasets shard'")
    return index


def check_shard_files(root: str | Path, index: dict[str, Any], checksums: bool = False) -> list[str]:
    """Problems with the shard files of ``index`` (missing, truncated — sizes are compared, which
    costs one ``stat`` per shard — and, with ``checksums``, a sha256 mismatch), one line each."""
    root = Path(root)
    problems = []
    for s in index["shards"]:
        tar = root / s["name"]
        if not tar.is_file():
            problems.append(f"shard {tar} is missing")
        elif tar.stat().st_size != s["bytes"]:
            problems.append(f"shard {tar} is truncated or altered ({tar.stat().st_size} of {s['bytes']} bytes)")
        elif checksums and sha256_file(tar) != s["sha256"]:
            problems.append(f"shard {tar} does not match its sha256 in {root / INDEX_NAME} (corrupt)")
    return problems


def verify_shards(root: str | Path) -> tuple[list[str], str]:
    """Every shard of ``root`` read in full and checked against its size and sha256 in the index
    (``cellssl datasets check``). Returns (problems, one line each; a one-line summary)."""
    index = load_index(root)
    problems = check_shard_files(root, index, checksums=True)
    summary = (f"{root}: {index['count']} cells in {len(index['shards'])} shard(s), "
               f"{len(index['classes'])} classes, channels {index['channels']}, dtypes {index['dtypes']}; "
               + (f"{len(problems)} shard(s) damaged" if problems else "every shard matches its sha256"))
    return problems, summary


class ShardReader:
    """Map-style access to the cells of a shard folder: ``raw(i)`` is one ``pread`` + ``np.load``.

    Opening checks the index and every shard's size (a truncated or missing shard is refused with a
    one-line DataError naming it) but reads no pixels. File descriptors are opened lazily per
    process (``pread`` has no shared file position, so forked loader workers are safe) and dropped
    when pickled (spawned workers reopen them).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index = load_index(self.root)
        problems = check_shard_files(self.root, self.index)
        if problems:
            raise DataError(f"{problems[0]}{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; "
                            "re-create the shards with 'cellssl datasets shard'")
        try:
            self.cells = np.load(self.root / CELLS_NAME, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"cannot read {self.root / CELLS_NAME} ({exc}); re-create the shards with "
                            "'cellssl datasets shard'") from None
        if self.cells.dtype != CELL_DTYPE or len(self.cells) != int(self.index.get("count", -1)):
            raise DataError(f"{self.root / CELLS_NAME} does not match {self.root / INDEX_NAME}; "
                            "re-create the shards with 'cellssl datasets shard'")
        self.classes: list[str] = list(self.index.get("classes", []))
        self._fds: dict[int, int] = {}
        self._paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def labels(self) -> np.ndarray:
        """Integer label of each cell (N,), -1 when unlabelled."""
        return self.cells["label"].astype(np.int64)

    @property
    def paths(self) -> list[str]:
        """The original path of each cell (relative to the sharded source), loaded on first use."""
        if self._paths is None:
            self._paths = (self.root / PATHS_NAME).read_text().splitlines()
            if len(self._paths) != len(self.cells):
                raise DataError(f"{self.root / PATHS_NAME} lists {len(self._paths)} paths for {len(self.cells)} cells; "
                                "re-create the shards with 'cellssl datasets shard'")
        return self._paths

    def member(self, i: int) -> str:
        """``OUT/shard-000003.tar:000004711.npy``: where cell ``i`` lives, for messages."""
        return f"{self.root / self.index['shards'][int(self.cells[i]['shard'])]['name']}:{cell_key(i)}.npy"

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN:
                self.close()
            fd = self._fds[shard] = os.open(self.root / self.index["shards"][shard]["name"], os.O_RDONLY)
        return fd

    def raw(self, i: int) -> np.ndarray:
        """The stored pixels of cell ``i`` as (H, W, C) in their own dtype; ImageReadError naming the
        shard member when it cannot be decoded."""
        rec = self.cells[i]
        data = os.pread(self._fd(int(rec["shard"])), int(rec["size"]), int(rec["offset"]))
        if len(data) != int(rec["size"]):
            raise ImageReadError(self.member(i), f"the shard ends early ({len(data)} of {int(rec['size'])} bytes)")
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ImageReadError(self.member(i), f"corrupt shard member ({exc})") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or min(arr.shape) == 0:
            raise ImageReadError(self.member(i), f"corrupt shard member (array of shape {arr.shape})")
        return arr

    def close(self) -> None:
        """Close the open shard files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def iter_meta(self) -> Iterator[dict[str, Any]]:
        """The ``.json`` metadata of every cell, shard by shard (a sequential read of the tars)."""
        for s in self.index["shards"]:
            for sample in wds.WebDataset(str(self.root / s["name"]), shardshuffle=False):
                yield json.loads(sample["json"])
