"""`cellssl select`: the strategies on synthetic features, the command's files and errors, and the
select -> label -> linear / knn / fewshot / finetune (-> predict) loop from the command line."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellssl.apply.select import (
    ball_graph,
    kmeans_labels,
    probcover,
    probcover_delta,
    read_labelled_paths,
    select_indices,
)
from cellssl.data.datasets import DataWarning
from cellssl.errors import ConfigError, DataError
from conftest import TINY_BACKBONE, make_image_folder, run_cli

SIZES = (400, 200, 100, 50, 30, 20)  # unbalanced regions, as cell types are


def blobs(sizes=SIZES, dim: int = 32, spread: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs on the sphere: features (N, dim) and blob ids (N,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[y] + spread / np.sqrt(dim) * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _dense(x: np.ndarray) -> np.ndarray:
    z = _unit(x.astype(np.float64))
    return np.sqrt(np.maximum(2 - 2 * z @ z.T, 0))


# --- strategies -------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["typiclust", "probcover", "coreset", "random"])
def test_strategy_contract(strategy: str) -> None:
    x, _ = blobs()
    labelled = np.array([0, 1, 450, 799])
    a = select_indices(x, 12, strategy, labelled=labelled, seed=3, n_classes=6)
    b = select_indices(x, 12, strategy, labelled=labelled, seed=3, n_classes=6)
    assert a.indices.dtype == np.int64 and len(a.indices) == 12 and len(set(a.indices.tolist())) == 12
    assert not np.isin(a.indices, labelled).any() and a.indices.max() < len(x)
    assert np.array_equal(a.indices, b.indices)  # deterministic in the seed


@pytest.mark.parametrize("strategy", ["probcover", "coreset", "random"])
def test_sequential_strategies_are_prefix_consistent(strategy: str) -> None:
    """The first b cells of a larger selection are the b-cell selection (the benchmark relies on
    it: one run per seed serves every budget); TypiClust re-clusters per budget instead."""
    x, _ = blobs()
    small = select_indices(x, 5, strategy, labelled=[3], seed=1, n_classes=6).indices
    large = select_indices(x, 12, strategy, labelled=[3], seed=1, n_classes=6).indices
    assert np.array_equal(small, large[:5])


def test_typiclust_covers_every_region_and_beats_random() -> None:
    """One typical cell per region at budget = number of regions, where a random sample of the same
    size misses the small regions; each pick is among the most typical cells of its region."""
    x, y = blobs()
    z = _unit(x)
    typ_cov, rnd_cov = [], []
    for seed in range(5):
        t = select_indices(x, len(SIZES), "typiclust", seed=seed)
        r = select_indices(x, len(SIZES), "random", seed=seed)
        typ_cov.append(len(np.unique(y[t.indices])))
        rnd_cov.append(len(np.unique(y[r.indices])))
        for i in t.indices:  # typical = close to the centre of its blob
            members = np.flatnonzero(y == y[i])
            d = np.linalg.norm(z[members] - z[members].mean(0), axis=1)
            assert np.linalg.norm(z[i] - z[members].mean(0)) <= np.quantile(d, 0.25)
    assert min(typ_cov) == len(SIZES)
    assert np.mean(rnd_cov) <= len(SIZES) - 1


def test_typiclust_avoids_covered_regions() -> None:
    """Regions holding a labelled cell are covered: the next round picks the two small uncovered ones."""
    x, y = blobs()
    labelled = [int(np.flatnonzero(y == b)[0]) for b in range(4)]
    for seed in range(3):
        sel = select_indices(x, 2, "typiclust", labelled=labelled, seed=seed)
        assert set(y[sel.indices].tolist()) == {4, 5}


def test_typiclust_with_duplicate_images() -> None:
    """Fewer distinct points than clusters: still `budget` distinct rows (guard around skactiveml)."""
    x = np.repeat(np.eye(4, 8, dtype=np.float32), 10, axis=0)
    sel = select_indices(x, 7, "typiclust", seed=0)
    assert len(set(sel.indices.tolist())) == 7


def test_probcover_delta_is_the_largest_pure_radius() -> None:
    x, _ = blobs(sizes=(60, 40, 30), spread=1.5)
    z = _unit(x).astype(np.float32)
    delta, purity = probcover_delta(z, n_classes=3, alpha=0.9, seed=0)
    g = kmeans_labels(z, 3, 0)
    d = _dense(x)
    d[g[:, None] == g[None, :]] = np.inf
    r = d.min(axis=1)
    assert purity == pytest.approx(np.mean(r > delta)) and purity >= 0.9
    bigger = np.min(r[r > delta])  # the next radius at which one more ball turns impure
    assert np.mean(r > bigger) < 0.9


def test_probcover_degrees_match_scikit_activeml_and_picks_are_greedy() -> None:
    """Same ball graph as scikit-activeml's dense ProbCover (its first-step utilities), and every
    pick covers the most uncovered cells (brute force on the dense distance matrix)."""
    import warnings

    from skactiveml.pool import ProbCover

    x, _ = blobs(sizes=(80, 50, 30, 20), spread=2.0)
    delta = 0.5
    labelled = np.array([5, 100])
    y = np.full(len(x), np.nan)
    y[labelled] = 0
    z = _unit(x).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qs = ProbCover(deltas=[delta], n_classes=4, random_state=0)
        _, util = qs.query(z, y, batch_size=1, return_utilities=True)
    a = ball_graph(z, delta)
    covered = np.zeros(len(x), bool)
    covered[a[labelled].indices] = True
    ours = a @ (~covered).astype(int)
    cand = np.setdiff1d(np.arange(len(x)), labelled)
    assert np.array_equal(ours[cand], util[0][cand].astype(int))

    sel = probcover(z, 15, labelled, seed=0, delta=delta)
    ball = _dense(x) <= delta
    cov = ball[labelled].any(axis=0)
    avail = np.ones(len(x), bool)
    avail[labelled] = False
    for i, gain in zip(sel.indices, sel.info["gains"]):
        best = max((ball[j] & ~cov).sum() for j in np.flatnonzero(avail))
        assert gain == best == (ball[i] & ~cov).sum()
        cov |= ball[i]
        avail[i] = False
    assert sel.info["coverage"] == pytest.approx(cov.mean())


def test_coreset_is_farthest_first() -> None:
    x, _ = blobs()
    labelled = np.array([0, 10])
    sel = select_indices(x, 3, "coreset", labelled=labelled, seed=0)
    d = _dense(x)
    centres = list(labelled)
    for i in sel.indices:
        mind = d[:, centres].min(axis=1)
        mind[centres] = -1
        assert mind[i] == pytest.approx(mind.max(), abs=1e-5)
        centres.append(i)


def test_select_indices_errors() -> None:
    x, _ = blobs(sizes=(5, 5))
    with pytest.raises(DataError, match="budget 9 is more than the 8 unlabelled cells"):
        select_indices(x, 9, labelled=[0, 1])
    with pytest.raises(ConfigError, match="did you mean 'typiclust'"):
        select_indices(x, 2, "typiclus")


# --- the command ---------------------------------------------------------------------------------
def flat_pool(root: Path, n_per_class: int = 16, seed: int = 0) -> Path:
    """An unlabelled pool: the colour classes of conftest's folder, all in one folder (the class is
    in the file name only, for the test's 'expert')."""
    make_image_folder(root / "_tmp", n_per_class=n_per_class, size=24, seed=seed)
    root.mkdir(exist_ok=True)
    for f in sorted((root / "_tmp").rglob("*.png")):
        f.rename(root / f.name)
    for d in sorted((root / "_tmp").iterdir()):
        d.rmdir()
    (root / "_tmp").rmdir()
    return root


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    return flat_pool(tmp_path_factory.mktemp("select") / "pool")


