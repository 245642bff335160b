"""Continued SSL on a new lab (`adapt`), AdaBN-only adaptation, resume after kill -9, the transfer report."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from cellssl.adapt.continued import MixedDataset, adapt, build_mixed_dataset
from cellssl.adapt.shift import shift_folder
from cellssl.config import DataConfig, load_recipe
from cellssl.engine.checkpoint import load_backbone, load_checkpoint
from cellssl.engine.fit import fit
from conftest import CHILD_ENV, REPO, TINY_BACKBONE, make_image_folder, metrics_rows, run_cli, tiny_recipe_yaml

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny source lab, its shifted copy (the target lab) and a source checkpoint (4 steps)."""
    root = tmp_path_factory.mktemp("lab")
    source = make_image_folder(root / "source", n_per_class=16, size=24)
    target = root / "target"
    shift_folder(source, target, preset="scanner_b", seed=0)
    recipe = load_recipe(str(tiny_recipe_yaml(root / "r.yaml", max_steps=4, checkpoint_every=100)),
                         [f"data.path={source}", f"train.out={root / 'src_run'}"])
    ckpt = fit(recipe).checkpoint
    return {"root": root, "source": source, "target": target, "ckpt": ckpt, "recipe": root / "r.yaml"}


def test_adabn_only_changes_bn_buffers_and_loads(lab, tmp_path):
    path = adapt(lab["ckpt"], lab["target"], tmp_path / "bn", bn_only=True, device="cpu")
    assert path == tmp_path / "bn" / "checkpoints" / "last.pt"
    src, new = load_checkpoint(lab["ckpt"]), load_checkpoint(path)
    assert new["adapted"] == "adabn" and new["step"] == src["step"] and new["method"] == src["method"]
    assert set(new["model"]) == set(src["model"])
    changed = []
    for k, v in src["model"].items():
        if k.endswith(BN_BUFFERS):
            if k.endswith("running_mean") and not torch.allclose(v, new["model"][k]):
                changed.append(k)
        else:
            assert torch.equal(v, new["model"][k]), f"parameter {k} changed"
    assert any(k.startswith("backbone.") for k in changed)
    assert any(k.startswith("target_backbone.") for k in changed) and any(k.startswith("projector.") for k in changed)
    backbone, info = load_backbone(path)
    assert info["step"] == src["step"]
    assert backbone(torch.rand(2, 3, 16, 16)).shape[0] == 2


def test_continued_starts_from_source_weights_and_mixes_source(lab, tmp_path):
    out = tmp_path / "cont"
    path = adapt(lab["ckpt"], lab["target"], out, max_steps=1, source=lab["source"], source_fraction=0.5,
                 device="cpu", overrides=["optim.lr=1e-9", "train.batch_size=8"])
    ckpt = load_checkpoint(path)
    assert ckpt["adapted"] == "continued" and ckpt["step"] == 1 and ckpt["source_fraction"] == 0.5
    cfg = ckpt["config"]
    assert cfg["data"]["path"] == str(lab["target"]) and cfg["train"]["max_steps"] == 1
    assert cfg["optim"]["lr"] == pytest.approx(1e-9)  # an explicit override is kept, not scaled
    assert cfg["method"]["momentum_base"] == pytest.approx(cfg["adapt"]["momentum_base"])
    a, _ = load_backbone(lab["ckpt"])
    b, _ = load_backbone(path)
    for (k, va), (_, vb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=0, msg=k)


def test_mixed_dataset_fraction_and_items(lab):
    ds = build_mixed_dataset(DataConfig(), lab["target"], lab["source"], 0.25, seed=0)
    assert isinstance(ds, MixedDataset) and ds.channels == 3
    n_t = 48
    assert len(ds) == n_t + 16 and len(ds.samples) == len(ds)
    assert ds.source_fraction == pytest.approx(16 / 64)
    img, y = ds[len(ds) - 1]
    assert img.dtype == np.float32 and img.shape == (24, 24, 3) and y == -1
    assert str(ds.samples[-1][0]).startswith(str(lab["source"]))


def test_adapt_lr_scale_and_default_steps(lab, tmp_path):
    from cellssl.adapt.continued import adapted_recipe

    src = load_checkpoint(lab["ckpt"])
    r = adapted_recipe(src["config"], lab["target"], tmp_path / "x", overrides=["adapt.lr_scale=0.5"])
    assert r.optim.lr == pytest.approx(src["config"]["optim"]["lr"] * 0.5)
    assert r.train.max_steps == r.adapt.max_steps and r.train.out == str(tmp_path / "x")


WORKER = """
import sys, time
import cellssl.engine.fit as F
from cellssl.adapt.continued import adapt
_save = F.save_atomic
def slow_save(obj, path):
    out = _save(obj, path)
    time.sleep(0.5 if obj.get("step", 0) < int(sys.argv[4]) else 0)  # room for kill -9 after each mid-run save
    return out
F.save_atomic = slow_save
adapt(sys.argv[1], sys.argv[2], sys.argv[3], max_steps=int(sys.argv[4]), device="cpu",
      overrides=["train.checkpoint_every=2", "train.log_every=1"])
"""


