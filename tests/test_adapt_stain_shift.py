"""Stain normalisation (Macenko, Reinhard via torchstain) and the simulated scanner shift."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellssl.adapt.shift import PRESETS, ShiftPreset, apply_shift, shift_folder
from cellssl.data.stain import StainNormalizer, StainWarning, build_stain_normalizer, normalize_folder, stain_statistics
from cellssl.errors import ConfigError
from conftest import run_cli


def smear(seed: int = 0, size: int = 32) -> np.ndarray:
    """A Wright-Giemsa-like crop built in HED space (pale background, purple nuclei in pink
    cytoplasm, smooth two-stain mixtures), uint8 RGB."""
    from skimage.color import hed2rgb

    rng = np.random.default_rng(seed)
    hed = np.zeros((size, size, 3))
    hed[..., 0], hed[..., 1] = 0.002, 0.002
    yy, xx = np.mgrid[:size, :size]
    for _ in range(4):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(size / 10, size / 5)
        hed[..., 0] += 0.09 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r))  # haematoxylin nucleus
        cy, cx = cy + rng.normal(0, r), cx + rng.normal(0, r)
        hed[..., 1] += 0.06 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (1.8 * r) ** 2))  # eosin
    hed[..., :2] *= 1 + 0.05 * rng.standard_normal((size, size, 2))
    return (np.clip(hed2rgb(hed), 0, 1) * 255 + 0.5).astype(np.uint8)


def smear_folder(root: Path, n: int = 4, classes=("a", "b"), size: int = 32, suffix: str = ".png") -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(smear(100 * c + i, size)).save(root / name / f"{name}_{i}{suffix}")
    return root


def _dist(a: np.ndarray, b: np.ndarray, key: str) -> float:
    return float(np.linalg.norm(stain_statistics(a)[key] - stain_statistics(b)[key]))


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normaliser_maps_reference_to_itself_and_shifted_towards_reference(tmp_path, method):
    ref = smear(0, 48)
    ref_path = tmp_path / "ref.png"
    Image.fromarray(ref).save(ref_path)
    norm = build_stain_normalizer(method, ref_path)
    norm = pickle.loads(pickle.dumps(norm))  # DataLoader workers
    f = ref.astype(np.float32) / 255
    same = norm(f)
    assert same.shape == f.shape and same.dtype == np.float32 and 0 <= same.min() and same.max() <= 1
    assert np.abs(same - f).mean() < (0.03 if method == "macenko" else 0.01)
    # A pure stain change (another lab's staining), as scanner_b's stain step but stronger.
    shifted = apply_shift(ref, ShiftPreset(h_scale=1.5, e_scale=0.5, e_offset=0.01), np.random.default_rng(0))
    after = (norm(shifted.astype(np.float32) / 255) * 255).round().astype(np.uint8)
    for key in ("od_mean", "lab_mean"):
        assert _dist(after, ref, key) < _dist(shifted, ref, key), key


def test_blank_image_falls_back_to_identity_with_warning(tmp_path):
    ref = tmp_path / "ref.png"
    Image.fromarray(smear(0)).save(ref)
    for method in ("macenko", "reinhard"):
        norm = build_stain_normalizer(method, ref)
        blank = np.ones((16, 16, 3), np.float32)
        with pytest.warns(StainWarning, match="left unchanged"):
            out = norm(blank)
        assert np.array_equal(out, blank) and norm.n_fallback == 1


def test_folder_reference_and_normalize_folder(tmp_path):
    src = smear_folder(tmp_path / "src", suffix=".jpg")
    ref = smear_folder(tmp_path / "ref", n=3)
    norm = StainNormalizer("reinhard", ref)
    assert norm(smear(5).astype(np.float32) / 255).shape == (32, 32, 3)
    n = normalize_folder(src, tmp_path / "out", ref, method="macenko")
    assert n == 8
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.jpg"))
    assert written == sorted(p.relative_to(src).as_posix() for p in src.rglob("*.jpg"))
    with pytest.raises(ConfigError, match="reference"):
        build_stain_normalizer("macenko", None)
    with pytest.raises(ConfigError, match="unknown stain"):
        build_stain_normalizer("vahadane", ref)


def test_build_dataset_uses_the_stain_hook(tmp_path):
    from cellssl.config import DataConfig
    from cellssl.data.datasets import build_dataset

    src = smear_folder(tmp_path / "src", n=2)
    ds = build_dataset(DataConfig(stain_normalize="reinhard", stain_reference=str(src / "a" / "a_0.png")), src)
    img, _ = ds[0]
    assert img.dtype == np.float32 and img.shape == (32, 32, 3)
    assert np.abs(img - ds._read(0, 3)).mean() < 0.01  # a_0 is the reference itself


def test_shift_folder_is_deterministic_keeps_layout_and_changes_stain(tmp_path):
    src = smear_folder(tmp_path / "src", n=3, classes=("x", "y", "z"))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert shift_folder(src, a, seed=0) == 9
    shift_folder(src, b, seed=0)
    shift_folder(src, c, seed=1)
    files = sorted(p.relative_to(src) for p in src.rglob("*.png"))
    assert sorted(p.relative_to(a) for p in a.rglob("*.png")) == files
    assert sorted(d.name for d in a.iterdir()) == ["x", "y", "z"]
    same = all(np.array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(b / f))) for f in files)
    diff = any(not np.array_equal(np.asarray(Image.open(a / f)), np.asarray(Image.open(c / f))) for f in files)
    assert same and diff
    for f in files:
        orig, sh = np.asarray(Image.open(src / f)), np.asarray(Image.open(a / f))
        assert sh.shape == orig.shape and sh.dtype == np.uint8
        assert _dist(sh, orig, "od_mean") > 0.04 and _dist(sh, orig, "lab_mean") > 1.5


def test_presets_registry_and_grey_images():
    assert {"scanner_b", "scanner_c"} <= set(PRESETS)
    imgs = [smear(s) for s in range(6)]
    def change(x, name):
        return np.abs(apply_shift(x, name, np.random.default_rng(0)).astype(float) - x).mean()

    strong = np.mean([change(x, "scanner_b") for x in imgs])
    mild = np.mean([change(x, "scanner_c") for x in imgs])
    assert mild < strong
    img = imgs[0]
    grey = apply_shift(img[..., 0], "scanner_b", np.random.default_rng(0))
    assert grey.shape == img.shape[:2] and grey.dtype == np.uint8
    with pytest.raises(ConfigError, match="scanner_b"):
        apply_shift(img, "scanner_x")


def test_cli_shift_and_stain_normalize(tmp_path, capsys):
    src = smear_folder(tmp_path / "src", n=2)
    code, out, err = run_cli(capsys, "datasets", "shift", str(src), str(tmp_path / "sh"), "--preset", "scanner_c")
    assert code == 0 and "wrote 4 shifted images" in out, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, err = run_cli(capsys, "stain-normalize", str(tmp_path / "sh"), str(tmp_path / "nm"),
                                 "--reference", str(src), "--method", "reinhard")
    assert code == 0 and "wrote 4 normalised images" in out, err


def test_grey_file_is_skipped_by_name_and_output_appears_only_when_complete(tmp_path, monkeypatch, capsys):
    """A grey JPEG among RGB images: skipped with a warning naming it, the rest written; the output
    folder appears only when complete (an interrupted run leaves nothing); an existing one is kept."""
    import cellssl.data.stain as stain_mod
    from cellssl.cli import main

    src = smear_folder(tmp_path / "src", n=3, suffix=".jpg")
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(src / "a" / "grey.jpg")
    out = tmp_path / "out"
    with pytest.warns(StainWarning) as record:
        main(["stain-normalize", str(src), str(out), "--reference", str(src / "b"), "--method", "reinhard"])
    assert "wrote 6 normalised images" in capsys.readouterr().out
    text = " ".join(str(w.message) for w in record)
    assert "grey.jpg" in text and "1 channel" in text
    assert "data.stain_normalize" not in text  # no recipe key of another command
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == \
        sorted(p.relative_to(src).as_posix() for p in src.rglob("*.jpg") if p.name != "grey.jpg")

    calls = {"n": 0}
    save_like = stain_mod._save_like

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        save_like(*args)

    monkeypatch.setattr(stain_mod, "_save_like", interrupted)
    with warnings.catch_warnings(), pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("ignore")
        normalize_folder(src, tmp_path / "cut", src / "b", method="reinhard")
    assert calls["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no half-written folder, no temp left

    with pytest.raises(ConfigError, match="already exists"):
        normalize_folder(src, out, src / "b", method="reinhard")
