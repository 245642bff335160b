"""The synthetic smear generator: determinism, balance, learnable class structure, caching."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from cellssl.data.synth import SYNTH_CLASSES, ensure_synthetic, generate_dataset, generate_smear_image


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_same_seed_identical_bytes_different_seed_differs(tmp_path: Path) -> None:
    a = _digest(generate_dataset(tmp_path / "a", n=18, seed=5))
    b = _digest(generate_dataset(tmp_path / "b", n=18, seed=5))
    c = _digest(generate_dataset(tmp_path / "c", n=18, seed=6))
    assert a == b and len(a) == 18
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) == 18


def test_balanced_classes_and_layout(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "s", n=40, seed=0, image_size=48)
    counts = {cls: len(list((root / cls).glob(f"{cls}_*.png"))) for cls in SYNTH_CLASSES}
    assert set(counts) >= {"neutrophil", "lymphocyte", "monocyte", "eosinophil", "other"}
    assert sum(counts.values()) == 40 and max(counts.values()) - min(counts.values()) <= 1


def test_image_properties() -> None:
    img = generate_smear_image("neutrophil", np.random.default_rng(0), size=64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # Wright-Giemsa look: bright pinkish background (red > blue at the border), dark purple centre
    border = np.concatenate([img[:4].reshape(-1, 3), img[-4:].reshape(-1, 3)]).astype(float)
    assert border.mean() > 150
    centre = img[24:40, 24:40].reshape(-1, 3).astype(float)
    assert centre.min(axis=0).sum() < border.mean(axis=0).sum() - 200  # nucleus pixels are dark
    with pytest.raises(ValueError, match="unknown synthetic class"):
        generate_smear_image("macrophage", np.random.default_rng(0))


def _features(img: np.ndarray) -> np.ndarray:
    """Mean colour of the centre and the fraction of dark pixels: simple, hand-made features."""
    x = img.astype(np.float32) / 255.0
    c = x[16:48, 16:48].reshape(-1, 3)
    dark = (c.mean(axis=1) < 0.45).mean()
    return np.concatenate([c.mean(axis=0), c.std(axis=0), [dark]])


def test_classes_are_learnable_but_not_identical() -> None:
    from sklearn.linear_model import LogisticRegression

    def make(seed0: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        X, y = [], []
        for i in range(n):
            k = i % len(SYNTH_CLASSES)
            X.append(_features(generate_smear_image(SYNTH_CLASSES[k], np.random.default_rng([seed0, i]))))
            y.append(k)
        return np.array(X), np.array(y)

    Xtr, ytr = make(0, 240)
    Xte, yte = make(1, 120)
    clf = LogisticRegression(max_iter=2000).fit((Xtr - Xtr.mean(0)) / Xtr.std(0), ytr)
    acc = clf.score((Xte - Xtr.mean(0)) / Xtr.std(0), yte)
    assert acc > 0.5  # chance is 1/6
    # images of one class vary (stain, size, blur), so they are not copies of each other
    a = generate_smear_image("lymphocyte", np.random.default_rng([0, 1])).astype(float)
    b = generate_smear_image("lymphocyte", np.random.default_rng([0, 2])).astype(float)
    assert np.abs(a - b).mean() > 5


def test_ensure_synthetic_generates_once(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "synth-12-0"
    out = ensure_synthetic(target, n=12, seed=0, image_size=32)
    assert out == target and len(list(target.rglob("*.png"))) == 12
    stamp = (target / "other" / "other_00005.png").stat().st_mtime_ns
    ensure_synthetic(target, n=12, seed=0, image_size=32)
    assert (target / "other" / "other_00005.png").stat().st_mtime_ns == stamp  # not regenerated
    assert [p.name for p in target.parent.iterdir()] == ["synth-12-0"]  # no temp folders left
    (target / "synth.json").unlink()  # an incomplete set is rebuilt
    ensure_synthetic(target, n=12, seed=0, image_size=32)
    assert (target / "synth.json").is_file() and len(list(target.rglob("*.png"))) == 12
