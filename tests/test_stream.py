"""Streaming shard sources (``--data pipe:/file:/http(s)://``, :mod:`cellssl.data.stream`): the
source forms, each rank and loader worker reading its own shards, exact resume for the same split,
pretraining from a stream, bad shards named (skipped or one-line errors, never a hang)."""

from __future__ import annotations

import functools
import http.server
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cellssl.config import DataConfig, load_recipe
from cellssl.data.datasets import build_dataset
from cellssl.data.shards import ShardReader, write_shards
from cellssl.data.stream import ShardStream, parse_source, stream_shards, worker_batches
from cellssl.engine.checkpoint import load_checkpoint
from cellssl.engine.fit import fit
from cellssl.errors import ConfigError, DataError
from conftest import make_image_folder, metrics_rows, run_cli, tiny_recipe_yaml

SHARD = 3  # cells a shard: cell i lives in shard i // SHARD


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """18 cells (3 classes × 6, 16 px) in 6 shards of 3."""
    root = tmp_path_factory.mktemp("stream")
    src = make_image_folder(root / "src", n_per_class=6, size=16)
    write_shards(build_dataset(DataConfig(), src), root / "sh", SHARD)
    return root / "sh"


def stream_batches(spec: str, *, workers: int = 0, batch: int = 4, epoch: int = 0, start: int = 0, rank: int = 0,
                   world: int = 1, cfg: DataConfig | None = None) -> list[list[int]]:
    """The cell indices of each batch a DataLoader makes of the stream (one epoch, from batch ``start``)."""
    st = ShardStream(spec, cfg or DataConfig(shuffle_buffer=4))
    st.plan(batch, seed=0, rank=rank, world=world, workers=workers)
    st.set_epoch(epoch, start)
    loader = torch.utils.data.DataLoader(st, batch_size=batch, num_workers=workers, timeout=60 if workers else 0)
    return [b[1].tolist() for b in loader]


def test_source_forms_name_the_index_and_the_shards():
    base = parse_source("file:///data/sh/")
    assert base.index_url == "file:///data/sh/index.json" and base.url("shard-000002.tar") == "file:///data/sh/shard-000002.tar"
    web = parse_source("http://host:8000/sh/index.json")
    assert web.url("shard-000000.tar") == "http://host:8000/sh/shard-000000.tar" and web.names is None
    pipe = parse_source("pipe:cat /d/index.json | pv -q")
    assert pipe.url("shard-000001.tar") == "pipe:cat /d/shard-000001.tar | pv -q"
    brace = parse_source("pipe:aws s3 cp s3://b/sh/shard-{000001..000003}.tar -")
    assert brace.index_url == "pipe:aws s3 cp s3://b/sh/index.json -"
    assert brace.names == ("shard-000001.tar", "shard-000002.tar", "shard-000003.tar")
    with pytest.raises(DataError, match=r"a pipe: source names its index"):
        parse_source("pipe:cat /d/")


def test_plan_splits_shards_per_rank_then_worker_and_batches_round_robin():
    order = np.random.default_rng(0).permutation(11)
    streams = [stream_shards(order, r, 2, k, 2) for r in range(2) for k in range(2)]
    flat = [s for st in streams for s in st]
    assert sorted(flat) == list(range(11))  # every shard once: no two streams share one
    assert [len(s) for s in streams] == [3, 3, 3, 2]
    # batch j of an epoch of 7 comes from worker j mod 3; resuming at b, the rest are counted the same way
    assert [worker_batches(7, k, 3) for k in range(3)] == [3, 2, 2]
    for b in range(8):
        assert [worker_batches(b, k, 3) + worker_batches(7, k, 3, b) for k in range(3)] == [3, 2, 2]


def test_two_loader_workers_read_disjoint_shards(shard_dir):
    batches = stream_batches(f"file://{shard_dir}", workers=2)
    assert len(batches) == 18 // 4 and all(len(b) == 4 for b in batches)
    shards_of = [{i // SHARD for i in b} for b in batches]
    by_worker = [set().union(*shards_of[k::2]) for k in range(2)]  # batch j from worker j mod 2
    assert by_worker[0] and by_worker[1] and not by_worker[0] & by_worker[1]
    seen = [i for b in batches for i in b]
    assert len(set(seen)) == len(seen) == 16  # 18 cells, 16 read: no cell twice
    # the two ranks of a 2-process run: each its own shards, and the same order every time
    rank_shards = [{i // SHARD for b in stream_batches(str(shard_dir / "shard-{000000..000005}.tar"), rank=r, world=2,
                                                       batch=2) for i in b} for r in range(2)]
    assert rank_shards[0] and rank_shards[1] and not rank_shards[0] & rank_shards[1]
    assert stream_batches(f"file://{shard_dir}", workers=2) == batches


@pytest.mark.parametrize("start", [1, 2])
def test_resume_mid_epoch_continues_without_repeating_the_consumed_part(shard_dir, start):
    spec = f"pipe:cat {shard_dir}/index.json"
    full = stream_batches(spec, workers=2, epoch=1)
    rest = stream_batches(spec, workers=2, epoch=1, start=start)
    assert rest == full[start:]  # the same remaining cells in the same batches, none of the consumed ones
    assert stream_batches(spec, workers=2, epoch=2) != full  # another epoch, another order


def test_pretrain_from_a_pipe_stream_resumes_bit_for_bit(tmp_path, shard_dir, monkeypatch):
    """6 steps (4 an epoch: 18 cells, batch 4) uninterrupted, and stopped at step 3 then resumed: the
    same weights and losses; the checkpoint records the stream's position."""
    from cellssl.methods.msbreg import MSBReg

    spec = f"pipe:cat {shard_dir}/index.json"
    yaml = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=6, batch_size=4, checkpoint_every=100)
    args = [f"data.path={spec}", "data.shuffle_buffer=4"]
    ref = fit(load_recipe(str(yaml), [*args, f"train.out={tmp_path / 'ref'}"]))
    original, calls = MSBReg.forward, {"n": 0}

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(MSBReg, "forward", interrupted)
    out = tmp_path / "cut"
    cut = fit(load_recipe(str(yaml), [*args, f"train.out={out}"]))
    assert cut.stopped_early == "interrupted" and cut.step == 3
    pos = load_checkpoint(cut.checkpoint)["stream"]
    assert pos["epoch"] == 0 and pos["batches"] == 3 and pos["samples_per_rank"] == 12 and pos["workers"] == 1
    monkeypatch.setattr(MSBReg, "forward", original)
    again = fit(load_recipe(str(yaml), [*args, f"train.out={out}"]), resume=True)
    assert ref.step == again.step == 6
    a, b = load_checkpoint(ref.checkpoint), load_checkpoint(again.checkpoint)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in metrics_rows(tmp_path / "ref")] == [r["loss"] for r in metrics_rows(out)]
    assert b["stream"]["epoch"] == 1 and b["stream"]["batches"] == 2