COMMON = ["--checkpoint", f"random:{TINY_BACKBONE}", "--image-size", "24", "--device", "cpu", "--no-map"]


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_select_writes_the_experts_files(pool: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "to_label"
    code, stdout, err = run_cli(capsys, "select", *COMMON[:-1], "--data", str(pool), "--budget", "7", "--out", str(out))
    assert code == 0, err
    assert "selected 7 of 48 cells (typiclust" in stdout
    rows = read_rows(out / "to_label.csv")
    assert [r["row"] for r in rows] == [str(i) for i in range(1, 8)]
    assert list(rows[0]) == ["path", "label", "row", "cluster", "typicality", "source"]
    assert all(r["label"] == "" for r in rows)
    for r in rows:  # copies, numbered like the rows, identical to their source in the pool
        copy, src = out / r["path"], (out / r["source"]).resolve()
        assert copy.is_file() and not copy.is_symlink() and copy.name.startswith(f"{int(r['row']):03d}_")
        assert src.parent == pool.resolve() and copy.read_bytes() == src.read_bytes()
        assert float(r["typicality"]) > 0
    assert len({r["source"] for r in rows}) == 7
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 400 and sheet.size[1] > 300
    assert (out / "map.png").is_file() and (out / "embeddings.npz").is_file()
    report = json.loads((out / "selection.json").read_text())
    assert report["budget"] == 7 and report["pool_size"] == 48 and report["strategy"] == "typiclust"
    md = (out / "report.md").read_text()
    assert "![map](map.png)" in md and "contact_sheet.png" in md and "--labelled" in md
    with np.load(out / "embeddings.npz") as z:
        assert z["features"].shape[0] == 48 and len(z["paths"]) == 48


def test_next_round_avoids_labelled_and_reuses_features(pool: Path, tmp_path: Path, capsys) -> None:
    r1 = tmp_path / "r1"
    assert run_cli(capsys, "select", *COMMON, "--data", str(pool), "--budget", "6", "--out", str(r1),
                   "--strategy", "probcover", "--n-classes", "3", "--link")[0] == 0
    first = read_rows(r1 / "to_label.csv")
    assert all((r1 / r["path"]).is_symlink() for r in first)
    # the labelled set lists the symlinked copies: they resolve to the pool's files
    assert {p.name for p in read_labelled_paths(r1 / "to_label.csv")} == {Path(r["source"]).name for r in first}
    r2 = tmp_path / "r2"
    code, stdout, err = run_cli(capsys, "select", *COMMON, "--data", str(pool), "--budget", "6", "--out", str(r2),
                                "--labelled", str(r1 / "to_label.csv"), "--features", str(r1 / "embeddings.npz"))
    assert code == 0, err
    assert "avoiding 6 labelled" in stdout
    second = read_rows(r2 / "to_label.csv")
    assert not {r["source"] for r in first} & {Path(r["source"]).as_posix() for r in second}
    assert not (r2 / "embeddings.npz").exists()  # reused, not recomputed
    # reused features give the same selection as embedding again
    r3 = tmp_path / "r3"
    assert run_cli(capsys, "select", *COMMON, "--data", str(pool), "--budget", "6", "--out", str(r3),
                   "--labelled", str(r1 / "to_label.csv"))[0] == 0
    assert [r["source"] for r in read_rows(r3 / "to_label.csv")] == [r["source"] for r in second]


def test_select_errors_are_one_line(pool: Path, tmp_path: Path, capsys) -> None:
    base = ["select", *COMMON, "--out", str(tmp_path / "o")]
    code, _, err = run_cli(capsys, *base, "--data", str(pool), "--budget", "49")
    assert code == 2 and err.count("\n") == 1
    assert "--budget 49 is more than the 48 unlabelled cells" in err and "--budget 48 or fewer" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, *base, "--data", str(empty), "--budget", "3")
    assert code == 2 and err.count("\n") == 1 and f"no images found in {empty}" in err

    other = make_image_folder(tmp_path / "elsewhere", n_per_class=1)
    bad = tmp_path / "labels.csv"
    bad.write_text("path,label\n" + "\n".join(f"{p.relative_to(tmp_path)},x" for p in sorted(other.rglob("*.png"))))
    code, _, err = run_cli(capsys, *base, "--data", str(pool), "--budget", "3", "--labelled", str(bad))
    assert code == 2 and err.count("\n") == 1
    assert f"--labelled {bad}: 3 of its 3 images are not in the pool" in err and "list only cells of --data" in err

    code, _, err = run_cli(capsys, *base, "--data", str(pool), "--budget", "2", "--labelled",
                           str(tmp_path / "nope.csv"))
    assert code == 2 and "does not exist" in err

    wrong = tmp_path / "other.npz"
    np.savez(wrong, features=np.zeros((2, 4), np.float32), paths=np.asarray(["a.png", "b.png"]))
    code, _, err = run_cli(capsys, *base, "--data", str(pool), "--budget", "2", "--features", str(wrong))
    assert code == 2 and err.count("\n") == 1
    assert f"--features {wrong} has no features for 48 of the 48 images" in err and "embed this folder again" in err

    code, _, err = run_cli(capsys, *base, "--data", str(pool), "--budget", "0")
    assert code == 2 and "--budget" in err


