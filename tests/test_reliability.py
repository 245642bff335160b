"""Reliability: numerical trouble, collapse, bad configuration and bad checkpoints (docs/reliability.md)."""

from __future__ import annotations

import os

import pytest
import torch

from cellssl.config import load_recipe
from cellssl.data.datasets import DataWarning
from cellssl.engine.checkpoint import load_checkpoint
from cellssl.engine.fit import fit
from cellssl.errors import TrainingError
from cellssl.methods.msbreg import MSBReg
from conftest import TINY_BACKBONE, metrics_rows, one_error_line, run_cellssl, run_cli, tiny_recipe_yaml


def cli_error(capsys, *args: str) -> str:
    """The one ``error:`` line of ``cellssl ARGS`` run in-process (warnings may come before it)."""
    return one_error_line(*run_cli(capsys, *args)[::2], alone=False)


def _nan_after(monkeypatch, bad_steps: set[int], term: str = "loss_sv"):
    calls = {"n": 0}
    original = MSBReg.forward

    def forward(self, views):
        out = original(self, views)
        calls["n"] += 1
        if calls["n"] in bad_steps:
            out[term] = torch.tensor(float("nan"))
            out["loss"] = out["loss"] + out[term]
        return out

    monkeypatch.setattr(MSBReg, "forward", forward)


def test_nan_loss_step_is_skipped_and_run_continues(tmp_path, tiny_folder, monkeypatch):
    _nan_after(monkeypatch, {3})
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=5)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}"])
    with pytest.warns(UserWarning, match="non-finite loss"):
        res = fit(r)
    assert res.step == 5 and res.skipped_steps == 1
    rows = metrics_rows(tmp_path / "run")
    assert all(all(v == v for v in row.values() if isinstance(v, float)) for row in rows)  # no NaN logged
    for v in load_checkpoint(res.checkpoint)["model"].values():
        assert torch.isfinite(v.float()).all()


def test_repeated_nan_stops_with_step_and_term_and_keeps_checkpoint(tmp_path, tiny_folder, monkeypatch):
    _nan_after(monkeypatch, set(range(5, 100)), term="loss_brownian")
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=20, checkpoint_every=2, max_nonfinite=3)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}"])
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match=r"stopped at step 7.*loss_brownian"):
        fit(r)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4


def test_collapse_warns_and_can_stop(tmp_path, tiny_folder):
    # Thresholds above anything reachable: the monitor must flag collapse.
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=6, collapse_rank_fraction=2.0)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'a'}"])
    with pytest.warns(UserWarning, match="collapsing"):
        fit(r)
    rows = metrics_rows(tmp_path / "a")
    assert any(row.get("collapse_warning") for row in rows)
    r.train.out, r.train.stop_on_collapse = str(tmp_path / "b"), True
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match="collapsing"):
        fit(r)


def test_unknown_recipe_lists_available(capsys):
    msg = cli_error(capsys, "pretrain", "--recipe", "blod_smear")
    assert "did you mean 'blood_smear'" in msg and "cpu_demo" in msg


def test_unknown_key_names_nearest(capsys):
    msg = cli_error(capsys, "pretrain", "--set", "train.batchsize=4")
    assert "train.batchsize" in msg and "train.batch_size" in msg


def test_wrong_type_isone_error_line(capsys):
    assert "expected an integer" in cli_error(capsys, "pretrain", "--set", "train.batch_size=many")


def test_batch_larger_than_dataset(tmp_path, tiny_folder, capsys):
    msg = cli_error(capsys, "pretrain", "--recipe", str(tiny_recipe_yaml(tmp_path / "r.yaml")), "--data",
                    str(tiny_folder), "--batch-size", "500", "--out", str(tmp_path / "o"))
    assert "larger than the dataset" in msg and "--batch-size" in msg


