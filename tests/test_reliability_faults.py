"""Faults of a training run (issue 21 §1-§3, §4.11): no hang after the parent used OpenCV's threads,
a stall or a missing batch is one line with a stack dump, --resume with a new length continues,
SIGTERM/SIGINT checkpoint the current step and exit non-zero, stain-normalize cleans up on SIGTERM.

Every test that starts a process bounds it with a timeout and kills it (and its process group) in a
``finally``: a run of the suite leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cellssl.config import load_recipe
from cellssl.engine.checkpoint import load_checkpoint
from cellssl.engine.fit import fit
from cellssl.engine.optim import lr_at, warmup_steps_for
from cellssl.errors import TrainingError
from cellssl.methods.msbreg import MSBReg
from conftest import CHILD_ENV, REPO, SLOW_STEPS, make_image_folder, metrics_rows, run_cli, tiny_recipe_yaml


def _start(args: list[str], **kw) -> subprocess.Popen:
    """A child in its own process group (so that a test can signal it as a terminal does, and kill it all)."""
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=CHILD_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _kill_group(proc: subprocess.Popen) -> None:
    """End a child started by :func:`_start` and every process of its group (its loader workers)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=30)


def _wait_for_steps(proc: subprocess.Popen, run: Path, n: int, limit_s: float = 240) -> None:
    deadline = time.time() + limit_s
    while time.time() < deadline and proc.poll() is None and len(metrics_rows(run)) < n:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before step {n}: {proc.stderr.read()[-2000:]}"
    assert len(metrics_rows(run)) >= n, "no progress"


