"""Issue 21 §4 items 4-8 and 13: a full disk, outputs that are whole or absent, a finetune that did not
finish, user faults that were internal errors, files that are not starting weights."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from test_export import make_ckpt

from cellssl.apply.model import load_predictor
from cellssl.apply.predict import predict
from cellssl.config import ModelConfig
from cellssl.engine.checkpoint import FORMAT, load_checkpoint, save_atomic
from cellssl.errors import CheckpointError, ConfigError, DiskFullError
from cellssl.models import build_backbone
from conftest import CHILD_ENV, TINY_BACKBONE, make_image_folder, one_error_line, run_cli, tiny_recipe_yaml

TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 25932736 vs 25932632"






def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporary files or folders (``.x.partial-*``, ``.x.old-*``, ``.last.pt.*.tmp``) in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _small_free_space(monkeypatch, free: int = 3_000_000) -> None:
    """Make the disk look nearly full to the disk-full check (the write itself is faked separately)."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))




# ---- item 4: a full disk -------------------------------------------------------------------
def test_full_disk_while_writing_a_checkpoint_names_disk_space_and_keeps_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_atomic({"format": FORMAT, "step": 4, "model": {"w": torch.ones(3)}}, path)
    before = _sha(path)

    def torch_full(obj, f, *a, **k):  # what torch's zip writer raises on a full disk, after a partial write
        f.write(b"x" * 1000)
        raise RuntimeError(TORCH_FULL_DISK)

    monkeypatch.setattr(torch, "save", torch_full)
    _small_free_space(monkeypatch)
    with pytest.raises(DiskFullError) as exc:
        save_atomic({"format": FORMAT, "step": 6, "model": {"w": torch.ones(2_000_000)}}, path)
    msg = str(exc.value)
    assert "is full" in msg and "needs about 8.0 MB, 3.0 MB free" in msg and str(path) in msg
    assert "the previous last.pt (step 4) is kept" in msg and "choose another --out" in msg
    assert _sha(path) == before and _leftovers(path.parent) == []
    # the OS's own ENOSPC (a plain write) says the same, whatever the free space looks like afterwards
    monkeypatch.undo()

    def os_full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", os_full)
    with pytest.raises(DiskFullError, match="is full: writing .*last.pt needs about"):
        save_atomic({"format": FORMAT, "step": 6, "model": {"w": torch.ones(4)}}, path)
    # any other failure is not called a full disk
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"format": FORMAT, "step": 6, "model": {"w": torch.ones(4)}}, path)
    assert load_checkpoint(path)["step"] == 4


def test_full_disk_in_pretrain_is_one_line_exit_2(tmp_path, tiny_folder, monkeypatch, capsys):
    def torch_full(obj, f, *a, **k):
        raise RuntimeError(TORCH_FULL_DISK)

    monkeypatch.setattr(torch, "save", torch_full)
    _small_free_space(monkeypatch)
    recipe = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=2, checkpoint_every=2)
    run = tmp_path / "run"
    msg = one_error_line(*run_cli(capsys, "pretrain", "--recipe", str(recipe), "--data", str(tiny_folder), "--out",
                           str(run))[::2])
    assert "is full: writing" in msg and "last.pt needs about" in msg and "MB free" in msg
    assert "no earlier last.pt was there, nothing was written" in msg
    assert not (run / "checkpoints" / "last.pt").exists() and _leftovers(run / "checkpoints") == []


def test_full_disk_in_export_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    import cellssl.apply.export as export_module

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export_module, "save_file", full)
    ck = make_ckpt(tmp_path / "last.pt", image_size=16)
    msg = one_error_line(*run_cli(capsys, "export", "--checkpoint", str(ck), "--out", str(tmp_path / "m"))[::2])
    assert "is full: writing" in msg and "needs about 46." in msg and f"nothing was written to {tmp_path / 'm'}" in msg
    assert not (tmp_path / "m").exists() and _leftovers(tmp_path) == []