def test_image_size_too_small_for_backbone(tmp_path, tiny_folder, capsys):
    msg = cli_error(capsys, "pretrain", "--recipe", str(tiny_recipe_yaml(tmp_path / "r.yaml")), "--data",
                    str(tiny_folder), "--backbone", "vit_tiny_patch16_224", "--image-size", "8",
                    "--out", str(tmp_path / "o"))
    assert "too small" in msg or "does not fit" in msg


def test_output_not_writable(tmp_path, tiny_folder, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    msg = cli_error(capsys, "pretrain", "--recipe", str(tiny_recipe_yaml(tmp_path / "r.yaml")), "--data",
                    str(tiny_folder), "--out", str(blocker / "run"))
    assert "not writable" in msg


def test_resume_without_checkpoint(tmp_path, tiny_folder, capsys):
    msg = cli_error(capsys, "pretrain", "--recipe", str(tiny_recipe_yaml(tmp_path / "r.yaml")), "--data",
                    str(tiny_folder), "--out", str(tmp_path / "o"), "--resume")
    assert "no checkpoint" in msg


def test_checkpoint_from_other_backbone_says_so(tmp_path, trained_checkpoint):
    ckpt = load_checkpoint(trained_checkpoint)
    ckpt["config"]["model"]["backbone"] = "resnet34"
    torch.save(ckpt, tmp_path / "other.pt")
    from cellssl.engine.checkpoint import load_backbone
    from cellssl.errors import CheckpointError

    with pytest.raises(CheckpointError, match="does not match this backbone \\(resnet34\\)"):
        load_backbone(tmp_path / "other.pt")


def test_pickled_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "cellssl-1", "x": Evil()}, tmp_path / "evil.pt")
    from cellssl.errors import CheckpointError

    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(tmp_path / "evil.pt")


def test_debug_flag_shows_traceback(capsys):
    code, _, err = run_cli(capsys, "--debug", "pretrain", "--recipe", "blod_smear")
    assert code == 2 and "Traceback" in err


def _messy_folder(root):
    """A labelled folder with every kind of bad file next to good ones."""
    import numpy as np
    from PIL import Image

    from conftest import make_image_folder

    make_image_folder(root, n_per_class=10, size=24)
    bad = root / "red"
    good = next(bad.glob("*.png"))
    data = good.read_bytes()
    jpg = bad / "truncated.jpg"
    Image.open(good).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    (bad / "notes.png").write_text("this is text, not an image")
    (bad / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(bad / "one_pixel.png")
    Image.fromarray((np.random.default_rng(0).random((24, 24)) * 255).astype(np.uint8)).save(bad / "gray.png")
    Image.fromarray((np.random.default_rng(1).random((24, 24)) * 65535).astype(np.uint16)).save(bad / "sixteen.png")
    assert data  # the good file is untouched
    return root


def test_messy_folder_trains_and_names_bad_files(tmp_path, capsys):
    folder = _messy_folder(tmp_path / "messy")
    with pytest.warns(DataWarning) as record:
        code, _, err = run_cli(capsys, "pretrain", "--recipe",
                               str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=6, batch_size=12)),
                               "--data", str(folder), "--out", str(tmp_path / "run"))
    assert code == 0, err[-2000:]
    warned = " ".join(str(w.message) for w in record)  # a real process prints them on stderr
    for name in ("truncated.jpg", "notes.png", "empty.png", "one_pixel.png"):
        assert name in warned, f"{name} not named in the warnings"
    assert "Traceback" not in err
    code, out, _ = run_cli(capsys, "datasets", "check", str(folder))
    assert code != 0
    for name in ("truncated.jpg", "notes.png", "empty.png", "one_pixel.png"):
        assert name in out
    assert "gray.png" not in out.split("unreadable", 1)[-1]


def test_fewshot_class_too_small_isone_error_line(tmp_path, capsys):
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "cells", n_per_class=12, size=24)
    for f in sorted((folder / "blue").glob("*.png"))[1:]:
        f.unlink()
    msg = cli_error(capsys, "fewshot", "--checkpoint", f"random:{TINY_BACKBONE}", "--data", str(folder), "--shots",
                    "5", "--episodes", "5", "--image-size", "24", "--out", str(tmp_path / "fs.json"))
    assert "blue" in msg


