"""Reliability: numerical trouble, collapse, bad configuration and bad checkpoints (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cellssl.config import load_recipe
from cellssl.engine.checkpoint import load_checkpoint
from cellssl.engine.fit import fit
from cellssl.errors import TrainingError
from cellssl.methods.msbreg import MSBReg
from conftest import REPO, tiny_recipe_yaml

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellssl", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


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
    assert res.step == 5
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
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
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("collapse_warning") for row in rows)
    r.train.out, r.train.stop_on_collapse = str(tmp_path / "b"), True
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match="collapsing"):
        fit(r)


def test_unknown_recipe_lists_available():
    msg = one_line_error(cli("pretrain", "--recipe", "blod_smear"))
    assert "did you mean 'blood_smear'" in msg and "cpu_demo" in msg


def test_unknown_key_names_nearest():
    msg = one_line_error(cli("pretrain", "--set", "train.batchsize=4"))
    assert "train.batchsize" in msg and "train.batch_size" in msg


def test_wrong_type_is_one_line():
    assert "expected an integer" in one_line_error(cli("pretrain", "--set", "train.batch_size=many"))


def test_batch_larger_than_dataset(tmp_path, tiny_folder):
    msg = one_line_error(cli("pretrain", "--recipe", str(tiny_recipe_yaml(tmp_path / "r.yaml")), "--data",
                             str(tiny_folder), "--batch-size", "500", "--out", str(tmp_path / "o")))
    assert "larger than the dataset" in msg and "--batch-size" in msg


def test_image_size_too_small_for_backbone(tmp_path, tiny_folder):
    msg = one_line_error(cli("pretrain", "--recipe", str(tiny_recipe_yaml(tmp_path / "r.yaml")), "--data",
                             str(tiny_folder), "--backbone", "vit_tiny_patch16_224", "--image-size", "8",
                             "--out", str(tmp_path / "o")))
    assert "too small" in msg or "does not fit" in msg


def test_output_not_writable(tmp_path, tiny_folder):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    msg = one_line_error(cli("pretrain", "--recipe", str(tiny_recipe_yaml(tmp_path / "r.yaml")), "--data",
                             str(tiny_folder), "--out", str(blocker / "run")))
    assert "not writable" in msg


def test_resume_without_checkpoint(tmp_path, tiny_folder):
    msg = one_line_error(cli("pretrain", "--recipe", str(tiny_recipe_yaml(tmp_path / "r.yaml")), "--data",
                             str(tiny_folder), "--out", str(tmp_path / "o"), "--resume"))
    assert "no checkpoint" in msg


def test_checkpoint_from_other_backbone_says_so(tmp_path, tiny_folder):
    r = load_recipe(str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=1)),
                    [f"data.path={tiny_folder}", f"train.out={tmp_path / 'run'}"])
    fit(r)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
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


def test_debug_flag_shows_traceback():
    res = cli("--debug", "pretrain", "--recipe", "blod_smear")
    assert res.returncode == 2 and "Traceback" in res.stderr


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


def test_messy_folder_trains_and_names_bad_files(tmp_path):
    folder = _messy_folder(tmp_path / "messy")
    res = cli("pretrain", "--recipe", str(tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=6, batch_size=12)),
              "--data", str(folder), "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("truncated.jpg", "notes.png", "empty.png", "one_pixel.png"):
        assert name in res.stderr, f"{name} not named in the warnings"
    assert "Traceback" not in res.stderr
    check = cli("datasets", "check", str(folder))
    assert check.returncode != 0
    for name in ("truncated.jpg", "notes.png", "empty.png", "one_pixel.png"):
        assert name in check.stdout
    assert "gray.png" not in check.stdout.split("unreadable", 1)[-1]


def test_fewshot_class_too_small_is_one_line(tmp_path):
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "cells", n_per_class=12, size=24)
    for f in sorted((folder / "blue").glob("*.png"))[1:]:
        f.unlink()
    msg = one_line_error(cli("fewshot", "--checkpoint", "random:resnet18", "--data", str(folder), "--shots", "5",
                             "--episodes", "5", "--image-size", "24", "--out", str(tmp_path / "fs.json")))
    assert "blue" in msg


def test_disk_full_is_one_line(tmp_path, monkeypatch, capsys):
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
