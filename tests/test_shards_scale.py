"""Shards at scale: exact resume across shards and 2 ranks, memory that does not grow with the
set, streaming shard writing, ``embed`` in resumable parts."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cellssl.config import DataConfig, load_recipe
from cellssl.data.datasets import build_dataset
from cellssl.data.parts import Parts
from cellssl.data.shards import ShardReader, ShardWriter, write_shards
from cellssl.engine.checkpoint import load_checkpoint
from cellssl.engine.distributed import ResumableSampler
from cellssl.engine.loader import build_training_data, training_loader
from cellssl.eval import features
from conftest import make_image_folder, one_error_line, run_cli, spawn_ranks, tiny_recipe_yaml

JOIN_TIMEOUT_S = 240
STOP_AT = 4  # the stopped run gets SIGTERM (on rank 1 only) in this step: mid-epoch (3 steps an epoch)
# (run folder, data.num_workers, resume, overrides): the reference, the stopped run and its resume with
# another worker count, and a --max-minutes run whose budget runs out on rank 1's clock only
RUNS = (("ref", 0, False, []), ("stopped", 1, False, []), ("stopped", 0, True, []),
        ("budget", 0, False, ["train.max_minutes=10"]))


class LateClock:
    """``time`` for rank 1's training loop in the budget run: from the 5th ``monotonic()`` call on
    (step 3's budget check) it reads 2 hours late; everything else is the real ``time``."""

    def __init__(self) -> None:
        self.calls = 0

    def monotonic(self) -> float:
        self.calls += 1
        return time.monotonic() + (7200.0 if self.calls >= 5 else 0.0)

    def __getattr__(self, name: str):
        return getattr(time, name)


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports free right now on 127.0.0.1 (one per run: each run makes its own process group)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ddp_rank(rank: int, ports: list[int], recipe: str, data: str, tmp: str) -> None:
    """One gloo rank (as torchrun would start it) running the RUNS one after the other through
    ``fit``; in the stopped run rank 1 alone gets SIGTERM in step STOP_AT, in the budget run rank 1
    alone sees its time budget spent after step 3."""
    from cellssl.engine import fit as fit_mod

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    # loader workers are forked, as in a process torchrun starts (a spawned rank would otherwise spawn
    # them too: each re-imports torch, ~20 s here)
    mp.set_start_method("fork", force=True)
    original = fit_mod.Training.next_step

    def next_step(self) -> None:
        original(self)
        if rank == 1 and self.out.name == "stopped" and self.step == STOP_AT and self.start_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    fit_mod.Training.next_step = next_step
    for k, (name, workers, resume, overrides) in enumerate(RUNS):
        os.environ["MASTER_PORT"] = str(ports[k])
        if name == "budget" and rank == 1:
            fit_mod.time = LateClock()
        r = load_recipe(recipe, [f"data.path={data}", f"train.out={tmp}/{name}", f"data.num_workers={workers}",
                                 *overrides])
        res = fit_mod.fit(r, resume=resume)
        fit_mod.time = time
        Path(tmp, f"{name}-{k}-rank{rank}.json").write_text(json.dumps({"step": res.step,
                                                                        "stopped": res.stopped_early}))


def shard_folder(tmp_path: Path, n_per_class: int = 8, shard_size: int = 5) -> Path:
    src = make_image_folder(tmp_path / "src", n_per_class=n_per_class, size=16)
    write_shards(build_dataset(DataConfig(), src), tmp_path / "sh", shard_size)
    return tmp_path / "sh"


def test_two_ranks_stopped_mid_epoch_resume_bit_for_bit_with_another_worker_count(tmp_path):
    """2 gloo ranks on a shard folder (24 cells in 5 shards, 4 a rank a step: 3 steps an epoch). The
    stopped run: SIGTERM to rank 1 alone in step 4 (mid-epoch, 1 loader worker); both ranks stop
    after that same step with its checkpoint; --resume (no worker) to step 7 gives the weights and
    losses of the uninterrupted run, bit for bit (each rank's Brownian generator is its own). A
    --max-minutes budget spent on one rank's clock stops both ranks after the same step too."""
    data = shard_folder(tmp_path)
    recipe = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=7, batch_size=4, checkpoint_every=100)
    recipe.write_text(recipe.read_text().replace("backbone: resnet18", "backbone: test_resnet"))
    args = (free_ports(len(RUNS)), str(recipe), str(data), str(tmp_path))
    codes = spawn_ranks(ddp_rank, [(r, *args) for r in range(2)], JOIN_TIMEOUT_S)
    assert codes == [0, 0], f"rank exit codes {codes} (-9: killed after {JOIN_TIMEOUT_S} s, a rank waited forever)"
    for rank in (0, 1):
        assert json.loads((tmp_path / f"stopped-1-rank{rank}.json").read_text()) == \
            {"step": STOP_AT, "stopped": "terminated"}, rank
        assert json.loads((tmp_path / f"stopped-2-rank{rank}.json").read_text()) == {"step": 7, "stopped": None}
        # one rank's clock past --max-minutes: both stop after step 3 (before, rank 0 went on alone)
        assert json.loads((tmp_path / f"budget-3-rank{rank}.json").read_text()) == {"step": 3, "stopped": "max_minutes"}
    ref = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    got = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert ref["step"] == got["step"] == 7
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], got["model"][k]), f"{k} differs after the resume"
    rows = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("ref", "stopped")]
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]] == list(range(1, 8))
    assert [r["loss"] for r in rows[1]] == [r["loss"] for r in rows[0]]