def test_disk_full_isone_error_line(tmp_path, monkeypatch, capsys):
    import cellssl.engine.fit as fit_module
    from cellssl.cli import main

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "checkpoints" / "last.pt"))

    monkeypatch.setattr(fit_module, "fit", full)
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--recipe", "cpu_demo", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0] and "last.pt" in err[0]


# ---- round two (issue 14): work is never lost ----------------------------------------------




def test_rerun_into_a_run_folder_is_refused_resume_and_overwrite_still_work(tmp_path, tiny_folder, capsys):
    recipe = str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=4, checkpoint_every=2))
    run = tmp_path / "run"
    args = ["pretrain", "--recipe", recipe, "--data", str(tiny_folder), "--out", str(run)]
    assert run_cli(capsys, *args)[0] == 0
    last, metrics = run / "checkpoints" / "last.pt", run / "metrics.jsonl"
    before = (last.read_bytes(), metrics.read_text())
    msg = one_error_line(*run_cli(capsys, *args)[::2])
    assert "already holds a run" in msg and "step 4" in msg and "--resume" in msg and "--overwrite" in msg
    assert (last.read_bytes(), metrics.read_text()) == before  # nothing touched
    code, out, _ = run_cli(capsys, *args, "--resume")
    assert code == 0 and "4/4 steps" in out
    code, out, _ = run_cli(capsys, *args, "--overwrite", "--max-steps", "3")
    assert code == 0 and "3/3 steps" in out
    assert load_checkpoint(last)["step"] == 3 and len(metrics.read_text().splitlines()) == 3


# ---- nothing non-finite is saved or trusted ------------------------------------------------
def test_non_finite_recipe_numbers_are_rejected_up_front(capsys):
    from cellssl.errors import ConfigError

    for value in ("inf", "-inf", "nan", ".nan", "1e400"):
        for key in ("optim.lr", "method.sv_weight"):
            with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
                load_recipe("cpu_demo", [f"{key}={value}"])
    msg = cli_error(capsys, "pretrain", "--recipe", "cpu_demo", "--set", "optim.lr=inf")
    assert msg == "error: optim.lr must be a finite number, got 'inf'"


@pytest.mark.parametrize("broken_at,fragment", [
    (6, "step 6: 1 weight tensor(s) of the model are non-finite (e.g. backbone.conv1.0.weight), so no checkpoint "
        "is written"),  # caught when saving
    (5, "stopped at step 6: the model weights became non-finite in the update of step 5"),  # caught in the forward
])
def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path, tiny_folder, monkeypatch, broken_at,
                                                                fragment):
    """Weights that go non-finite in an update (a far too high lr) stop the run, at the next
    checkpoint or forward pass: nothing non-finite is written, the last good checkpoint (step 4) is kept."""
    original = MSBReg.after_step

    def poison(self, step, total):
        original(self, step, total)
        if step == broken_at:
            with torch.no_grad():
                next(self.backbone.parameters()).fill_(float("inf"))

    monkeypatch.setattr(MSBReg, "after_step", poison)
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=10, checkpoint_every=2)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}"])
    with pytest.raises(TrainingError) as exc:
        fit(r)
    msg = str(exc.value)
    assert fragment in msg
    assert "last good checkpoint" in msg and "(step 4)" in msg and "likely cause: optim.lr=0.001 too high" in msg
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4


