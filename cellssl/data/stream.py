"""Pretraining from a streaming shard source: the shards of ``cellssl datasets shard`` read in order
from a URL (issue #22 §2), for data that is not on a local disk.

``--data`` (``data.path``) names the source in one of three ways; the index is read first (it
carries the shard names, counts, classes and channels), then each shard is read as a stream:

    file:///data/shards            a folder URL (file:, http(s)://): OUT/index.json, OUT/shard-*.tar
    http://host/shards/index.json  the index's URL: a shard's URL is it with ``index.json`` replaced
    pipe:cat /data/index.json      a command: the shard's command is it with ``index.json`` replaced
    pipe:aws s3 cp s3://b/shard-{000000..000099}.tar -
                                   shards in brace notation (any scheme or a plain path): these shards
                                   only; the index is read by the same command with the file name
                                   replaced by ``index.json``

Each shard is opened here (``pipe:`` with a timeout between reads, ``http(s)`` through ``urllib``
with a socket timeout, ``file:`` and paths as files) and its tar members are read by webdataset's
``tar_file_iterator`` / ``group_by_keys``; a cell is decoded as the map-style reader does
(:func:`~cellssl.data.shards.decode_cell`, :func:`~cellssl.data.datasets.shard_cell_image`).

The plan of an epoch is a pure function of (seed, epoch, rank, world size, workers): the shard order
is a permutation drawn from (seed, epoch); rank r of W takes every W-th shard of it, and its logical
worker k of K every K-th shard of those (disjoint shards: no two streams read the same shard in an
epoch). Every rank runs ``count // (batch × W)`` steps an epoch; batch j of a rank comes from its
logical worker ``j mod K`` (the DataLoader's round robin), so worker k delivers a fixed number of
batches. A worker whose shards hold fewer cells reads them again (a few cells repeat), one with more
stops early (a few are left out this epoch; the next epoch's order differs). Memory is flat: a
worker holds ``data.shuffle_buffer`` cells and the index (~150 bytes a shard).

Resume: a run at step s is at batch ``b = s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``;
each logical worker skips the batches it delivered before b (its shards are read through again, the
cells not decoded past the raw check), and torch worker t plays logical worker ``(t + b) mod K``, so
that the round robin continues where it stopped: with the same seed, world size and worker count the
resumed run sees the same cells in the same batches as an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from webdataset import tariterators
from webdataset.shardlists import expand_urls

from cellssl.config import DataConfig
from cellssl.data.datasets import DataWarning, OddChannelsError, shard_cell_image, stain_normalizer
from cellssl.data.io import ImageReadError
from cellssl.data.shards import INDEX_NAME, check_index, decode_cell
from cellssl.errors import ConfigError, DataError

_BRACE_NAME = re.compile(r"[^/\s'\"]*\{\d+\.\.\d+\}[^/\s'\"]*")
SHARD_ERRORS = (tarfile.TarError, OSError, ValueError, EOFError, KeyError)  # a shard that cannot be read to its end


@dataclass(frozen=True)
class StreamSource:
    """Where a stream's index and shards are: a shard's URL is ``prefix + name + suffix``;
    ``names``: the shards a brace pattern selects (None: every shard of the index)."""

    spec: str
    prefix: str
    suffix: str
    names: tuple[str, ...] | None = None

    @property
    def index_url(self) -> str:
        return self.prefix + INDEX_NAME + self.suffix

    def url(self, name: str) -> str:
        return self.prefix + name + self.suffix


def parse_source(spec: str) -> StreamSource:
    """The :class:`StreamSource` of a ``--data`` value (module docstring); DataError for a ``pipe:``
    command that names neither ``index.json`` nor shards in brace notation."""
    spec = str(spec)
    found = list(_BRACE_NAME.finditer(spec))
    if found:
        m = found[-1]
        names = tuple(os.path.basename(u) for u in expand_urls(m.group()))
        return StreamSource(spec, spec[: m.start()], spec[m.end():], names)
    if INDEX_NAME in spec:
        i = spec.rindex(INDEX_NAME)
        return StreamSource(spec, spec[:i], spec[i + len(INDEX_NAME):])
    if spec.startswith("pipe:"):
        raise DataError(f"--data {spec}: a pipe: source names its index (pipe:cat DIR/{INDEX_NAME}) or its shards "
                        "(pipe:cat DIR/shard-{000000..000009}.tar); the shards' command is the index's with the "
                        "file name replaced")
    return StreamSource(spec, spec.rstrip("/") + "/", "")


class PipeReader(io.RawIOBase):
    """The output of a shell command (``pipe:CMD``) as a binary stream: each read waits at most
    ``timeout`` s for data (then the command is ended and a one-line DataError says so, never a
    hang); at the end a non-zero exit status is an OSError with the last line the command wrote to
    stderr. Closing before the end ends the command (its process group)."""

    def __init__(self, cmd: str, timeout: float):
        super().__init__()
        self.cmd, self.timeout = cmd, float(timeout)
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=self._err,  # noqa: S602 - pipe: is a shell command by design
                                     start_new_session=True)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout)
        if not ready:
            self._end()
            raise DataError(f"'pipe:{self.cmd}' gave no data for {self.timeout:g} s (data.stream_timeout_s): the "
                            "source is unreachable or stalled; check the command in a shell")
        data = os.read(fd, len(b))
        b[: len(data)] = data
        if not data:
            self._check_status()
        return len(data)

    def _check_status(self) -> None:
        try:
            status = self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._end()
            raise DataError(f"'pipe:{self.cmd}' closed its output but did not exit within {self.timeout:g} s") from None
        if status != 0:
            self._err.seek(0)
            lines = self._err.read().decode("utf-8", "replace").strip().splitlines()
            raise OSError(f"the command exited with status {status}" + (f" ({lines[-1]})" if lines else ""))

    def _end(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def close(self) -> None:
        if not self.closed:
            self._end()
            self.proc.stdout.close()
            self._err.close()
        super().close()


def open_url(url: str, timeout: float):
    """A binary stream of ``url``: ``pipe:CMD`` (:class:`PipeReader`), ``http(s)://`` (urllib, a socket
    timeout of ``timeout`` s), ``file:`` or a plain path (a file)."""
    if url.startswith("pipe:"):
        return io.BufferedReader(PipeReader(url[5:], timeout), 1 << 16)
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - the schemes are checked above
    if url.startswith("file:"):
        return open(url2pathname(urlparse(url).path), "rb")
    return open(url, "rb")


def read_index(source: StreamSource, timeout: float) -> dict[str, Any]:
    """The checked ``index.json`` of ``source``, its shards narrowed to those a brace pattern names;
    a one-line DataError when it cannot be read or names no such shard."""
    url = source.index_url
    try:
        with open_url(url, timeout) as f:
            index = json.loads(f.read())
    except (OSError, ValueError, urllib.error.URLError) as exc:
        raise DataError(f"cannot read the shard index {url} ({exc}); check the URL (the index lies beside the "
                        "shards) or write shards with 'cellssl datasets shard'") from None
    index = check_index(index, url)
    if source.names is not None:
        by_name = {s["name"]: s for s in index["shards"]}
        missing = [n for n in source.names if n not in by_name]
        if missing:
            raise DataError(f"--data {source.spec}: {missing[0]} is not a shard of {url}"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
        index = {**index, "shards": [by_name[n] for n in source.names]}
    return index


# ---- the plan of an epoch: pure functions ------------------------------------------------------
def epoch_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The shard order of ``epoch``: a permutation of ``range(n_shards)`` drawn from (seed, epoch)."""
    return np.random.default_rng([int(seed), int(epoch), 22]).permutation(n_shards)


