"""Shared fixtures: tiny image folders made in the test, the shared real-data folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "cells")


@pytest.fixture
def shared_pbc() -> Path:
    path = SHARED_DATA / "pbc128"
    if not path.is_dir():
        pytest.skip(f"real PBC data not found at {path} (../shared/data is only beside the project checkout)")
    return path


def tiny_recipe_yaml(path: Path, **train) -> Path:
    """A CPU-second recipe: resnet18 at 16 px, small heads, no workers, no progress bar."""
    import yaml

    t = {"batch_size": 8, "max_steps": 8, "checkpoint_every": 4, "log_every": 1, "monitor_every": 2,
         "progress": False, "threads": 1}
    t.update(train)
    recipe = {
        "name": "tiny",
        "data": {"image_size": 16, "num_workers": 0},
        "views": {"n_views": 2},
        "model": {"backbone": "resnet18", "proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
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
    """A linear probe's ``classifier.pt`` on random-init resnet18 features of the colour classes at
    16 px (any features separate them; seconds on a CPU), for the commands that take a model."""
    from cellssl.eval.linear import linear

    root = tmp_path_factory.mktemp("clf")
    train = make_image_folder(root / "train", n_per_class=10, size=20, seed=0)
    report = linear("random:resnet18", train, None, root / "eval" / "linear.json", split=0.3, image_size=16,
                    device="cpu", plots=False)
    return Path(report["classifier"])