def test_a_checkpoint_with_non_finite_weights_is_refused_by_every_command(tmp_path, tiny_folder, trained_checkpoint,
                                                                              capsys):
    from cellssl.engine.checkpoint import save_atomic
    from cellssl.errors import CheckpointError

    ckpt = load_checkpoint(trained_checkpoint)
    key = "backbone.conv1.0.weight"  # test_resnet: a 3-conv stem
    ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("nan"))
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)  # as an older cellssl or another tool could have written it
    with pytest.raises(CheckpointError, match=f"non-finite weights .*{key}"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="refusing to write"):
        save_atomic(ckpt, tmp_path / "again.pt")
    assert not (tmp_path / "again.pt").exists()
    for args in (["fewshot", "--checkpoint", str(bad), "--data", str(tiny_folder), "--out", str(tmp_path / "f.json")],
                 ["embed", "--checkpoint", str(bad), "--data", str(tiny_folder), "--out", str(tmp_path / "e.npz")],
                 ["adapt", "--checkpoint", str(bad), "--data", str(tiny_folder), "--out", str(tmp_path / "a")]):
        msg = one_error_line(*run_cli(capsys, *args)[::2])
        assert str(bad) in msg and "non-finite weights" in msg


def test_all_steps_non_finite_is_not_a_success_and_says_there_is_no_checkpoint(tmp_path, tiny_folder, monkeypatch,
                                                                               capsys):
    _nan_after(monkeypatch, set(range(1, 100)))
    recipe = str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=2))
    with pytest.warns(UserWarning, match="non-finite loss"):
        code, _, err = run_cli(capsys, "pretrain", "--recipe", recipe, "--data", str(tiny_folder), "--out",
                               str(tmp_path / "run"))
    msg = one_error_line(code, err)
    assert "no update was made" in msg and "all 2 steps" in msg and "no checkpoint was written" in msg
    assert "loss_sv" in msg and "method.sv_weight=0.1" in msg and "method.sv_eps=" in msg
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_non_finite_streak_names_the_real_state_and_the_cause(tmp_path, tiny_folder, monkeypatch):
    _nan_after(monkeypatch, set(range(1, 100)))
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=8, checkpoint_every=100)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}"])
    with pytest.warns(UserWarning), pytest.raises(TrainingError) as exc:
        fit(r)
    msg = str(exc.value)
    assert msg.startswith("stopped at step 5: 5 non-finite losses in a row in loss_sv")
    assert "no checkpoint was written" in msg and "last good checkpoint" not in msg
    assert "likely cause: method.sv_weight=0.1, method.sv_eps=0.0001" in msg
    assert "optim.lr" not in msg  # the weights are finite and one term is at fault: not the learning rate
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


