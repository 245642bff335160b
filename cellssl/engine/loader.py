"""The training data: multi-view batches whose order and augmentations depend only on (seed, epoch, image).

A resumed run, a run with another worker count and an uninterrupted run see exactly the same
views at every step: the sampler (:class:`~cellssl.engine.distributed.ResumableSampler`) encodes
``epoch·n + i`` and :class:`EpochSeededViews` seeds every random generator from it.

A streaming source (:mod:`cellssl.data.stream`) has no sampler: :class:`StreamViews` yields each
loader worker's own shards' cells, seeded by (seed, epoch, cell) the same way; its order depends on
(seed, epoch, world size, workers), so its resume is exact for the same split.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator

import numpy as np
import torch

from cellssl.augment.views import build_view_transform
from cellssl.config import Recipe
from cellssl.data.datasets import MultiViewDataset, build_dataset, collate_readable, view_item
from cellssl.data.shards import is_stream_spec
from cellssl.data.stream import ShardStream
from cellssl.engine.distributed import ResumableSampler
from cellssl.engine.watchdog import register_worker_stack_dump


class EpochSeededViews(torch.utils.data.Dataset):
    """Wraps a multi-view dataset so each item's augmentation depends only on (seed, epoch, index).

    The sampler yields ``epoch·n + i``; before producing image i's views the Python, NumPy, torch
    and albumentations generators are seeded from (seed, epoch, i). Data order *and* views are then
    identical in a resumed run and in worker processes, whatever the worker count.
    """

    def __init__(self, views_dataset: torch.utils.data.Dataset, n: int, seed: int) -> None:
        self.ds, self.n, self.seed = views_dataset, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int):
        epoch, i = divmod(int(key), self.n)
        seed_views(self.seed, epoch, i, getattr(self.ds, "transform", None))
        return self.ds[i]


def seed_views(seed: int, epoch: int, i: int, transform) -> None:
    """Seed the Python, NumPy, torch and albumentations generators for image ``i``'s views in
    ``epoch``: ``s = (seed·1,000,003 + epoch·7,368,787 + i) mod (2³¹ − 1)``. The map-style loader and
    the stream seed the same way, so a cell's views depend only on (seed, epoch, cell)."""
    s = (seed * 1_000_003 + epoch * 7_368_787 + i) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    reseed_transforms(transform, s)


class StreamViews(torch.utils.data.IterableDataset):
    """The multi-view items (:func:`~cellssl.data.datasets.view_item`) of a streaming source
    (:class:`~cellssl.data.stream.ShardStream`), each cell's views seeded from (seed, epoch, cell
    index) as the map-style loader's. It stands in for the sampler too: ``batches_per_epoch``,
    ``set_epoch(epoch, start_batch)`` set the stream's position (read by the workers forked at the
    start of each epoch), and :meth:`position` is what a checkpoint records."""

    def __init__(self, stream: ShardStream, transform, seed: int) -> None:
        self.stream, self.transform, self.seed = stream, transform, seed

    @property
    def batches_per_epoch(self) -> int:
        return self.stream.batches_per_epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.stream.set_epoch(epoch, start_batch)

    def position(self, step: int) -> dict:
        """How far the stream is at ``step``: epoch, batches and cells consumed per rank in it, and the
        split it was read with (``--resume`` continues exactly only with the same split)."""
        st, per_epoch = self.stream, max(1, self.batches_per_epoch)
        return {"epoch": step // per_epoch, "batches": step % per_epoch,
                "samples_per_rank": (step % per_epoch) * st.batch_size, "world_size": st.world,
                "workers": st.workers, "shards": len(st.shards), "seed": st.seed, "source": st.root}

    def __iter__(self):
        for epoch, i, img, label in self.stream:
            seed_views(self.seed, epoch, i, self.transform)
            yield view_item(self.transform(img), label, i)


def stream_resume_note(saved: dict | None, now: dict) -> str | None:
    """Why a streaming run resumed from a checkpoint's stream position ``saved`` is not exact with the
    position ``now`` (another world size, worker count, shard set or seed), or None when it is."""
    if not saved:
        return None
    changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in ("world_size", "workers", "shards", "seed")
               if saved.get(k) != now[k]]
    if not changed:
        return None
    return (f"--resume: the stream was read with another split ({', '.join(changed)}): epoch {now['epoch']} "
            f"continues at batch {now['batches']}, but which cells this epoch still holds differs (some may repeat "
            "or be left out); keep --workers and the number of processes for an exact resume")