def test_select_keeps_an_experts_labels(pool: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sel"
    assert run_cli(capsys, "select", *COMMON, "--data", str(pool), "--budget", "3", "--out", str(out))[0] == 0
    rows = read_rows(out / "to_label.csv")
    rows[0]["label"] = "red"
    with (out / "to_label.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    code, _, err = run_cli(capsys, "select", *COMMON, "--data", str(pool), "--budget", "3", "--out", str(out))
    assert code == 2 and "already has 1 labels filled in" in err and "choose another --out" in err
    assert read_rows(out / "to_label.csv")[0]["label"] == "red"


# --- the loop, from the command line --------------------------------------------------------------
def cellssl(args: list[str], cwd: Path, capsys) -> str:
    """One CLI command in ``cwd`` through the console script's entry point (in-process: the
    suite pays torch's import once); fails the test with its one-line error."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        code, out, err = run_cli(capsys, *args)
    finally:
        os.chdir(old)
    assert code == 0, err
    return out


@pytest.mark.filterwarnings("ignore:manifest .* rows have no label:UserWarning")
def test_select_label_train_predict_loop(tmp_path: Path, capsys) -> None:
    """README's loop on a small folder, every command run from the pool's parent folder with relative
    paths: select 9 cells, the 'expert' (this test) fills in the label column, and the filled CSV is
    the training set of linear, knn, fewshot and finetune; predict closes the loop on the whole pool.
    (``python -m cellssl`` as a real process: tests/test_packaging.py and test_reliability.py.)"""
    flat_pool(tmp_path / "unlabelled", n_per_class=16, seed=0)
    make_image_folder(tmp_path / "test", n_per_class=8, size=24, seed=1)
    ck = ["--checkpoint", f"random:{TINY_BACKBONE}", "--image-size", "24", "--device", "cpu"]
    out = cellssl(["select", *ck, "--data", "unlabelled", "--budget", "9", "--out", "to_label", "--no-map"], tmp_path,
                  capsys)
    assert "selected 9 of 48 cells" in out

    csv_path = tmp_path / "to_label" / "to_label.csv"
    rows = read_rows(csv_path)
    for r in rows:  # the expert: the class is the file-name prefix
        r["label"] = Path(r["source"]).name.split("_")[0]
    rows[-1]["label"] = ""  # one cell the expert was unsure of
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    labels = [r["label"] for r in rows[:-1]]
    assert sorted(set(labels)) == ["blue", "green", "red"] and min(labels.count(c) for c in set(labels)) >= 2

    with pytest.warns(DataWarning, match="1 of 9 rows have no label and are left out"):
        cellssl(["linear", *ck, "--train", "to_label/to_label.csv", "--test", "test", "--out", "eval/linear"],
                tmp_path, capsys)
    lin = json.loads((tmp_path / "eval" / "linear" / "report.json").read_text())
    assert lin["settings"]["n_train"] == 8 and lin["accuracy"] >= 0.8  # 3 colour classes, chance 1/3
    cellssl(["knn", *ck, "--train", "to_label/to_label.csv", "--test", "test", "--k", "3", "--out", "eval/knn"],
            tmp_path, capsys)
    assert json.loads((tmp_path / "eval" / "knn" / "report.json").read_text())["accuracy"] >= 0.8
    cellssl(["fewshot", *ck, "--data", "to_label/to_label.csv", "--shots", "1", "--queries", "1", "--episodes", "20",
             "--out", "eval/fewshot.json"], tmp_path, capsys)
    assert json.loads((tmp_path / "eval" / "fewshot.json").read_text())["results"]["1"]["mean"] > 0.5
    cellssl(["finetune", *ck, "--data", "to_label/to_label.csv", "--test", "test", "--epochs", "2",
             "--batch-size", "8", "--out", "runs/ft"], tmp_path, capsys)
    ft = json.loads((tmp_path / "runs" / "ft" / "report.json").read_text())
    assert ft["classes"] == ["blue", "green", "red"] and (tmp_path / "runs" / "ft" / "best.pt").is_file()

    cellssl(["predict", "--model", "runs/ft/best.pt", "--data", "unlabelled", "--out", "predictions"], tmp_path, capsys)
    with (tmp_path / "predictions" / "predictions.csv").open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 48  # every cell of the pool classified