def _unshare_tmpfs_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
def test_full_disk_on_a_real_small_tmpfs(tmp_path):
    """The real thing: a 1 MB tmpfs (in a private mount namespace) that a checkpoint and an export overflow
    (the tiny backbone's export, ~3 MB, is enough to overflow it, and resnet18's ONNX export took seconds)."""
    if not _unshare_tmpfs_works():
        pytest.skip("cannot mount a tmpfs here (needs `unshare -rm` and user namespaces)")
    ck = make_ckpt(tmp_path / "last.pt", image_size=16, backbone=TINY_BACKBONE)
    disk = tmp_path / "disk"
    disk.mkdir()
    script = textwrap.dedent(f"""
        import torch
        from cellssl.cli import main
        from cellssl.engine.checkpoint import FORMAT, save_atomic
        from cellssl.errors import DiskFullError
        save_atomic({{"format": FORMAT, "step": 2, "model": {{"w": torch.ones(10)}}}}, "{disk}/run/last.pt")
        try:
            save_atomic({{"format": FORMAT, "step": 4, "model": {{"w": torch.ones(3_000_000)}}}}, "{disk}/run/last.pt")
        except DiskFullError as exc:
            print("checkpoint:", exc)
        main(["export", "--checkpoint", "{ck}", "--out", "{disk}/m"])
    """)
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=1m tmpfs "{disk}" && '
                        f'"{sys.executable}" -c \'{script}\'; echo "rc=$?"; ls -A "{disk}" "{disk}/run"'],
                       capture_output=True, text=True, timeout=240, env=CHILD_ENV)
    out, err = r.stdout, r.stderr
    assert f"checkpoint: the disk at {disk} is full: writing {disk}/run/last.pt needs about 12.0 MB" in out, out + err
    assert "the previous last.pt (step 2) is kept" in out
    errs = [x for x in err.splitlines() if x.startswith("error:")]
    where = re.escape(str(disk))
    assert len(errs) == 1 and re.search(rf"the disk at {where} is full: writing {where}/m needs about \d+(\.\d+)? MB",
                                        errs[0]), err
    assert "rc=2" in out and out.strip().endswith(f"{disk}/run:\nlast.pt"), out  # no m/, no temp files


# ---- item 5: export writes whole folders, never over the user's files ------------------------
def test_export_refuses_a_folder_with_files_and_overwrite_replaces_an_earlier_export_whole(tmp_path, capsys):
    ck = make_ckpt(tmp_path / "last.pt", image_size=16, backbone=TINY_BACKBONE)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    msg = one_error_line(*run_cli(capsys, "export", "--checkpoint", str(ck), "--out", str(mine))[::2])
    assert "already holds files (README.md)" in msg and "--overwrite" in msg
    msg = one_error_line(*run_cli(capsys, "export", "--checkpoint", str(ck), "--out", str(mine), "--overwrite")[::2])
    assert "has no config.json, so it is not an earlier `cellssl export` output: --overwrite replaces only" in msg
    assert (mine / "README.md").read_text() == "my notes" and sorted(os.listdir(mine)) == ["README.md"]

    out = tmp_path / "m"
    assert run_cli(capsys, "export", "--checkpoint", str(ck), "--out", str(out))[0] == 0
    (out / "model.onnx").write_bytes(b"an earlier export's onnx")  # as `--format both` would have left
    msg = one_error_line(*run_cli(capsys, "export", "--checkpoint", str(ck), "--out", str(out))[::2])
    assert "already holds files" in msg
    assert run_cli(capsys, "export", "--checkpoint", str(ck), "--out", str(out), "--overwrite")[0] == 0
    config = json.loads((out / "config.json").read_text())
    assert sorted(os.listdir(out)) == sorted(config["cellssl"]["files"] + ["config.json", "README.md"])
    assert _leftovers(tmp_path) == []
    (out / "notes.txt").write_text("mine")
    msg = one_error_line(*run_cli(capsys, "export", "--checkpoint", str(ck), "--out", str(out), "--overwrite")[::2])
    assert "holds notes.txt, which `cellssl export` does not write" in msg