def test_cli_pretrains_from_a_file_url_with_two_workers(tmp_path, shard_dir, capsys):
    yaml = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=2, batch_size=4, checkpoint_every=100)
    code, out, err = run_cli(capsys, "pretrain", "--recipe", str(yaml), "--data", f"file://{shard_dir}",
                             "--workers", "2", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "pretrained 2/2 steps" in out
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["stream"]["workers"] == 2
    # more workers than a rank has shards: one line before anything is read
    code, _, err = run_cli(capsys, "pretrain", "--recipe", str(yaml), "--data", f"file://{shard_dir}",
                           "--workers", "7", "--out", str(tmp_path / "run7"))
    assert code != 0 and "has 6 shard(s) for 1 rank(s) × 7 loader worker(s)" in err
    assert len(err.strip().splitlines()) == 1, err


def test_truncated_shard_and_corrupt_member_are_named_and_skipped(tmp_path, shard_dir):
    bad = tmp_path / "sh"
    bad.mkdir()
    for f in shard_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    rec = ShardReader(bad).cells[4]  # cell 4: shard 1
    data = bytearray((bad / "shard-000001.tar").read_bytes())
    data[int(rec["offset"]):int(rec["offset"]) + 8] = b"garbage!"
    (bad / "shard-000001.tar").write_bytes(bytes(data))
    tar = bad / "shard-000003.tar"
    tar.write_bytes(tar.read_bytes()[:1800])  # mid-way through its second cell
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = stream_batches(f"file://{bad}", cfg=DataConfig(shuffle_buffer=4, max_bad_fraction=0.9))
    msg = [str(w.message) for w in caught]
    assert any("skipping unreadable cell" in m and "shard-000001.tar:000000004.npy" in m for m in msg), msg
    assert any("skipping the rest of shard" in m and "shard-000003.tar" in m for m in msg), msg
    seen = {i for b in batches for i in b}
    assert len(batches) == 4 and all(len(b) == 4 for b in batches)  # the epoch is still whole
    assert 4 not in seen and not seen & {10, 11}  # the corrupt cell and the lost end of shard 3


def test_unreachable_or_stalled_sources_are_one_line_errors(tmp_path, shard_dir):
    with pytest.raises(DataError, match=r"cannot read the shard index file:///nowhere/index\.json"):
        ShardStream("file:///nowhere", DataConfig())
    with pytest.raises(DataError, match=r"shard index pipe:cat /nowhere/index\.json .*exited with status 1"):
        ShardStream("pipe:cat /nowhere/index.json", DataConfig())
    with pytest.raises(DataError, match=r"cannot read the shard index http://127\.0\.0\.1:9/index\.json"):
        ShardStream("http://127.0.0.1:9/index.json", DataConfig(stream_timeout_s=5))
    with pytest.raises(DataError, match=r"shard-000006\.tar is not a shard of"):
        ShardStream(str(shard_dir / "shard-{000004..000006}.tar"), DataConfig())
    slow = tmp_path / "slow.sh"  # the index comes at once, every shard never
    slow.write_text('case "$1" in *.tar) sleep 30;; esac; cat "$1"\n')
    with pytest.raises(DataError, match=r"gave no data for 0\.5 s \(data\.stream_timeout_s\)"):
        stream_batches(f"pipe:sh {slow} {shard_dir}/index.json", cfg=DataConfig(stream_timeout_s=0.5))
    with pytest.raises(DataError, match=r"is a streaming shard source: only 'cellssl pretrain' reads it"):
        build_dataset(DataConfig(), f"file://{shard_dir}")
    with pytest.raises(ConfigError, match=r"use --workers 3 or fewer"):
        ShardStream(f"file://{shard_dir}", DataConfig()).plan(4, 0, rank=0, world=2, workers=4)


def test_http_source_served_on_localhost(shard_dir):
    handler = functools.partial(_QuietHandler, directory=str(shard_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.json"
        assert stream_batches(url) == stream_batches(f"file://{shard_dir}")
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass
