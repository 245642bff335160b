"""Cells stored as shards: plain tar files (WebDataset layout) plus an index, for millions of cells.

``cellssl datasets shard SRC OUT --shard-size N`` writes::

    OUT/shard-000000.tar …   N cells each; member ``<key>.npy`` (the stored pixels, lossless:
                              any dtype, any channel count) and ``<key>.json`` (label, class,
                              original path, channels, dtype); ``key`` = the cell's 9-digit index
    OUT/cells.npy            one record per cell: shard number, byte offset and size of its
                              ``.npy`` member inside the tar, label (20 bytes a cell)
    OUT/paths.txt            the original path of each cell, one a line (a path is read by its line
                              when a command names a cell, e.g. ``embed``; training reads none)
    OUT/index.json           format, counts, classes, channels, dtypes and per-shard name, count,
                              bytes and sha256

The tars are written with ``webdataset.TarWriter``, so any WebDataset pipeline reads them too.
cellssl itself reads them map-style (:class:`ShardReader`): cell i is one ``pread`` at a known
offset, so the resumable, rank-sharded sampler of the training loop works unchanged and exact
resume comes for free. The per-cell records cost 20 bytes, i.e. 20 MB per million cells, also
while writing (:class:`ShardWriter` streams cells from any source, a generator included).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
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


def line_starts(path: str | Path, count: int, chunk: int = 1 << 24) -> np.ndarray:
    """Byte offsets of the start of each of the ``count`` lines of the text file ``path``, then its
    end (``count + 1`` int64), read in 16 MiB chunks; DataError when it holds another number of lines."""
    starts, pos = [np.zeros(1, np.int64)], 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            starts.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64) + pos + 1)
            pos += len(block)
    out = np.concatenate(starts)
    if len(out) != count + 1:
        raise DataError(f"{path} lists {len(out) - 1} paths for {count} cells; re-create the shards with "
                        "'cellssl datasets shard'")
    return out


def decode_cell(data: bytes, where: str) -> np.ndarray:
    """The pixels of one ``.npy`` shard member as (H, W, C) in their own dtype (a 2-D array gets
    C = 1); ImageReadError naming ``where`` (``shard-000003.tar:000004711.npy``) when it cannot be
    decoded. The one decoding of a stored cell: the map-style reader and the stream use it."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ImageReadError(where, f"corrupt shard member ({exc})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or min(arr.shape) == 0:
        raise ImageReadError(where, f"corrupt shard member (array of shape {arr.shape})")
    return arr


STREAM_PREFIXES = ("pipe:", "file:", "http://", "https://")
_BRACES = re.compile(r"\{\d+\.\.\d+\}")


def is_stream_spec(spec: str | Path | None) -> bool:
    """True when a ``--data`` value names a streaming shard source (:mod:`cellssl.data.stream`): a
    ``pipe:``, ``file:``, ``http(s)://`` URL, or shards in brace notation (``shard-{000000..000009}.tar``)."""
    s = str(spec or "")
    return s.startswith(STREAM_PREFIXES) or bool(_BRACES.search(s))


def _cell_meta(label: int, classes: list[str], path: str, raw: np.ndarray) -> dict[str, Any]:
    return {"label": int(label), "class": classes[label] if 0 <= label < len(classes) else None,
            "path": path, "channels": int(raw.shape[2]), "dtype": str(raw.dtype)}


class ShardWriter:
    """Write cells one at a time as tar shards of ``shard_size`` cells into the new folder ``out``
    (the streaming side of :func:`write_shards`: a generator or a million-cell source never has to be
    held in memory). Held per cell: its 20-byte record; the paths go to ``paths.txt`` as they come.

    Use as a context manager; :meth:`add` each cell, the index is written when the block ends
    (``out`` is a hidden temporary folder renamed only then: an interrupted run leaves no ``out``)::

        with ShardWriter(out, 10000, classes=["a", "b"], source="generator") as w:
            for pixels, label, path in cells:
                w.add(pixels, label, path)
        w.index  # what index.json holds
    """

    def __init__(self, out: str | Path, shard_size: int, classes: list[str] | tuple[str, ...] = (),
                 source: str = "", skipped: list[str] | None = None):
        if int(shard_size) < 1:
            raise ConfigError(f"--shard-size must be at least 1, got {shard_size}")
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DataError(f"{out} already exists: nothing is overwritten; choose another output folder or delete it")
        self.out, self.shard_size, self.classes = out, int(shard_size), list(classes)
        self.source, self.skipped = str(source), skipped if skipped is not None else []
        self.count = 0
        self.index: dict[str, Any] = {}
        self._records = bytearray()  # CELL_DTYPE records, 20 bytes a cell
        self._shards: list[dict[str, Any]] = []
        self._channels: set[int] = set()
        self._dtypes: set[str] = set()
        self._writer: Any = None
        self._first = 0  # index of the first cell of the open shard

    def __enter__(self) -> ShardWriter:
        self._stack = contextlib.ExitStack()
        self.tmp = self._stack.enter_context(output_folder(self.out))
        self._paths = self._stack.enter_context(open(self.tmp / PATHS_NAME, "w", encoding="utf-8"))
        return self

    def add(self, raw: np.ndarray, label: int, path: str) -> None:
        """Append one cell: ``raw`` (H, W[, C]) stored as is (any dtype), integer ``label`` (-1: none),
        its original ``path`` (for messages and outputs)."""
        raw = np.ascontiguousarray(raw if raw.ndim == 3 else raw[:, :, None])
        if self._writer is None or self.count - self._first == self.shard_size:
            self._close_shard()
            self._first = self.count
            self._writer = wds.TarWriter(str(self.tmp / shard_name(len(self._shards))), mtime=0.0)
        meta = _cell_meta(label, self.classes, path, raw)
        self._writer.write({"__key__": cell_key(self.count), "npy": raw, "json": meta})
        self._records += np.array([(0, 0, 0, int(label))], dtype=CELL_DTYPE).tobytes()
        self._paths.write(path.replace("\n", " ") + "\n")
        self._channels.add(meta["channels"])
        self._dtypes.add(meta["dtype"])
        self.count += 1

    def _close_shard(self) -> None:
        """Close the open tar and fill its cells' offsets and sizes from its member headers."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        tar = self.tmp / shard_name(len(self._shards))
        spans = tar_member_spans(tar)
        lo, hi = self._first, self.count
        found = np.array([spans[cell_key(j)] for j in range(lo, hi)], dtype=np.int64).reshape(-1, 2)
        cells = np.frombuffer(self._records, dtype=CELL_DTYPE)  # a view, written in place (dropped below:
        cells["shard"][lo:hi] = len(self._shards)               # a bytearray with a view cannot grow)
        cells["offset"][lo:hi], cells["size"][lo:hi] = found[:, 0], found[:, 1]
        del cells
        self._shards.append({"name": tar.name, "count": self.count - self._first, "bytes": tar.stat().st_size,
                             "sha256": sha256_file(tar)})

    def _finish(self) -> None:
        """The last shard, ``cells.npy``, ``paths.txt`` and ``index.json``."""
        if self.count == 0:
            raise DataError(f"no readable image in {self.source or 'the source'}: nothing to shard")
        self._close_shard()
        self._paths.close()
        np.save(self.tmp / CELLS_NAME, np.frombuffer(self._records, dtype=CELL_DTYPE))
        self.index = {"format": FORMAT, "version": VERSION, "count": self.count, "shard_size": self.shard_size,
                      "classes": self.classes, "channels": sorted(self._channels), "dtypes": sorted(self._dtypes),
                      "source": self.source, "skipped": self.skipped, "shards": self._shards,
                      "cells_sha256": sha256_file(self.tmp / CELLS_NAME)}
        (self.tmp / INDEX_NAME).write_text(json.dumps(self.index, indent=1))

    def _close_writer(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        # on any error output_folder removes the temporary folder: no half-written ``out``
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                self._close_writer()
                if not self._stack.__exit__(*sys.exc_info()):
                    raise
                return False
            return bool(self._stack.__exit__(None, None, None))
        self._close_writer()
        return bool(self._stack.__exit__(exc_type, exc, tb))


def write_shards(ds: Any, out: str | Path, shard_size: int,
                 progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write the cells of ``ds`` as tar shards of ``shard_size`` cells into the new folder ``out``
    (through :class:`ShardWriter`).

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
    base = Path(ds.root) if Path(ds.root).is_dir() else Path(ds.root).parent
    n = len(ds.samples)
    with ShardWriter(out, shard_size, classes=list(ds.classes), source=str(ds.root)) as writer:
        for i in range(n):
            path, label = ds.samples[i]
            rel = relative_path(path, base)
            try:
                raw = ds.raw(i)
            except ImageReadError as exc:
                warnings.warn(f"skipping unreadable image {path}: {exc.reason}", stacklevel=2)
                writer.skipped.append(rel)
                continue
            writer.add(raw, label, rel)
            if progress is not None:
                progress(i + 1, n)
    return writer.index


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
    return check_index(index, path)


def check_index(index: Any, where: str | Path) -> dict[str, Any]:
    """``index`` (parsed ``index.json``, read from ``where``) when it is a cellssl shard index; else a
    one-line DataError naming ``where``."""
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
        raise DataError(f"{where} is not a cellssl shard index (format '{FORMAT}'); "
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
        self._path_starts: np.ndarray | None = None

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

    def path(self, i: int) -> str:
        """The original path of cell ``i``: one ``pread`` of its line of ``paths.txt`` (the line starts,
        8 bytes a cell, are found on first use), so no list of every path is built."""
        if self._path_starts is None:
            self._path_starts = line_starts(self.root / PATHS_NAME, len(self.cells))
        lo, hi = int(self._path_starts[i]), int(self._path_starts[i + 1])
        return os.pread(self._fd(-1), hi - lo - 1, lo).decode("utf-8")

    def member(self, i: int) -> str:
        """``OUT/shard-000003.tar:000004711.npy``: where cell ``i`` lives, for messages."""
        return f"{self.root / self.index['shards'][int(self.cells[i]['shard'])]['name']}:{cell_key(i)}.npy"

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN:
                self.close()
            name = PATHS_NAME if shard < 0 else self.index["shards"][shard]["name"]  # -1: paths.txt
            fd = self._fds[shard] = os.open(self.root / name, os.O_RDONLY)
        return fd

    def raw(self, i: int) -> np.ndarray:
        """The stored pixels of cell ``i`` as (H, W, C) in their own dtype; ImageReadError naming the
        shard member when it cannot be decoded."""
        rec = self.cells[i]
        data = os.pread(self._fd(int(rec["shard"])), int(rec["size"]), int(rec["offset"]))
        if len(data) != int(rec["size"]):
            raise ImageReadError(self.member(i), f"the shard ends early ({len(data)} of {int(rec['size'])} bytes)")
        return decode_cell(data, self.member(i))

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