def stream_shards(order: np.ndarray, rank: int, world: int, worker: int, workers: int) -> list[int]:
    """The shards logical worker ``worker`` of ``workers`` on rank ``rank`` of ``world`` reads:
    every ``world``-th of ``order`` from ``rank``, then every ``workers``-th of those from ``worker``."""
    return [int(k) for k in order[rank::world][worker::workers]]


def worker_batches(end: int, worker: int, workers: int, start: int = 0) -> int:
    """How many of the batches ``start .. end-1`` of an epoch come from logical worker ``worker``
    (batch j comes from worker ``j mod workers``)."""
    first = start + (worker - start) % workers
    return len(range(first, end, workers))


def shuffled(items: Iterator[Any], rng: np.random.Generator, size: int) -> Iterator[Any]:
    """``items`` in a random order through a buffer of ``size`` (memory: ``size`` items): once the
    buffer is full, each new item replaces a uniformly drawn one, which is yielded; then the rest."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


def tar_samples(url: str, timeout: float) -> Iterator[dict[str, Any]]:
    """The samples (``{"__key__", "npy", "json", ...}``: raw member bytes) of the tar at ``url``,
    read by webdataset's tar iterator; a shard that cannot be read to its end (truncated, not a tar,
    a command that failed) ends with a warning naming it, after its complete samples."""
    try:
        with open_url(url, timeout) as stream:
            files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
            yield from tariterators.group_by_keys(files)
    except DataError as exc:  # a stalled pipe: webdataset's iterator appended its own context to the message
        raise DataError(first_arg(exc)) from None
    except SHARD_ERRORS as exc:
        reason = first_arg(exc)
        warnings.warn(f"skipping the rest of shard {url}: it cannot be read ({reason}); check it with "
                      "'cellssl datasets check' on a copy", DataWarning, stacklevel=2)


def first_arg(exc: BaseException) -> str:
    """The message of ``exc`` without what webdataset's tar iterators append (`` @ <stream>``, extra args)."""
    return str(exc.args[0]).split(" @ ")[0] if exc.args else type(exc).__name__


