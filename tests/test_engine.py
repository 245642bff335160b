"""Training engine: loss falls, resume after kill -9 is exact, checkpoints are atomic, DDP on gloo."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cellssl.config import load_recipe
from cellssl.engine.checkpoint import load_checkpoint, save_atomic
from cellssl.engine.fit import fit
from cellssl.errors import DiskFullError
from conftest import CHILD_ENV, REPO, SLOW_STEPS, metrics_rows, run_cli, tiny_recipe_yaml


def test_fit_lowers_centroid_loss_and_logs_every_key(tmp_path, tiny_folder):
    recipe = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=30, batch_size=16)),
                         [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}", "optim.lr=0.003"])
    result = fit(recipe)
    rows = metrics_rows(tmp_path / "run")
    keys = {"step", "epoch", "loss", "loss_centroid", "loss_sv", "loss_brownian", "lr", "momentum",
            "step_time_s", "data_time_s", "img_per_s"}
    assert keys <= set(rows[0])
    assert any("eff_rank" in r for r in rows)
    first = sum(r["loss_centroid"] for r in rows[:5]) / 5
    last = sum(r["loss_centroid"] for r in rows[-5:]) / 5
    assert last < first
    assert result.step == 30 and (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert (tmp_path / "run" / "config.yaml").exists()
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt["step"] == 30 and ckpt["method"] == "msbreg"


@pytest.mark.slow
def test_kill_9_then_resume_is_bitwise_identical(tmp_path, tiny_folder, capsys):
    """The killed run is a real process (each step slowed by 0.1 s, so that the kill lands mid-run);
    the reference run and the resume run in this one (the same ``cellssl pretrain`` entry point,
    without paying an interpreter start each)."""
    recipe = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=16, checkpoint_every=2)
    common = ["pretrain", "--recipe", str(recipe), "--data", str(tiny_folder), "--workers", "1"]
    # The interrupted run: kill -9 once a mid-run checkpoint exists.
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *common, "--out", str(out)], cwd=REPO, env=CHILD_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                if 4 <= load_checkpoint(ckpt)["step"] < 14:
                    break
            except Exception:
                pass
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt)["step"]
    assert killed_at < 16
    code, _, err = run_cli(capsys, *common, "--out", str(out), "--resume")
    assert code == 0, err
    code, _, err = run_cli(capsys, *common, "--out", str(tmp_path / "ref"))
    assert code == 0, err
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    b = load_checkpoint(ckpt)
    assert a["step"] == b["step"] == 16
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after resume"
    rows, ref_rows = metrics_rows(out), metrics_rows(tmp_path / "ref")
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # no repeated step
    assert steps == [r["step"] for r in ref_rows]  # no skipped step either
    assert [r["loss"] for r in ref_rows] == [r["loss"] for r in rows]


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"format": "cellssl-1", "step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(DiskFullError, match="the previous last.pt \\(step 1\\) is kept"):  # one line, exit 2
        save_atomic({"format": "cellssl-1", "step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_same_seed_same_first_losses(tmp_path, tiny_folder):
    losses = []
    for run in ("a", "b"):
        r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=3)),
                        [f"data.path={tiny_folder}", f"train.out={tmp_path / run}"])
        fit(r)
        losses.append([row["loss"] for row in metrics_rows(tmp_path / run)])
    assert losses[0] == losses[1]


DDP_WORKER = """
import os, shutil, sys, torch
import cellssl.engine.fit as fit_mod
from cellssl.config import load_recipe
from cellssl.engine.fit import fit
from cellssl.methods.base import SSLMethod

rank, out = os.environ["RANK"], sys.argv[3]
save, after_step = fit_mod.Training.save, SSLMethod.after_step

def buffers(m):
    return {k: v.detach().cpu().clone() for k, v in m.named_buffers()}

def save_and_record(self):  # each rank's BatchNorm statistics right after a checkpoint
    save(self)
    torch.save(buffers(self.method), f"{out}/buffers_rank{rank}_step{self.step}.pt")
    if rank == "0":
        shutil.copy(self.ckpt_path, f"{out}/checkpoint_step{self.step}.pt")

def after_step_and_record(self, step, total):  # and between checkpoints
    after_step(self, step, total)
    if step == 3:
        torch.save(buffers(self), f"{out}/buffers_rank{rank}_step3.pt")

