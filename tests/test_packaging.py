"""An install that works outside the checkout: build the wheel, install it into a throwaway folder
(no dependencies: they come from the running environment), run the CLI from another directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TINY_BACKBONE, make_image_folder


def _copy_sources(dst: Path) -> Path:
    """What a clean clone builds from (no build/, *.egg-info or caches of this checkout)."""
    dst.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("cellssl", "recipes"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    return dst


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools", minversion="77")
    src = _copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True, timeout=120)
    (wheel,) = dist.glob("cellssl-*.whl")

    names = set(zipfile.ZipFile(wheel).namelist())
    # every cellssl sub-package made it in (pyproject lists them explicitly)...
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "cellssl").rglob("__init__.py")}
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    # ...and so did every recipe, ablation overlays included
    recipes = {f"cellssl/recipes/{p.relative_to(REPO / 'recipes')}" for p in (REPO / "recipes").rglob("*.yaml")}
    assert recipes and recipes <= names, sorted(recipes - names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=120)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy on the path: the interpreter's own site-packages give the dependencies.
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "cellssl", *args], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    where = subprocess.run([sys.executable, "-c",
                            "import cellssl.config as c; print(c.__file__); print(c.RECIPES_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where

    listed = run("list", "recipes")
    assert {"blood_smear", "cpu_demo", "fluorescence"} <= {line.split()[0] for line in listed.splitlines()}

    data = make_image_folder(tmp_path / "cells", n_per_class=4, size=20)
    out = tmp_path / "run"
    run("pretrain", "--recipe", "blood_smear", "--overlay", "recipes/ablation/centroid.yaml", "--data", str(data),
        "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--image-size", "16", "--workers", "0",
        "--backbone", TINY_BACKBONE,
        "--set", "train.progress=false", "--set", "model.proj_hidden=32", "--set", "model.pred_hidden=32",
        "--set", "model.proj_dim=16", "--set", "train.threads=1",
        "--set", "train.compile=false")  # inductor's minute on the CPU: test_gpu_path compiles this ablation
    assert (out / "checkpoints" / "last.pt").is_file()
    assert "sv_weight: 0.0" in (out / "config.yaml").read_text()  # the ablation overlay was found and applied