# ---- every value checked ---------------------------------------------------------------------
@pytest.mark.parametrize("args,fragment", [
    (["pretrain", "--max-steps", "0"], "--max-steps (train.max_steps) must be at least 1, got 0"),
    (["pretrain", "--checkpoint-every", "0"], "--checkpoint-every (train.checkpoint_every) must be at least 1, got 0"),
    (["pretrain", "--set", "optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
    (["pretrain", "--seed", "-5"], "--seed (train.seed) must be in [0, 4294967295], got -5"),
    (["pretrain", "--workers", "-1"], "--workers (data.num_workers) must be at least 0, got -1"),
    (["pretrain", "--max-steps", "abc"], "--max-steps (train.max_steps): expected an integer, got 'abc'"),
    (["embed", "--batch-size", "0"], "--batch-size (eval.batch_size) must be at least 1, got 0"),
    (["fewshot", "--ways", "abc"], "--ways (eval.ways) must be 'all' or a whole number at least 2, got 'abc'"),
    (["fewshot", "--shots", "0"], "--shots (eval.shots) must be at least 1, got 0"),
    (["views", "--n", "0"], "--n must be at least 1, got 0"),
    (["views", "--out", "v.txt"], "--out v.txt: the view grid is an image"),
    (["datasets", "tile", "x.tif", "--size", "0"], "--size must be at least 8, got 0"),
    (["datasets", "tile", "x.tif", "--size", "-5"], "--size must be at least 8, got -5"),
    (["knn", "--temperature", "0"], "--temperature (eval.knn_temperature) must be > 0, got 0.0"),
    (["knn", "--k", "0"], "--k (eval.knn_k) must be at least 1, got 0"),
    (["finetune", "--labels-per-class", "0"], "--labels-per-class must be at least 1, got 0"),
    (["linear", "--split", "1"], "--split must be in (0, 1), got 1.0"),
])
def test_every_bad_value_is_one_line_naming_value_and_range(args, fragment, capsys):
    msg = one_error_line(*run_cli(capsys, *args)[::2])
    assert fragment in msg, msg


def test_every_checked_option_rejects_a_value_outside_its_range(capsys):
    """Each CLI option typed with a recipe range refuses a value just outside it (exit 2, one line)."""
    import click

    from cellssl.cli import RecipeValue
    from cellssl.cli import cli as group
    from cellssl.config import value_range

    def commands(grp, prefix=()):
        for name, cmd in grp.commands.items():
            if isinstance(cmd, click.Group):
                yield from commands(cmd, prefix + (name,))
            else:
                yield prefix + (name,), cmd

    checked = 0
    for path, cmd in commands(group):
        for p in cmd.params:
            if not isinstance(p.type, RecipeValue):
                continue
            rng = value_range(p.type.key)
            bad = (rng.lo if rng.lo_open else rng.lo - 1) if rng.lo is not None else rng.hi + 1
            msg = one_error_line(*run_cli(capsys, *path, p.opts[0], str(bad))[::2])
            assert p.opts[0] in msg and rng.describe() in msg, (path, msg)
            checked += 1
    assert checked >= 30


@pytest.mark.slow
def test_subprocess_bad_value_is_one_line_without_traceback():
    """The one test of a user error in a real ``python -m cellssl`` process (the rest run in-process)."""
    res = run_cellssl("knn", "--k", "0")
    msg = one_error_line(res.returncode, res.stderr)
    assert msg == "error: --k (eval.knn_k) must be at least 1, got 0"


# ---- messages that said the wrong thing -----------------------------------------------------
def test_datasets_check_empty_folder_views_suffix_and_folders_given_as_files(tmp_path, tiny_folder, capsys):
    (tmp_path / "empty").mkdir()
    msg = one_error_line(*run_cli(capsys, "datasets", "check", str(tmp_path / "empty"))[::2])
    assert "no images found in" in msg

    recipe = str(tiny_recipe_yaml(tmp_path / "r.yaml"))
    code, out, _ = run_cli(capsys, "views", "--recipe", recipe, "--data", str(tiny_folder), "--n", "2",
                           "--out", str(tmp_path / "o" / "v"))
    assert code == 0 and out.strip() == f"views written to {tmp_path / 'o' / 'v.png'}"
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["v.png"]

    msg = one_error_line(*run_cli(capsys, "pretrain", "--recipe", str(tiny_folder))[::2])
    assert "is a folder" in msg and "does not exist" not in msg
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({}, run / "checkpoints" / "last.pt")
    msg = one_error_line(*run_cli(capsys, "embed", "--checkpoint", str(run), "--data", str(tiny_folder),
                                  "--out", str(tmp_path / "e.npz"))[::2])
    assert "is a folder" in msg and str(run / "checkpoints" / "last.pt") in msg


def test_datasets_check_lists_images_as_training_does(tmp_path, capsys):
    """macOS copies leave ._x.png files (AppleDouble metadata, not images) and __MACOSX folders:
    training skips them, and so does `datasets check` (exit 0, same image count)."""
    from cellssl.config import DataConfig
    from cellssl.data.datasets import build_dataset
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "cells", n_per_class=4, size=16)
    (folder / "red" / "._red_000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "__MACOSX" / "red").mkdir(parents=True)
    (folder / "__MACOSX" / "red" / "._red_001.png").write_bytes(b"\x00\x05\x16\x07")
    (folder / ".thumbs").mkdir()
    (folder / ".thumbs" / "t.png").write_bytes(b"")
    code, out, _ = run_cli(capsys, "datasets", "check", str(folder))
    assert code == 0, out
    assert "12 image files, 12 readable" in out and "unreadable: 0" in out
    assert len(build_dataset(DataConfig(), folder)) == 12