fit_mod.Training.save = save_and_record
SSLMethod.after_step = after_step_and_record
r = load_recipe(sys.argv[1], ["data.path=" + sys.argv[2], "train.out=" + sys.argv[3]])
res = fit(r)
torch.save({k: v.cpu() for k, v in res.method.state_dict().items()}, sys.argv[3] + f"/rank{os.environ['RANK']}.pt")
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_two_gloo_processes_end_identical(tmp_path, tiny_folder):
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    recipe = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=4, batch_size=4, checkpoint_every=2)
    out = tmp_path / "ddp"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    res = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(worker), str(recipe),
                          str(tiny_folder), str(out)], cwd=REPO, env=CHILD_ENV, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4
    # BatchNorm statistics (broadcast_buffers=False) drift between ranks during training; at every
    # checkpoint all ranks take rank 0's, which is what the checkpoint holds
    mid = [torch.load(out / f"buffers_rank{r}_step3.pt") for r in (0, 1)]
    at_ckpt = [torch.load(out / f"buffers_rank{r}_step2.pt") for r in (0, 1)]
    running = [k for k in mid[0] if k.endswith("running_mean")]
    assert running and any(not torch.equal(mid[0][k], mid[1][k]) for k in running)
    saved = load_checkpoint(out / "checkpoint_step2.pt")["model"]
    for k in at_ckpt[0]:
        assert torch.equal(at_ckpt[0][k], at_ckpt[1][k]), f"{k} differs between ranks at the checkpoint"
        assert torch.equal(saved[k], at_ckpt[0][k]), f"{k}: the checkpoint is not rank 0's"


def test_max_minutes_and_ctrl_c_stop_cleanly_with_checkpoint(tmp_path, tiny_folder, monkeypatch):
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=50)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'a'}", "train.max_minutes=0.00001"])
    res = fit(r)
    assert res.stopped_early == "max_minutes" and res.step == 1
    assert load_checkpoint(res.checkpoint)["step"] == 1

    from cellssl.methods.msbreg import MSBReg

    original, calls = MSBReg.forward, {"n": 0}

    def interrupted(self, views):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, views)

    monkeypatch.setattr(MSBReg, "forward", interrupted)
    r.train.out, r.train.max_minutes = str(tmp_path / "b"), None
    res = fit(r)
    assert res.stopped_early == "interrupted" and res.step == 2
    assert load_checkpoint(res.checkpoint)["step"] == 2