@pytest.mark.slow
def test_adapt_resume_after_kill_9(lab, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(worker), str(lab["ckpt"]), str(lab["target"]), str(out), "6"],
                            cwd=REPO, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = out / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                step = load_checkpoint(ckpt)["step"]
            except Exception:
                step = None
            if step is not None and 2 <= step < 6:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert load_checkpoint(ckpt)["step"] == killed_at
    path = adapt(lab["ckpt"], lab["target"], out, resume=True, device="cpu")
    final = load_checkpoint(path)
    assert final["step"] == 6 and final["adapted"] == "continued"
    steps = [r["step"] for r in metrics_rows(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # no repeated step
    # The same run without interruption ends with identical weights.
    ref = adapt(lab["ckpt"], lab["target"], tmp_path / "ref", max_steps=6, device="cpu",
                overrides=["train.checkpoint_every=2", "train.log_every=1"])
    a, b = load_checkpoint(ref)["model"], final["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    load_backbone(path)


def test_transfer_report_rows_and_files(lab, tmp_path, quick_maps):
    from cellssl.adapt.report import transfer_report

    adapted = adapt(lab["ckpt"], lab["target"], tmp_path / "ad", max_steps=2, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = transfer_report(lab["ckpt"], lab["source"], lab["target"], tmp_path / "rep", adapted=adapted,
                             episodes=20, device="cpu", shots=(1, 5))
    assert md == tmp_path / "rep" / "transfer.md"
    rep = json.loads((tmp_path / "rep" / "transfer.json").read_text())
    keys = [r["key"] for r in rep["rows"]]
    assert keys == ["source_domain", "source", "adabn", "stain", "continued"]
    for r in rep["rows"]:
        assert set(r["fewshot"]) == {"1", "5"} and 0 <= r["fewshot"]["5"]["mean"] <= 1
        assert r["fewshot"]["5"]["ci95"] >= 0 and 0 <= r["linear"]["accuracy"] <= 1
        if r["key"] != "source_domain":
            gap = r["domain_gap"]
            assert 0 <= gap["domain_classifier_acc"] <= 1 and np.isfinite(gap["mmd2"])
    assert set(rep["domain_gap"]) == {"source", "adabn", "stain", "continued"}
    text = md.read_text()
    for label in ("source model", "+ AdaBN", "+ stain normalisation", "+ continued SSL", "MMD²", "1-shot"):
        assert label in text
    assert (tmp_path / "rep" / "transfer_accuracy.png").stat().st_size > 0
    assert (tmp_path / "rep" / "transfer_embedding.png").stat().st_size > 0


def test_domain_gap_measures():
    from cellssl.adapt.report import domain_classifier_accuracy, mmd2_rbf

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 8)), rng.normal(size=(80, 8))
    far = rng.normal(size=(80, 8)) + 3.0
    assert domain_classifier_accuracy(a, b) < 0.7 < domain_classifier_accuracy(a, far)
    assert abs(mmd2_rbf(a, b)[0]) < 0.05 < mmd2_rbf(a, far)[0]


def test_cli_adapt_bn_only(lab, tmp_path, capsys):
    code, out, err = run_cli(capsys, "adapt", "--checkpoint", str(lab["ckpt"]), "--data", str(lab["target"]),
                             "--out", str(tmp_path / "cli"), "--bn-only", "--device", "cpu")
    assert code == 0, err
    assert "adapted checkpoint" in out and (tmp_path / "cli" / "checkpoints" / "last.pt").exists()


def test_transfer_report_json_is_valid_with_undefined_metrics_and_names_the_stain_method(lab, tmp_path):
    """One image per class: the domain classifier is undefined (NaN) -> null, never a bare NaN;
    the stain row names the method used (Reinhard here)."""
    from cellssl.adapt.report import transfer_report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = transfer_report(f"random:{TINY_BACKBONE}", lab["source"], lab["target"], tmp_path / "rep", episodes=5,
                             device="cpu", shots=(1,), max_per_class=1, stain_method="reinhard")
    text = (tmp_path / "rep" / "transfer.json").read_text()
    rep = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in transfer.json"))
    assert rep["domain_gap"]["source"]["domain_classifier_acc"] is None
    stain = next(r for r in rep["rows"] if r["key"] == "stain")
    assert stain["label"] == "+ stain normalisation (Reinhard)"
    assert "(Reinhard)" in md.read_text() and "Macenko" not in md.read_text()


def test_transfer_report_tsne_runs_with_one_openmp_thread(monkeypatch):
    """The transfer report's t-SNE uses the same thread limit as the evaluation report's (100x
    faster after a torch forward pass): OpenMP is limited to one thread while it runs."""
    import sklearn.manifold
    from threadpoolctl import threadpool_info, threadpool_limits

    from cellssl.eval.report import tsne_2d

    seen = []
    fit_transform = sklearn.manifold.TSNE.fit_transform

    def spy(self, x, *a, **k):
        seen.append([p["num_threads"] for p in threadpool_info() if p["user_api"] == "openmp"])
        return fit_transform(self, x, *a, **k)

    monkeypatch.setattr(sklearn.manifold.TSNE, "fit_transform", spy)
    x = np.random.default_rng(0).normal(size=(40, 8))
    with threadpool_limits(2, user_api="openmp"):  # what an unlimited process would have on 2 cores
        assert tsne_2d(x, 0).shape == (40, 2)
    assert seen and seen[0] and all(n == 1 for n in seen[0])