def reseed_transforms(obj, seed: int, _depth: int = 0) -> None:
    """Seed every albumentations ``Compose`` reachable from ``obj`` (attributes, lists)."""
    if obj is None or _depth > 3:
        return
    if hasattr(obj, "set_seed"):
        obj.set_seed(seed)
        return
    if hasattr(obj, "set_random_seed"):
        obj.set_random_seed(seed)
        return
    children = obj if isinstance(obj, (list, tuple)) else list(getattr(obj, "__dict__", {}).values())
    for j, child in enumerate(children):
        if isinstance(child, (list, tuple)) or hasattr(child, "__dict__"):
            reseed_transforms(child, seed + 101 * (j + 1), _depth + 1)


def build_training_data(recipe: Recipe, dataset=None):
    """(image dataset, multi-view dataset) for the recipe's data and views sections; for a streaming
    source (``data.path`` a ``pipe:``/``file:``/``http(s)`` URL or a brace pattern of shards),
    (:class:`~cellssl.data.stream.ShardStream`, :class:`StreamViews`)."""
    if dataset is None and is_stream_spec(recipe.data.path):
        stream = ShardStream(recipe.data.path, recipe.data)
        return stream, StreamViews(stream, build_view_transform(recipe.views, recipe.data, stream.channels),
                                   recipe.train.seed)
    base = dataset if dataset is not None else build_dataset(recipe.data, labelled=False)
    transform = build_view_transform(recipe.views, recipe.data, base.channels)
    return base, MultiViewDataset(base, transform)


def training_sampler(recipe: Recipe, views_ds, n: int, rank: int, world: int):
    """The order of the training items: a :class:`ResumableSampler` over ``n`` images, or for a
    stream its :class:`StreamViews` itself, planned for this rank and the loader's workers."""
    tc = recipe.train
    if isinstance(views_ds, StreamViews):
        views_ds.stream.plan(tc.batch_size, tc.seed, rank, world, recipe.data.num_workers)
        return views_ds
    return ResumableSampler(n, tc.batch_size, tc.seed, rank, world)


def training_loader(recipe: Recipe, views_ds, sampler: ResumableSampler, pin_memory: bool, stack_fd: int | None = None):
    """The DataLoader of the multi-view batches ``{"views": (B, M, C, S, S)[, "local": ...]}`` in
    the sampler's order (``data.num_workers`` processes, 4 batches prefetched each).

    The workers are forked without OpenCV's thread pool (``cellssl.data.forksafe``) and make no
    thread-pool call; each ignores SIGINT and dumps its stacks to ``stack_fd`` on SIGUSR1
    (``engine.watchdog``). A batch that takes longer than ``train.stall_timeout_s`` raises torch's
    ``DataLoader timed out`` (``engine.fit`` turns it into a one-line error). For a stream
    (:class:`StreamViews`) the batches come from the workers in turn, each its own shards'."""
    workers = recipe.data.num_workers
    stream = isinstance(views_ds, StreamViews)
    # a stream's workers are forked anew each epoch: they take the epoch and start batch set just before
    extra = {"prefetch_factor": 4, "persistent_workers": not stream, "timeout": recipe.train.stall_timeout_s or 0,
             "worker_init_fn": functools.partial(_worker_init, stack_fd=stack_fd)} if workers > 0 else {}
    if stream:
        return torch.utils.data.DataLoader(views_ds, batch_size=recipe.train.batch_size, num_workers=workers,
                                           pin_memory=pin_memory, collate_fn=collate_readable, **extra)
    return torch.utils.data.DataLoader(
        EpochSeededViews(views_ds, sampler.n, recipe.train.seed), batch_size=recipe.train.batch_size,
        sampler=sampler, num_workers=workers, pin_memory=pin_memory, drop_last=False, collate_fn=collate_readable,
        **extra)


def _worker_init(_: int, stack_fd: int | None = None) -> None:
    register_worker_stack_dump(stack_fd)


def worker_pids(loader) -> list[int]:
    """The process ids of a DataLoader's running workers (none before its first batch)."""
    it = getattr(loader, "_iterator", None)
    return [w.pid for w in getattr(it, "_workers", []) if w.pid is not None and w.is_alive()]


def step_batches(loader, sampler: ResumableSampler, first_step: int) -> Iterator[tuple[int, dict]]:
    """``(epoch, batch)`` for step ``first_step`` on, forever: each epoch restarts the loader with the
    sampler set to that epoch (and, in the first one, to the batch the step is at). ``sampler``: a
    :class:`ResumableSampler` or a :class:`StreamViews`."""
    per_epoch = sampler.batches_per_epoch
    epoch = first_step // per_epoch
    sampler.set_epoch(epoch, first_step % per_epoch)
    while True:
        for batch in loader:
            yield epoch, batch
        epoch += 1
        sampler.set_epoch(epoch, 0)