class _FakeClock:
    """Replaces ``time`` inside cellssl.engine.fit: monotonic() advances 1 s per call."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        self.now += 1.0
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def test_max_minutes_sizes_the_schedule_so_lr_anneals(tmp_path, tiny_folder, monkeypatch):
    """A wall-clock budget fixes total_steps from the measured step time: the run ends on its own
    with the LR at its final value (not cut mid-schedule), and the checkpoint keeps the schedule."""
    import cellssl.engine.fit as fit_mod

    monkeypatch.setattr(fit_mod, "time", _FakeClock())
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=None, epochs=1000, log_every=1)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'a'}", "train.max_minutes=0.5",
                     "train.budget_probe_steps=3", "optim.min_lr_ratio=0.01"])
    planned = 1000 * (48 // 8)
    res = fit(r)
    assert res.stopped_early is None
    assert 5 < res.total_steps < planned and res.step == res.total_steps
    rows = metrics_rows(tmp_path / "a")
    assert rows[-1]["step"] == res.total_steps
    # the LR of the last step is the end of the cosine schedule over total_steps, near min_lr
    from cellssl.engine.optim import lr_at, warmup_steps_for

    t = res.total_steps
    assert rows[-1]["lr"] == pytest.approx(lr_at(t - 1, t, 0.001, warmup_steps_for(r.optim, t), 0.01))
    assert rows[-1]["lr"] < 0.05 * 0.001 and rows[len(rows) // 2]["lr"] > 0.3 * 0.001
    ckpt = load_checkpoint(res.checkpoint)
    assert ckpt["total_steps"] == res.total_steps and ckpt["schedule_fixed"] is True


class _StepClock:
    """Replaces ``time`` inside cellssl.engine.fit: the clock moves only when a step's forward runs,
    by 2 s for the first ``slow`` steps and 1 s after (a step right after compiling is slower)."""

    def __init__(self, slow: int):
        self.now, self.steps, self.slow = 0.0, 0, slow

    def tick(self):
        self.steps += 1
        self.now += 2.0 if self.steps <= self.slow else 1.0

    def monotonic(self):
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.mark.parametrize("replans", [0, 2])
def test_budget_replans_use_the_minutes_when_the_first_steps_are_slow(tmp_path, tiny_folder, monkeypatch, replans):
    """Sized once from slow first steps, a 60 s budget ends after two thirds of it; re-sized twice,
    each from the rate since the last sizing, it ends in the last tenth, never past it, LR annealed."""
    import cellssl.engine.fit as fit_mod
    from cellssl.engine.optim import lr_at, warmup_steps_for
    from cellssl.methods.msbreg import MSBReg

    clock, original = _StepClock(slow=11), MSBReg.forward

    def timed(self, *args, **kwargs):
        clock.tick()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fit_mod, "time", clock)
    monkeypatch.setattr(MSBReg, "forward", timed)
    assert fit_mod.replan_points(4, 29, 2) == [12, 20] and fit_mod.replan_points(4, 5, 3) == []
    assert fit_mod.replan_points(0, 3, 5) == [1, 2]  # no step twice
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=None, epochs=1000, log_every=1)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'a'}", "train.max_minutes=1",
                     "train.budget_probe_steps=3", f"train.budget_replans={replans}", "optim.min_lr_ratio=0.01"])
    res = fit(r)
    assert res.stopped_early is None and res.step == res.total_steps
    used = clock.now / 60
    assert (used < 0.7) if replans == 0 else (0.9 <= used <= 1.0)
    t = res.total_steps
    assert metrics_rows(tmp_path / "a")[-1]["lr"] == pytest.approx(
        lr_at(t - 1, t, 0.001, warmup_steps_for(r.optim, t), 0.01))


def test_resume_keeps_the_budgeted_schedule(tmp_path, tiny_folder, monkeypatch):
    import cellssl.engine.fit as fit_mod

    monkeypatch.setattr(fit_mod, "time", _FakeClock())
    out = tmp_path / "a"
    args = [f"data.path={tiny_folder}", f"train.out={out}", "train.max_minutes=0.5", "train.budget_probe_steps=3"]
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=None, epochs=1000, checkpoint_every=4)),
                    args)
    first = fit(r)
    ckpt = load_checkpoint(first.checkpoint)
    ckpt["step"] = 8  # as if killed after the checkpoint at step 8
    save_atomic(ckpt, first.checkpoint)
    monkeypatch.setattr(fit_mod, "time", _FakeClock())
    again = fit(load_recipe(str(tmp_path / "r.yaml"), args), resume=True)
    assert again.total_steps == first.total_steps and again.step == first.total_steps


def test_local_views_train_msbreg_and_are_refused_elsewhere(tmp_path, tiny_folder):
    from cellssl.errors import ConfigError

    base = [f"data.path={tiny_folder}", "views.local_views=2", "views.local_size=16", "data.image_size=24"]
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=4)), base + [f"train.out={tmp_path / 'm'}"])
    res = fit(r)
    assert res.step == 4 and torch.isfinite(torch.tensor(res.last_metrics["loss_centroid"]))
    with pytest.raises(ConfigError, match="local_views=2: method 'simclr' does not train on local crops"):
        fit(load_recipe(str(tmp_path / "r.yaml"), base + [f"train.out={tmp_path / 's'}", "method.name=simclr"]))


def test_knn_monitor_is_passed_in_logged_and_required(tmp_path, tiny_folder):
    """The online kNN monitor comes from the caller (eval builds it, the engine runs it)."""
    from cellssl.errors import ConfigError
    from cellssl.eval.knn import knn_monitor

    recipe = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=4)),
                         [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}", "eval.knn_every=2",
                          f"eval.knn_data={tiny_folder}"])
    with pytest.raises(ConfigError, match="knn_monitor"):
        fit(recipe)
    fit(recipe, knn_monitor=knn_monitor(recipe))
    rows = metrics_rows(tmp_path / "run")
    accs = {r["step"]: r["knn_acc"] for r in rows if "knn_acc" in r}
    assert set(accs) == {2, 4} and min(accs.values()) > 0.5  # three colour classes: chance is 1/3