class ShardStream(torch.utils.data.IterableDataset):
    """The cells of a streaming shard source (module docstring) as ``(epoch, cell index, float32
    (H, W, C) image, label)``, for one rank and its loader workers.

    :meth:`plan` fixes the batch size, seed, rank, world size and worker count; :meth:`set_epoch`
    the epoch and the batch it starts at (as :class:`~cellssl.engine.distributed.ResumableSampler`).
    One iteration yields this worker's cells of the rest of the epoch (a multiple of the batch size).
    """

    def __init__(self, spec: str, cfg: DataConfig):
        self.root = str(spec)
        self.cfg = cfg
        self.source = parse_source(spec)
        self.index = read_index(self.source, cfg.stream_timeout_s)
        self.shards: list[dict[str, Any]] = [{"name": s["name"], "count": int(s["count"])} for s in self.index["shards"]]
        self.classes: list[str] = list(self.index.get("classes", []))
        self.fixed_channels = bool(cfg.channels)
        self.channels = int(cfg.channels) if cfg.channels else self._index_channels()
        self.pre_transform = stain_normalizer(cfg)
        self.batch_size, self.seed, self.rank, self.world, self.workers = 1, 0, 0, 1, 1
        self.epoch, self.start_batch = 0, 0

    def _index_channels(self) -> int:
        counts = self.index.get("channels") or []
        if len(counts) != 1:
            raise ConfigError(f"{self.source.index_url} lists cells with channel counts {counts}: set "
                              "data.channels to the count the model takes (1 <-> 3 are converted)")
        return int(counts[0])

    def __len__(self) -> int:
        return sum(s["count"] for s in self.shards)

    def plan(self, batch_size: int, seed: int, rank: int = 0, world: int = 1, workers: int = 1) -> None:
        """Fix the split; a ConfigError when a rank has fewer shards than loader workers."""
        workers = max(1, int(workers))
        if len(self.shards) // world < workers:
            raise ConfigError(f"{self.root} has {len(self.shards)} shard(s) for {world} rank(s) × {workers} loader "
                              f"worker(s): each worker reads its own shards; use --workers "
                              f"{max(0, len(self.shards) // world)} or fewer, or write smaller shards (--shard-size)")
        self.batch_size, self.seed, self.rank, self.world, self.workers = batch_size, seed, rank, world, workers

    @property
    def batches_per_epoch(self) -> int:
        return len(self) // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def logical_worker(self) -> int:
        """This process's logical worker: torch worker t plays ``(t + start_batch) mod workers``."""
        info = torch.utils.data.get_worker_info()
        if (info.num_workers if info else 1) != self.workers:
            raise ConfigError(f"the stream was planned for {self.workers} loader worker(s) but runs in "
                              f"{info.num_workers if info else 1}")
        return ((info.id if info else 0) + self.start_batch) % self.workers

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray, int]]:
        k, per_epoch, b = self.logical_worker(), self.batches_per_epoch, self.start_batch
        skip = worker_batches(b, k, self.workers) * self.batch_size
        take = worker_batches(per_epoch, k, self.workers, b) * self.batch_size
        shards = stream_shards(epoch_order(len(self.shards), self.seed, self.epoch), self.rank, self.world,
                               k, self.workers)
        cells = self._cells(shards, np.random.default_rng([self.seed, self.epoch, self.rank, k, 7]))
        try:
            for _ in range(skip):
                next(cells)
            for _ in range(take):
                i, img, label = next(cells)
                yield self.epoch, i, img, label
        finally:
            cells.close()

    def _cells(self, shards: list[int], rng: np.random.Generator) -> Iterator[tuple[int, np.ndarray, int]]:
        """The readable cells of ``shards`` in shuffled order, read again and again (a stream never
        runs dry before its quota); DataError when a whole pass gives none."""
        total, bad = sum(self.shards[s]["count"] for s in shards), [0]
        while True:
            got = 0
            for sample in shuffled(self._samples(shards), rng, self.cfg.shuffle_buffer):
                cell = self._decode(sample, bad, total)
                if cell is not None:
                    got += 1
                    yield cell
            if got == 0:
                names = ", ".join(self.shards[s]["name"] for s in shards[:3])
                raise DataError(f"no readable cell in the shards of this loader worker ({names}"
                                f"{', ...' if len(shards) > 3 else ''}) from {self.root}: see the warnings above")

    def _samples(self, shards: list[int]) -> Iterator[dict[str, Any]]:
        for s in shards:
            yield from tar_samples(self.source.url(self.shards[s]["name"]), self.cfg.stream_timeout_s)

    def _decode(self, sample: dict[str, Any], bad: list[int], total: int) -> tuple[int, np.ndarray, int] | None:
        """``(cell index, image, label)`` of a raw sample, or None for an unreadable cell (a warning
        naming ``URL:KEY.npy``; a DataError past ``data.max_bad_fraction`` of ``total``)."""
        key = str(sample.get("__key__", "?"))
        where = f"{sample.get('__url__', self.root)}:{key}.npy"
        try:
            img, label = self._image(sample, where), self._label(sample)
            return int(key), img, label
        except (ImageReadError, ValueError, KeyError) as exc:
            reason = exc.reason if isinstance(exc, ImageReadError) else f"corrupt shard member ({exc})"
            warnings.warn(f"skipping unreadable cell {where}: {reason}", DataWarning, stacklevel=2)
            bad[0] += 1
            if bad[0] > self.cfg.max_bad_fraction * total:
                raise DataError(f"{bad[0]} cells read from {self.root} are unreadable (more than "
                                f"data.max_bad_fraction={self.cfg.max_bad_fraction} of this worker's {total}); "
                                "re-create the shards with 'cellssl datasets shard'") from None
            return None

    def _image(self, sample: dict[str, Any], where: str) -> np.ndarray:
        if "npy" not in sample:
            raise ImageReadError(where, "the sample has no .npy member")
        img = shard_cell_image(decode_cell(sample["npy"], where), self.cfg,
                               self.channels if self.fixed_channels else None, where)
        if img.shape[2] != self.channels:
            raise OddChannelsError(where, f"has {img.shape[2]} channel(s) but the stream's cells have "
                                          f"{self.channels} (set data.channels={self.channels} to convert)")
        return self.pre_transform(img) if self.pre_transform is not None else img

    def _label(self, sample: dict[str, Any]) -> int:
        if "json" not in sample or not self.classes:
            return -1
        return int(json.loads(sample["json"]).get("label", -1))
