"""The training data: multi-view batches whose order and augmentations depend only on (seed, epoch, image).

A resumed run, a run with another worker count and an uninterrupted run see exactly the same
views at every step: the sampler (:class:`~cellssl.engine.distributed.ResumableSampler`) encodes
``epoch·n + i`` and :class:`EpochSeededViews` seeds every random generator from it.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator

import numpy as np
import torch

from cellssl.augment.views import build_view_transform
from cellssl.config import Recipe
from cellssl.data.datasets import MultiViewDataset, build_dataset, collate_readable
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
        s = (self.seed * 1_000_003 + epoch * 7_368_787 + i) % (2**31 - 1)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        reseed_transforms(getattr(self.ds, "transform", None), s)
        return self.ds[i]


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
    """(image dataset, multi-view dataset) for the recipe's data and views sections."""
    base = dataset if dataset is not None else build_dataset(recipe.data, labelled=False)
    transform = build_view_transform(recipe.views, recipe.data, base.channels)
    return base, MultiViewDataset(base, transform)


def training_loader(recipe: Recipe, views_ds, sampler: ResumableSampler, pin_memory: bool, stack_fd: int | None = None):
    """The DataLoader of the multi-view batches ``{"views": (B, M, C, S, S)[, "local": ...]}`` in
    the sampler's order (``data.num_workers`` processes, 4 batches prefetched each).

    The workers are forked without OpenCV's thread pool (``cellssl.data.forksafe``) and make no
    thread-pool call; each ignores SIGINT and dumps its stacks to ``stack_fd`` on SIGUSR1
    (``engine.watchdog``). A batch that takes longer than ``train.stall_timeout_s`` raises torch's
    ``DataLoader timed out`` (``engine.fit`` turns it into a one-line error)."""
    workers = recipe.data.num_workers
    extra = {"prefetch_factor": 4, "persistent_workers": True, "timeout": recipe.train.stall_timeout_s or 0,
             "worker_init_fn": functools.partial(_worker_init, stack_fd=stack_fd)} if workers > 0 else {}
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
    sampler set to that epoch (and, in the first one, to the batch the step is at)."""
    per_epoch = sampler.batches_per_epoch
    epoch = first_step // per_epoch
    sampler.set_epoch(epoch, first_step % per_epoch)
    while True:
        for batch in loader:
            yield epoch, batch
        epoch += 1
        sampler.set_epoch(epoch, 0)