# ---- §1: no hang, and a stall is never silent ------------------------------------------------
HANG_SCRIPT = """
import sys, numpy as np, cv2
sys.path.insert(0, {tests!r})
from conftest import make_image_folder, tiny_recipe_yaml
from pathlib import Path
from cellssl.config import load_recipe
from cellssl.engine.fit import fit
tmp = Path({tmp!r})
folder = make_image_folder(tmp / "cells", n_per_class=8)
img = np.random.default_rng(0).random((512, 512, 3)).astype(np.float32)
for _ in range(5):  # the parent uses OpenCV's thread pool (a view preview, an augmentation)
    cv2.GaussianBlur(img, (9, 9), 2.0)
    cv2.resize(img, (700, 700))
r = load_recipe(str(tiny_recipe_yaml(tmp / "r.yaml", max_steps=3)),
                [f"data.path={{folder}}", f"train.out={{tmp / 'run'}}", "data.num_workers=2"])
print("steps", fit(r).step, flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_loader_workers_do_not_hang_after_the_parent_used_opencv_threads(tmp_path):
    """Before the fix each worker blocked for ever in ``cv2.setNumThreads(1)`` (engine/loader.py)."""
    script = HANG_SCRIPT.format(tests=str(REPO / "tests"), tmp=str(tmp_path))
    proc = _start(["-c", script])
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("fit with 2 loader workers hung after the parent used OpenCV's threads")
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err[-2000:]
    assert "steps 3" in out


@pytest.mark.timeout(120)
def test_a_stalled_stage_stops_with_its_name_and_a_stack_dump(tmp_path, tiny_folder, monkeypatch):
    original, calls = MSBReg.forward, {"n": 0}

    def stuck(self, views):
        calls["n"] += 1
        if calls["n"] == 3:
            time.sleep(60)  # a forward pass that never ends
        return original(self, views)

    monkeypatch.setattr(MSBReg, "forward", stuck)
    out = tmp_path / "run"
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=6, checkpoint_every=2)),
                    [f"data.path={tiny_folder}", f"train.out={out}", "train.stall_timeout_s=3"])
    t0 = time.monotonic()
    with pytest.raises(TrainingError) as err:
        fit(r)
    msg = str(err.value)
    assert time.monotonic() - t0 < 40
    assert "\n" not in msg and "stage 'forward' of step 3" in msg and "train.stall_timeout_s=3" in msg
    dump = out / "stall-step3.txt"
    assert f"stack dump of all threads: {dump}" in msg and "last good checkpoint" in msg and "(step 2)" in msg
    text = dump.read_text()
    assert "main process" in text and "in stuck" in text and "cellssl-stall-watchdog" not in msg


@pytest.mark.timeout(120)
def test_a_batch_that_never_comes_is_a_loader_timeout_naming_the_cause(tmp_path, tiny_folder, monkeypatch):
    from cellssl.engine.loader import EpochSeededViews

    original, calls = EpochSeededViews.__getitem__, {"n": 0}

    def slow(self, key):
        calls["n"] += 1  # counted in the worker (its own copy)
        if calls["n"] > 16:  # the third batch of 8: a worker stuck on a file
            time.sleep(60)
        return original(self, key)

    monkeypatch.setattr(EpochSeededViews, "__getitem__", slow)  # the forked worker inherits it
    out = tmp_path / "run"
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=6, checkpoint_every=100)),
                    [f"data.path={tiny_folder}", f"train.out={out}", "train.stall_timeout_s=2",
                     "data.num_workers=1"])
    with pytest.raises(TrainingError) as err:
        fit(r)
    msg = str(err.value)
    assert "\n" not in msg and "no batch from the 1 data-loader worker(s) for 2 s" in msg and "at step 3" in msg
    assert "likely cause: a thread-pool call" in msg and "data.num_workers=0" in msg
    text = (out / "stall-step3.txt").read_text()
    assert "data-loader workers" in text and "in slow" in text  # the worker's own stack


# ---- §2: --resume with a new length ----------------------------------------------------------
@pytest.fixture
def run6(tmp_path, tiny_folder, capsys):
    """A finished 6-step pretraining run (checkpoint_every 100: only the final checkpoint)."""
    recipe = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=6, checkpoint_every=100)
    out = tmp_path / "R"
    code, _, err = run_cli(capsys, "pretrain", "--recipe", str(recipe), "--data", str(tiny_folder), "--out", str(out),
                           "--max-steps", "6")
    assert code == 0, err
    return out


def test_resume_with_more_steps_continues_and_replans_the_schedule(run6, capsys):
    """Before: ``pretrained 6/6 steps``, exit 0, the 10 ignored. The run's own config.yaml is the
    recipe of a --resume (no --recipe, no --data given)."""
    with pytest.warns(UserWarning, match=r"planned for 6 steps and is at step 6; .* re-planned for 10 steps"):
        code, out, err = run_cli(capsys, "pretrain", "--out", str(run6), "--max-steps", "10", "--resume")
    assert code == 0, err
    assert "pretrained 10/10 steps" in out
    ckpt = load_checkpoint(run6 / "checkpoints" / "last.pt")
    assert ckpt["step"] == ckpt["total_steps"] == 10 and ckpt["config"]["train"]["max_steps"] == 10
    rows = metrics_rows(run6)
    assert [r["step"] for r in rows] == list(range(1, 11))
    r = load_recipe(str(run6 / "config.yaml"))
    for row in rows[6:]:  # the rest of the schedule: the LR of a 10-step run
        assert row["lr"] == pytest.approx(lr_at(row["step"] - 1, 10, 0.001, warmup_steps_for(r.optim, 10),
                                                r.optim.min_lr_ratio))


def test_resume_with_fewer_steps_or_only_a_time_budget_is_one_line(run6, capsys):
    code, _, err = run_cli(capsys, "pretrain", "--out", str(run6), "--max-steps", "4", "--resume")
    assert code == 2 and err.count("\n") == 1
    assert "already at step 6" in err and "plans 4 steps" in err and "--max-steps (or --epochs) above 6" in err
    code, _, err = run_cli(capsys, "pretrain", "--out", str(run6), "--max-minutes", "5", "--resume")
    assert code == 2 and err.count("\n") == 1
    assert "already at step 6" in err and "--max-steps 12) with --max-minutes 5" in err
    with pytest.warns(UserWarning, match="already complete"):
        code, out, _ = run_cli(capsys, "pretrain", "--out", str(run6), "--resume")
    assert code == 0 and "pretrained 6/6" in out


def test_resume_with_more_steps_and_a_time_budget_continues(run6, capsys):
    with pytest.warns(UserWarning, match=r"re-planned for the steps that fit in --max-minutes 5 \(at most 9\)"):
        code, out, err = run_cli(capsys, "pretrain", "--out", str(run6), "--max-steps", "9", "--max-minutes", "5",
                                 "--set", "train.budget_probe_steps=1", "--resume")
    assert code == 0, err
    assert "pretrained 9/9 steps" in out and load_checkpoint(run6 / "checkpoints" / "last.pt")["step"] == 9


def test_adapt_resume_with_more_steps_continues(tmp_path, tiny_folder, trained_checkpoint, capsys):
    from cellssl.adapt.continued import adapt

    src = trained_checkpoint
    out = tmp_path / "adapted"
    assert load_checkpoint(adapt(src, tiny_folder, out, max_steps=3, device="cpu"))["step"] == 3
    with pytest.warns(UserWarning, match="re-planned for 5 steps"):
        code, _, err = run_cli(capsys, "adapt", "--checkpoint", str(src), "--data", str(tiny_folder), "--out", str(out),
                               "--max-steps", "5", "--resume")
    assert code == 0, err
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] == 5 and ckpt["adapted"] == "continued"
    code, _, err = run_cli(capsys, "adapt", "--checkpoint", str(src), "--data", str(tiny_folder), "--out", str(out),
                           "--max-minutes", "5", "--resume")
    assert code == 2 and "already at step 5" in err and "--max-minutes 5" in err


# ---- §3 and §4.11: signals -------------------------------------------------------------------
def test_a_stop_signal_is_acknowledged_at_once_and_only_sets_the_request(capfd):
    """Before: nothing was said until the step in progress ended (minutes for a first, compiling
    step on a slow CPU), so a run that had been asked to stop looked hung."""
    from cellssl.engine.watchdog import deferred_stop_signals

    with deferred_stop_signals() as request:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in the main thread between bytecodes
        said = capfd.readouterr().err
        assert request.signal == "SIGTERM" and request.reason == "terminated"
    assert "SIGTERM received: stopping at the end of this step and writing a checkpoint" in said
    assert "send it again to stop now" in said


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_checkpoints_the_current_step_and_resume_is_exact(tmp_path, tiny_folder, capsys):
    """SIGTERM to the whole process group (as a scheduler sends it; the loader worker gets it too)
    at step >= 3 of 24 with checkpoint_every 100: before, the process ended at once, no checkpoint."""
    recipe = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=24, checkpoint_every=100)
    common = ["pretrain", "--recipe", str(recipe), "--data", str(tiny_folder), "--workers", "1"]
    out = tmp_path / "stopped"
    proc = _start(["-c", SLOW_STEPS, *common, "--out", str(out)])
    try:
        _wait_for_steps(proc, out, 3)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 143, err[-2000:]
    step = load_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert 3 <= step < 24 and [r["step"] for r in metrics_rows(out)][-1] == step  # no step lost
    assert f"terminated (SIGTERM) at step {step} of 24: checkpoint {out / 'checkpoints' / 'last.pt'}" in err
    assert "continue with --resume" in err and "Traceback" not in err
    assert err.index("SIGTERM received: stopping at the end of this step") < err.index("terminated (SIGTERM)")
    code, _, err = run_cli(capsys, *common, "--out", str(out), "--resume")
    assert code == 0, err
    code, _, err = run_cli(capsys, *common, "--out", str(tmp_path / "ref"))
    assert code == 0, err
    a, b = (load_checkpoint(p / "checkpoints" / "last.pt") for p in (tmp_path / "ref", out))
    assert a["step"] == b["step"] == 24
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after SIGTERM and --resume"
    assert [r["step"] for r in metrics_rows(out)] == list(range(1, 25))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_during_pretrain_exits_130_with_a_checkpoint(tmp_path, tiny_folder):
    """Ctrl-C (SIGINT to the process group, loader worker included): before, exit 0 ("stopped early")."""
    recipe = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=200, checkpoint_every=100)
    out = tmp_path / "run"
    proc = _start(["-m", "cellssl", "pretrain", "--recipe", str(recipe), "--data", str(tiny_folder), "--out",
                   str(out), "--workers", "1"])
    try:
        _wait_for_steps(proc, out, 2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 130, err[-2000:]
    step = load_checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert step >= 2 and f"interrupted (SIGINT) at step {step} of 200" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_during_adapt_checkpoints_and_exits_143(tmp_path, tiny_folder, trained_checkpoint):
    src = trained_checkpoint
    out = tmp_path / "adapted"
    proc = _start(["-m", "cellssl", "adapt", "--checkpoint", str(src), "--data", str(tiny_folder), "--out", str(out),
                   "--max-steps", "200", "--device", "cpu"])
    try:
        _wait_for_steps(proc, out, 2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 143, err[-2000:]
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["step"] >= 2 and ckpt["adapted"] == "continued"
    assert f"terminated (SIGTERM) at step {ckpt['step']} of 200" in err and "adapted checkpoint" not in err


STAIN_SCRIPT = """
import sys, time
import cellssl.data.stain as stain
from cellssl.cli import main
original = stain._save_like
def slow(*args):  # a large folder: the run is still writing when SIGTERM comes
    original(*args)
    time.sleep(0.2)
stain._save_like = slow
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_sigterm_during_stain_normalize_leaves_no_partial_folder(tmp_path):
    """Before: SIGTERM ended the process at once and ``.OUT.partial-*`` stayed behind."""
    src = make_image_folder(tmp_path / "src", n_per_class=10, size=32, classes=("a", "b"))
    out = tmp_path / "normalised"
    proc = _start(["-c", textwrap.dedent(STAIN_SCRIPT), "stain-normalize", str(src), str(out),
                   "--reference", str(src / "a" / "a_000.png"), "--method", "reinhard"])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not any(tmp_path.glob(".normalised.partial-*/*/*")):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_group(proc)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".normalised.partial-*"))