def test_training_from_shards_never_loads_the_paths(tmp_path):
    """Per cell, training holds the 20-byte record and the epoch's permutation: a whole epoch through
    the training loader (a corrupt-free set) builds no list of original paths; a path asked for by
    index is one line of paths.txt."""
    data = shard_folder(tmp_path, n_per_class=4)
    recipe = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", batch_size=4)), [f"data.path={data}"])
    base, views = build_training_data(recipe)
    sampler = ResumableSampler(len(base), 4, 0)
    assert sum(1 for _ in training_loader(recipe, views, sampler, pin_memory=False)) == 3
    assert base.reader._paths is None and base.reader._path_starts is None
    everything = ShardReader(data).paths
    assert [base.samples[i][0] for i in (0, 7, 11)] == [data / everything[i] for i in (0, 7, 11)]
    assert base.reader._paths is None and len(base.reader._path_starts) == 13


def test_shard_writer_streams_cells_and_leaves_nothing_when_interrupted(tmp_path):
    rng = np.random.default_rng(0)
    cells = [rng.integers(0, 65535, size=(8, 6, 2), dtype=np.uint16, endpoint=True) for _ in range(7)]
    with ShardWriter(tmp_path / "sh", 3, classes=["x", "y"], source="generator") as w:
        for i, c in enumerate(cells):
            w.add(c, i % 2, f"gen/{i}.npy")
    assert w.index["count"] == 7 and [s["count"] for s in w.index["shards"]] == [3, 3, 1]
    reader = ShardReader(tmp_path / "sh")
    for i, c in enumerate(cells):
        assert np.array_equal(reader.raw(i), c) and reader.path(i) == f"gen/{i}.npy" and reader.labels[i] == i % 2
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path / "cut", 3) as w:
        w.add(cells[0], -1, "a.npy")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sh"]  # no 'cut', no hidden partial folder


def test_embed_in_parts_resumes_after_the_last_complete_part(tmp_path, capsys, monkeypatch):
    """15 cells in parts of 4: a run killed while part 3 is computed keeps parts 1-2 (and no output);
    the rerun (the CLI) computes parts 3-4 only and writes the .npz a one-pass embed writes."""
    data = shard_folder(tmp_path, n_per_class=5)
    opts = {"image_size": 16, "batch_size": 4, "device": "cpu", "progress": False}
    whole = np.load(features.embed("random:resnet18", data, tmp_path / "whole.npz", **opts))
    saved, original = [], Parts.save

    def killed_in_part_3(parts, k, arrays):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(parts.names[k].name)
        original(parts, k, arrays)

    monkeypatch.setattr(Parts, "save", killed_in_part_3)
    out, parts = tmp_path / "emb.npz", tmp_path / "emb.npz.parts"
    with pytest.raises(KeyboardInterrupt):
        features.embed("random:resnet18", data, out, part_rows=4, **opts)
    assert sorted(p.name for p in parts.iterdir()) == ["part-000000.npz", "part-000001.npz", "plan.json"]
    assert not out.exists()
    # another backbone must not mix its rows with these parts
    code, _, err = run_cli(capsys, "embed", "--checkpoint", "pixels:16", "--data", str(data), "--out", str(out),
                           "--part-rows", "4", "--device", "cpu")
    said = "holds the parts of another embedding (theirs vs this one: backbone random:resnet18 vs pixels:16"
    assert said in one_error_line(code, err)
    saved.clear()
    monkeypatch.setattr(Parts, "save", lambda parts, k, arrays: (saved.append(parts.names[k].name),
                                                                 original(parts, k, arrays)))
    code, stdout, err = run_cli(capsys, "embed", "--checkpoint", "random:resnet18", "--data", str(data), "--out",
                                str(out), "--part-rows", "4", "--image-size", "16", "--batch-size", "4",
                                "--device", "cpu")
    assert code == 0, err
    assert saved == ["part-000002.npz", "part-000003.npz"] and not parts.exists()
    got = np.load(out)
    assert sorted(got.files) == sorted(whole.files)
    for key in ("paths", "labels", "classes", "skipped", "source"):
        assert np.array_equal(got[key], whole[key]), key
    assert got["features"].shape == whole["features"].shape == (15, 512)
    np.testing.assert_allclose(got["features"], whole["features"], rtol=1e-5, atol=1e-6)
