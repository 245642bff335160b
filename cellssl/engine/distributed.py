"""torchrun / DDP setup: rank, world size, device, and a resumable distributed sampler."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from cellssl.errors import ConfigError


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``, ``is_main``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` -> this rank's GPU; errors are one line.
    A ``torch.device`` is returned as it is."""
    if isinstance(name, torch.device):
        return name
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise ConfigError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def init_distributed(device_name: str) -> DistInfo:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    NCCL for CUDA, gloo for CPU. Single-process runs return rank 0 of 1 with no group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def cleanup_distributed() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffled, rank-sharded indices that depend only on (seed, epoch), startable mid-epoch.

    Each epoch draws a permutation of ``range(n)`` from ``seed + epoch``, truncates it to a
    whole number of global batches (drop-last), gives rank r every world-th batch slot, and skips
    the first ``start_batch`` batches of this rank. Indices are encoded as ``epoch·n + i`` so the
    dataset wrapper can seed augmentations per (epoch, image): a resumed run sees exactly the same
    data and views as an uninterrupted one.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed + 1_000_003 * self.epoch)
        perm = rng.permutation(self.n)[: self.batches_per_epoch * self.batch_size * self.world_size]
        per_rank = perm.reshape(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank]
        for b in range(self.start_batch, self.batches_per_epoch):
            for i in per_rank[b]:
                yield int(self.epoch * self.n + i)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer (BatchNorm statistics) from rank ``src`` to all ranks.

    Parameters stay identical under DDP; running statistics drift apart because each rank sees
    different images. Called at the end of a run so every rank holds the same model.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buf in module.buffers():
        dist.broadcast(buf, src)


def control_group():
    """The process group for small host-side agreements between ranks (a stop signal, per-rank
    state in checkpoints): a gloo group beside NCCL, so that agreeing reads nothing back from a
    GPU; None (the default group) on gloo or without a group. Every rank must call it (once)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def agree_max(value: int, group=None) -> int:
    """The largest of every rank's integer ``value`` (e.g. "a stop signal came": if one rank saw it,
    all stop after the same step); ``value`` itself when not distributed. ``group``: :func:`control_group`."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def gather_objects(obj, group=None) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s integer on every rank (e.g. the step count a time budget allows), so that
    all ranks run the same schedule; ``value`` itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return int(value)
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.broadcast(t, src)
    return int(t.item())