@pytest.mark.slow
def test_kill_9_mid_export_leaves_the_earlier_export_whole(tmp_path, monkeypatch, capsys):
    import cellssl.apply.export as export_module

    first = make_ckpt(tmp_path / "a" / "last.pt", image_size=16, step=3, backbone=TINY_BACKBONE)
    second = make_ckpt(tmp_path / "b" / "last.pt", image_size=16, step=9, backbone=TINY_BACKBONE)
    out = tmp_path / "m"
    assert run_cli(capsys, "export", "--checkpoint", str(first), "--out", str(out))[0] == 0
    before = {p.name: _sha(p) for p in out.iterdir()}
    script = textwrap.dedent(f"""
        import os, signal
        import cellssl.apply.export as e
        real = e.save_file
        def save_then_die(*a, **k):
            real(*a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        e.save_file = save_then_die
        from cellssl.cli import main
        main(["export", "--checkpoint", "{second}", "--out", "{out}", "--overwrite"])
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                       env=CHILD_ENV)
    assert r.returncode == -9, r.stderr
    assert {p.name: _sha(p) for p in out.iterdir()} == before  # new weights never sit beside the old config
    assert [n[:11] for n in _leftovers(tmp_path)] == [".m.partial-"]  # kill -9 leaves only a hidden temp folder
    assert json.loads((out / "config.json").read_text())["cellssl"]["step"] == 3
    # a fresh --out stopped mid-write (here by Ctrl-C) leaves nothing that `embed --checkpoint` takes
    real = export_module.save_file

    def save_then_stop(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "save_file", save_then_stop)
    fresh = tmp_path / "fresh"
    assert run_cli(capsys, "export", "--checkpoint", str(second), "--out", str(fresh))[0] == 130
    assert not fresh.exists() and not [n for n in _leftovers(tmp_path) if n.startswith(".fresh")]
    code, _, err = run_cli(capsys, "embed", "--checkpoint", str(fresh), "--data", str(tmp_path), "--out",
                         str(tmp_path / "e.npz"))
    assert code == 2 and "does not exist" in err


# ---- item 6: a finetune that did not finish ------------------------------------------------
def test_interrupted_finetune_leaves_a_best_pt_that_every_command_refuses(tmp_path, monkeypatch, capsys):
    import cellssl.eval.finetune as ft

    data = make_image_folder(tmp_path / "cells", n_per_class=6, size=20)
    run = tmp_path / "ft"
    args = ["finetune", "--checkpoint", f"random:{TINY_BACKBONE}", "--data", str(data), "--out", str(run),
            "--epochs", "2", "--image-size", "16", "--batch-size", "8", "--device", "cpu"]
    real_epoch, calls = ft._train_epoch, []

    def ctrl_c_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)

    monkeypatch.setattr(ft, "_train_epoch", ctrl_c_in_epoch_2)
    code, _, err = run_cli(capsys, *args)
    assert code == 130 and (run / "best.pt").is_file()  # epoch 1's best weights are there ...
    with pytest.raises(CheckpointError, match="did not finish .*best epoch so far: 1.*run `cellssl finetune`"):
        load_predictor(run / "best.pt")  # ... but nothing trusts them
    msg = one_error_line(*run_cli(capsys, "predict", "--model", str(run), "--data", str(data), "--out",
                           str(tmp_path / "p"), "--device", "cpu")[::2])
    assert "did not finish" in msg and "--overwrite" in msg
    msg = one_error_line(*run_cli(capsys, "export", "--checkpoint", str(run / "best.pt"), "--out",
                                  str(tmp_path / "x"))[::2])
    assert "did not finish" in msg and not (tmp_path / "x").exists()
    monkeypatch.undo()
    # a finetune into a run folder is refused, as pretrain does; --overwrite replaces it
    msg = one_error_line(*run_cli(capsys, *args)[::2])
    assert "already holds a finetune run (best.pt at epoch 1): replace it with --overwrite" in msg
    assert run_cli(capsys, *args, "--overwrite")[0] == 0
    pred = load_predictor(run / "best.pt")
    assert pred.unsure is not None and "incomplete" not in torch.load(run / "best.pt", weights_only=True)


# ---- item 7: predict writes a whole folder -------------------------------------------------
def test_predict_writes_a_whole_folder_refuses_files_and_replaces_an_earlier_one(classifier, tmp_path, monkeypatch,
                                                                                 capsys):
    import cellssl.apply.predict as predict_module

    new = make_image_folder(tmp_path / "new", n_per_class=3, size=20, seed=2)
    out = tmp_path / "pred"
    predict(classifier, new, out, device="cpu", progress=False, sheet=4)
    before = {p.name: _sha(p) for p in out.iterdir()}
    assert set(before) == {"predictions.csv", "report.md", "report.json", "least_certain.png", ".cellssl-output"}
    # killed after the csv, before the report: the folder still agrees with itself (the earlier one, whole)
    monkeypatch.setattr(predict_module, "_write_report", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    more = make_image_folder(tmp_path / "more", n_per_class=5, size=20, seed=3)
    with pytest.raises(KeyboardInterrupt):
        predict(classifier, more, out, device="cpu", progress=False, overwrite=True)
    assert {p.name: _sha(p) for p in out.iterdir()} == before and _leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):
        predict(classifier, more, tmp_path / "fresh", device="cpu", progress=False)
    assert not (tmp_path / "fresh").exists()
    monkeypatch.undo()
    msg = one_error_line(*run_cli(capsys, "predict", "--model", str(classifier), "--data", str(more), "--out", str(out),
                           "--device", "cpu")[::2])
    assert "already holds files" in msg and "--overwrite" in msg
    code, shown, _ = run_cli(capsys, "predict", "--model", str(classifier), "--data", str(more), "--out", str(out),
                           "--device", "cpu", "--sheet", "0", "--overwrite")
    assert code == 0 and "classified 15/15" in shown
    assert sorted(os.listdir(out)) == [".cellssl-output", "predictions.csv", "report.json", "report.md"]  # no old sheet
    assert len((out / "predictions.csv").read_text().splitlines()) == 16
    assert json.loads((out / "report.json").read_text())["files"]["csv"] == str(out / "predictions.csv")


# ---- item 8: user faults that were internal errors ------------------------------------------
def _bomb_png(path: Path, side: int = 20000) -> Path:
    """A 69-byte PNG whose header declares side x side RGB pixels (Pillow's decompression-bomb check)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))
    return path


def test_a_png_declaring_a_giant_image_is_a_bad_file_in_predict_and_datasets_check(classifier, tmp_path, capsys):
    new = make_image_folder(tmp_path / "new", n_per_class=2, size=20, seed=2)
    _bomb_png(new / "red" / "aaa_bomb.png")
    code, shown, err = run_cli(capsys, "datasets", "check", str(new))
    assert code == 1 and "error" not in err
    assert "red/aaa_bomb.png: declares an image too large to decode safely" in shown and "unreadable: 1" in shown
    code, shown, err = run_cli(capsys, "predict", "--model", str(classifier), "--data", str(new), "--out",
                             str(tmp_path / "p"), "--device", "cpu")
    assert code == 0 and "classified 6/7 images" in shown, err
    rows = (tmp_path / "p" / "predictions.csv").read_text().splitlines()
    bomb = [r for r in rows if "aaa_bomb.png" in r]
    assert len(rows) == 8 and len(bomb) == 1 and "declares an image too large to decode safely" in bomb[0]


def test_predict_batch_size_is_range_checked(classifier, tmp_path, capsys):
    msg = one_error_line(*run_cli(capsys, "predict", "--model", str(classifier), "--data", str(tmp_path), "--out",
                           str(tmp_path / "p"), "--batch-size", "0")[::2])
    assert msg == "error: --batch-size (eval.batch_size) must be at least 1, got 0"


# ---- item 13: a file that is not starting weights -------------------------------------------
def test_model_pretrained_that_is_not_weights_says_which_files_are_accepted(tmp_path, tiny_folder, capsys):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(200))
    with pytest.raises(ConfigError, match="model.onnx is not a weights file \\(.onnx\\); model.pretrained takes a "
                                          "\\.safetensors file"):
        build_backbone(ModelConfig(backbone="resnet18", pretrained=str(onnx)), 3, 32, load_pretrained=True)
    junk = tmp_path / "junk.pth"
    shutil.copy(onnx, junk)
    with pytest.raises(ConfigError) as exc:
        build_backbone(ModelConfig(backbone="resnet18", pretrained=str(junk)), 3, 32, load_pretrained=True)
    assert "weights_only" not in str(exc.value) and "a `cellssl export` folder" in str(exc.value)
    recipe = tiny_recipe_yaml(tmp_path / "r.yaml", max_steps=1)
    msg = one_error_line(*run_cli(capsys, "pretrain", "--recipe", str(recipe), "--data", str(tiny_folder), "--out",
                           str(tmp_path / "run"), "--set", f"model.pretrained={onnx}")[::2])
    assert "is not a weights file" in msg and "RUN/checkpoints/last.pt" in msg and "weights_only" not in msg
