"""Shared fixtures and helpers: tiny image folders and recipes made in the test, the CLI in-process
and as a fresh process, a run's metrics rows, the shared real-data folder."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
# timm's tiny ResNet (0.37 M parameters: 6 MB training checkpoints instead of resnet18's 180 MB) for every
# test that is not about resnet18 itself. Its stem is a 3-conv "deep" stem: model.stem=pool|small and
# resnet18-specific names (conv1.weight, 512 features, timm.create_model("resnet18")) need resnet18.
TINY_BACKBONE = "test_resnet"
TINY_FEATURES = 96  # test_resnet's num_features
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N processes on N cores, one torch thread each
    torch.set_num_threads(1)
# A child process: one OpenMP thread, unbuffered output (a test reads its progress), this checkout first.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
             "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


def make_image_folder(root: Path, n_per_class: int = 16, size: int = 24, classes=("red", "green", "blue"),
                      seed: int = 0) -> Path:
    """Labelled folder with colour-coded classes plus texture noise (has learnable structure)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(0, 80, size=(size, size, 3)).astype(np.uint8)
            img[..., c % 3] = np.clip(img[..., c % 3].astype(int) + 150, 0, 255).astype(np.uint8)
            yy, xx = np.mgrid[:size, :size]
            r = rng.integers(size // 5, size // 3)
            mask = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 < r**2
            img[mask] = img[mask] // 2
            Image.fromarray(img).save(d / f"{name}_{i:03d}.png")
    return root


def make_plate_folder(root: Path, plate: str = "plate2") -> Path:
    """``root/cells``: 6 red and 6 green 16 px cells, and 2 larger (20 px) green ones in the
    sub-folder ``green/<plate>`` below their class (a batch / plate folder)."""
    make_image_folder(root / "cells", n_per_class=6, size=16, classes=("red", "green"))
    (root / "cells" / "green" / plate).mkdir()
    make_image_folder(root / "tmp", n_per_class=2, size=20, classes=("x",))
    for i, p in enumerate(sorted((root / "tmp" / "x").iterdir())):
        p.rename(root / "cells" / "green" / plate / f"big_{i}.png")
    return root / "cells"


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "cells")


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """``last.pt`` of a 2-step pretraining run (tiny backbone, colour folder), trained once per session
    for the tests that only need some trained checkpoint. Read-only: a test that changes it works on a
    copy (``load_checkpoint`` then save elsewhere)."""
    from cellssl.config import load_recipe
    from cellssl.engine.fit import fit

    root = tmp_path_factory.mktemp("trained")
    folder = make_image_folder(root / "cells")
    recipe = load_recipe(str(tiny_recipe_yaml(root / "r.yaml", max_steps=2, checkpoint_every=100)),
                         [f"data.path={folder}", f"train.out={root / 'run'}"])
    path = Path(fit(recipe).checkpoint)
    path.chmod(0o444)
    return path


def first_two_pcs(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, F) -> (N, 2): the first two principal components (a stand-in for t-SNE; ``seed`` unused)."""
    x = np.asarray(x, dtype=np.float32)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return np.pad(x @ vt[:2].T, ((0, 0), (0, max(0, 2 - len(vt)))))


@pytest.fixture
def quick_maps(monkeypatch):
    """Report maps from :func:`first_two_pcs` instead of t-SNE, for tests whose subject is not the map
    (a t-SNE of 400 points takes seconds; the demo draws six). The t-SNE path itself is tested by the
    evaluation tests with plots and ``test_transfer_report_tsne_runs_with_one_openmp_thread``."""
    import cellssl.eval.report as report

    monkeypatch.setattr(report, "tsne_2d", first_two_pcs)


@pytest.fixture
def shared_pbc() -> Path:
    path = SHARED_DATA / "pbc128"
    if not path.is_dir():
        pytest.skip(f"real PBC data not found at {path} (../shared/data is only beside the project checkout)")
    return path


def tiny_recipe_yaml(path: Path, backbone: str = TINY_BACKBONE, **train) -> Path:
    """A CPU-second recipe: timm's tiny test ResNet at 16 px, small heads, no workers, no progress bar;
    ``train`` overrides the train section."""
    import yaml

    t = {"batch_size": 8, "max_steps": 8, "checkpoint_every": 4, "log_every": 1, "monitor_every": 2,
         "progress": False, "threads": 1}
    t.update(train)
    recipe = {
        "name": "tiny",
        "data": {"image_size": 16, "num_workers": 0},
        "views": {"n_views": 2},
        "model": {"backbone": backbone, "proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
        "method": {"name": "msbreg"},
        "optim": {"name": "adamw", "lr": 0.001},
        "train": t,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in-process, as a user runs it (``cellssl.cli.main``): (exit code, stdout, stderr)."""
    from cellssl.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


# ``python -c SLOW_STEPS ARGS`` runs ``cellssl ARGS`` with every MSBReg step at least 0.1 s longer, so that
# a test's signal or kill -9 lands mid-run even with the tiny backbone on a fast machine (the numbers are
# those of a normal run: only the time changes).
SLOW_STEPS = """
import sys, time
from cellssl.cli import main
from cellssl.methods.msbreg import MSBReg
original = MSBReg.forward
def slow(self, *args, **kw):
    time.sleep(0.1)
    return original(self, *args, **kw)
MSBReg.forward = slow
main(sys.argv[1:])
"""


def run_cellssl(*args: str, cwd: Path = REPO, env: dict | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m cellssl ARGS`` as a fresh process (text output captured). Only for what needs a real
    process (signals, kill -9, the interpreter's own exit); everything else runs :func:`run_cli`."""
    return subprocess.run([sys.executable, "-m", "cellssl", *args], cwd=cwd, env=env or CHILD_ENV,
                          capture_output=True, text=True, timeout=timeout)


def metrics_rows(run: Path) -> list[dict]:
    """The rows of a run folder's ``metrics.jsonl`` (one dict per logged step; [] before the first)."""
    path = Path(run) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []



def spawn_ranks(target, args_per_rank: list[tuple], timeout_s: float) -> list[int | None]:
    """Start ``target(*args)`` once per tuple as spawned processes (with ``OMP_NUM_THREADS=1``, restored
    after), join each within ``timeout_s``, kill the ones still alive; their exit codes (-9: killed)."""
    ctx = mp.get_context("spawn")
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [ctx.Process(target=target, args=args) for args in args_per_rank]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    return [p.exitcode for p in procs]

def one_error_line(code: int, err: str, alone: bool = True) -> str:
    """The one ``error:`` line of a user-fault exit: code 2, no traceback, no "internal error";
    ``alone``: nothing else on stderr (else warnings may come before it)."""
    assert code == 2 and "Traceback" not in err, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "internal error" not in lines[0], err
    assert not alone or len(err.strip().splitlines()) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A linear probe's ``classifier.pt`` on random-init features of the colour classes at 16 px (any
    features separate them; seconds on a CPU), for the commands that take a model."""
    from cellssl.eval.linear import linear

    root = tmp_path_factory.mktemp("clf")
    train = make_image_folder(root / "train", n_per_class=10, size=20, seed=0)
    report = linear(f"random:{TINY_BACKBONE}", train, None, root / "eval" / "linear.json", split=0.3, image_size=16,
                    device="cpu", plots=False)
    return Path(report["classifier"])
