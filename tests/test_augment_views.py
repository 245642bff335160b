"""Multi-view transforms: shapes, channel independence, HED math, geometry, eval transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellssl.augment.views import (
    ChannelIntensityJitter,
    HEDJitter,
    RandStainLAB,
    RGBColorJitter,
    build_eval_transform,
    build_view_transform,
    denormalize,
    lab_stain_stats,
    lab_stats,
)
from cellssl.config import DataConfig, ViewsConfig
from cellssl.data.io import scale_intensity
from cellssl.errors import ConfigError, DataError


def _img(c: int, h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, c), dtype=np.float32)


@pytest.mark.parametrize("c,modality", [(1, "fluorescence"), (3, "brightfield"), (3, "fluorescence"),
                                        (4, "fluorescence"), (6, "fluorescence")])
def test_view_shapes(c: int, modality: str) -> None:
    data = DataConfig(image_size=32, modality=modality)
    views = ViewsConfig(n_views=3, local_views=2, local_size=16, poisson_prob=0.5, elastic_prob=0.5, blur_prob=1.0,
                        noise_prob=1.0)
    out = build_view_transform(views, data, c, seed=0)(_img(c))
    assert out["views"].shape == (3, c, 32, 32) and out["views"].dtype == torch.float32
    assert out["local"].shape == (2, c, 16, 16)
    assert torch.isfinite(out["views"]).all()
    assert not torch.equal(out["views"][0], out["views"][1])  # views differ


def test_uint16_derived_input_and_2d_input() -> None:
    raw = np.random.default_rng(0).integers(100, 4000, (50, 50, 1)).astype(np.uint16)
    img = scale_intensity(raw, "auto")
    out = build_view_transform(ViewsConfig(), DataConfig(modality="fluorescence"), 1, seed=0)(img[:, :, 0])
    assert out["views"].shape == (2, 1, 64, 64) and "local" not in out


def test_wrong_channel_count_is_a_clear_error() -> None:
    t = build_view_transform(ViewsConfig(), DataConfig(), 3)
    with pytest.raises(DataError, match="3 channel"):
        t(_img(4))


def test_normalisation_uses_config_mean_std() -> None:
    data = DataConfig(image_size=16, mean=[0.2, 0.4, 0.6], std=[0.1, 0.2, 0.3])
    t = build_eval_transform(data, 3)
    img = np.ones((16, 16, 3), np.float32) * 0.5
    out = t(img)
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(out[:, 0, 0].numpy(), [3.0, 0.5, -1 / 3], rtol=1e-5)
    np.testing.assert_allclose(denormalize(out, data), img, atol=1e-6)
    with pytest.raises(DataError, match="data.mean"):
        build_eval_transform(DataConfig(mean=[0.1, 0.2]), 3)


def test_eval_transform_resizes_without_augmentation() -> None:
    data = DataConfig(image_size=24)
    t = build_eval_transform(data, 1)
    img = _img(1, 48, 48)
    a, b = t(img), t(img)
    assert a.shape == (1, 24, 24) and torch.equal(a, b)
    # area resize of 2x2 blocks = block means
    expected = img[:, :, 0].reshape(24, 2, 24, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(denormalize(a, data)[:, :, 0], expected, atol=1e-5)


def test_fluorescence_jitter_never_mixes_channels() -> None:
    img = _img(2)
    img[:, :, 1] = 0.0
    views = ViewsConfig(channel_intensity=0.5, gamma=[0.5, 2.0], blur_prob=1.0, noise_prob=0.0)
    t = build_view_transform(views, DataConfig(modality="fluorescence", image_size=32), 2, seed=1)
    for _ in range(10):
        v = t.view(img)  # before normalisation
        assert v.shape == (32, 32, 2)
        assert (v[:, :, 1] == 0).all() and v[:, :, 0].max() > 0
    # the jitter itself changes each channel by its own monotone map
    jit = ChannelIntensityJitter(0.5, (0.5, 2.0))
    jit.set_random_seed(0)
    x = np.stack([np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)] * 3, axis=2)
    y = jit(image=x)["image"]
    assert not np.allclose(y[:, :, 0], y[:, :, 1])  # independent parameters per channel
    assert all((np.diff(y[:, :, k].ravel()) >= 0).all() for k in range(3))  # monotone


def test_brightfield_uses_hed_and_colour_fluorescence_does_not() -> None:
    bf = build_view_transform(ViewsConfig(), DataConfig(modality="brightfield"), 3)
    fl = build_view_transform(ViewsConfig(), DataConfig(modality="fluorescence"), 3)
    names = lambda t: {type(x).__name__ for x in t.global_t.transforms}  # noqa: E731
    assert {"HEDJitter", "RGBColorJitter"} <= names(bf) and "ChannelIntensityJitter" not in names(bf)
    assert "ChannelIntensityJitter" in names(fl) and not {"HEDJitter", "RGBColorJitter"} & names(fl)


def test_hed_jitter_zero_is_identity_and_matches_reference() -> None:
    rgb = np.clip(_img(3, 16, 16) * 0.8 + 0.1, 0, 1)
    zero = HEDJitter(0.0)
    zero.set_random_seed(0)
    np.testing.assert_allclose(zero(image=rgb)["image"], rgb, atol=1e-6)
    # the fused implementation equals the textbook one: rgb -> HED (unclipped OD) -> a*s + b -> rgb
    from skimage.color import hed_from_rgb, rgb_from_hed

    j = HEDJitter(0.05)
    j.set_random_seed(3)
    p = j.get_params()
    od = -np.log(np.maximum(rgb.astype(np.float64), 1e-6)) @ hed_from_rgb
    ref = np.clip(np.exp(-((od * p["alpha"] + p["beta"]) @ rgb_from_hed)), 0, 1)
    out = j.apply(rgb, **p)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert np.abs(out - rgb).mean() > 1e-3  # and it does change the colours


def test_colour_jitter_identity_and_saturation() -> None:
    rgb = np.clip(_img(3, 8, 8), 0.05, 0.95)
    cj = RGBColorJitter()
    np.testing.assert_allclose(cj.apply(rgb, b=1.0, c=1.0, s=1.0, h=0.0), rgb, atol=1e-5)
    grey = cj.apply(rgb, b=1.0, c=1.0, s=0.0, h=0.0)
    assert np.abs(grey - grey.mean(axis=2, keepdims=True)).max() < 1e-5  # saturation 0 -> grey
    brighter = cj.apply(rgb * 0.5, b=1.5, c=1.0, s=1.0, h=0.0)
    np.testing.assert_allclose(brighter, rgb * 0.75, atol=1e-5)


def test_geometry_only_views_preserve_a_centred_disc() -> None:
    yy, xx = np.mgrid[0:41, 0:41]
    disc = ((yy - 20) ** 2 + (xx - 20) ** 2 < 12**2).astype(np.float32)[:, :, None]
    # geometry-only views of a disc stay discs (crop scale 1 keeps it whole)
    views = ViewsConfig(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], hed_jitter=0, color_jitter_prob=0,
                        channel_intensity=0, gamma=[1.0, 1.0], blur_prob=0, noise_prob=0)
    t = build_view_transform(views, DataConfig(image_size=41, modality="fluorescence"), 1, seed=0)
    for _ in range(4):
        assert np.abs(t.view(disc) - disc).mean() < 0.02


def test_same_seed_same_views_and_reproducible() -> None:
    img = _img(3)
    a = build_view_transform(ViewsConfig(), DataConfig(), 3, seed=7)(img)["views"]
    b = build_view_transform(ViewsConfig(), DataConfig(), 3, seed=7)(img)["views"]
    c = build_view_transform(ViewsConfig(), DataConfig(), 3, seed=8)(img)["views"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_poisson_noise_scales_with_signal() -> None:
    from cellssl.augment.views import PoissonNoise

    pn = PoissonNoise(peak_range=(100, 100), p=1.0)
    pn.set_random_seed(0)
    x = np.zeros((64, 64, 2), np.float32)
    x[:, :, 1] = 0.5
    y = pn(image=x)["image"]
    assert (y[:, :, 0] == 0).all()  # no photons, no noise
    assert abs(y[:, :, 1].mean() - 0.5) < 0.02 and 0.05 < y[:, :, 1].std() < 0.1  # sqrt(50)/100


# ----- views that survive a change of lab (issue 20 §4) -----------------------------------------
def _smear(size: int = 48, radius: int = 10) -> np.ndarray:
    """A pink-purple cell (disc) centred on a light background, float32 RGB."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = (0.92, 0.86, 0.88)
    yy, xx = np.mgrid[:size, :size]
    img[(yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= radius**2] = (0.45, 0.25, 0.55)
    return img


def _geometry_only(**kw) -> ViewsConfig:
    return ViewsConfig(hed_jitter=0.0, color_jitter_prob=0.0, blur_prob=0.0, noise_prob=0.0, **kw)


def test_grayscale_view_has_equal_channels() -> None:
    t = build_view_transform(_geometry_only(grayscale_p=1.0), DataConfig(image_size=32), 3, seed=0)
    v = t.view(_smear())
    np.testing.assert_allclose(v[:, :, 0], v[:, :, 1], atol=1e-6)
    np.testing.assert_allclose(v[:, :, 0], v[:, :, 2], atol=1e-6)
    off = build_view_transform(_geometry_only(), DataConfig(image_size=32), 3, seed=0).view(_smear())
    assert np.abs(off[:, :, 0] - off[:, :, 2]).max() > 0.05  # default: colour kept


def test_zoom_out_shrinks_the_cell_and_keeps_it_inside() -> None:
    img = _smear(48, 10)
    size = 48
    base = _geometry_only(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], rotate=False, flip=False)
    zoom = _geometry_only(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], rotate=True, flip=True,
                          zoom_out_p=1.0, zoom_out_max=2.0)
    area0 = (build_view_transform(base, DataConfig(image_size=size), 3, seed=0).view(img)[:, :, 1] < 0.5).sum()
    t = build_view_transform(zoom, DataConfig(image_size=size), 3, seed=0)
    areas = []
    for _ in range(20):
        cell = t.view(img)[:, :, 1] < 0.5
        areas.append(cell.sum())
        edge = np.concatenate([cell[0], cell[-1], cell[:, 0], cell[:, -1]])
        assert cell.sum() > 0 and not edge.any()  # the whole cell is in the view
        v = t.view(img)
        assert np.abs(v[0, 0] - img[0, 0]).max() < 0.02  # the margin is the background, not a mirrored cell
    assert max(areas) < area0 and min(areas) > area0 / 2.0**2 * 0.8  # shrunk by 1..2x in side
    assert np.mean(areas) < 0.8 * area0


def test_zoom_out_off_keeps_the_random_stream() -> None:
    a = build_view_transform(ViewsConfig(), DataConfig(image_size=32), 3, seed=3)
    b = build_view_transform(ViewsConfig(zoom_out_max=3.0), DataConfig(image_size=32), 3, seed=3)
    img = _img(3)
    assert torch.equal(a(img)["views"], b(img)["views"])  # p = 0: the same views as before the option


def test_randstain_moves_lab_statistics_to_the_sampled_target() -> None:
    img = _smear(48, 12)
    mean, sigma = lab_stain_stats([img, _smear(48, 8)])
    assert len(mean) == len(sigma) == 6
    target_mean = [70.0, 25.0, -10.0, 20.0, 12.0, 10.0]
    t = RandStainLAB(target_mean, [0.0] * 6, std=1.0, p=1.0)  # no spread: the target itself
    out = t(image=img)["image"]
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    before, after = lab_stats(img), lab_stats(out)
    assert np.all(np.abs(after - target_mean) < np.abs(before - target_mean))
    np.testing.assert_allclose(after[:3], target_mean[:3], atol=3.0)  # means reached (up to RGB clipping)
    spread = RandStainLAB(target_mean, [2.0] * 6, std=1.0, p=1.0)
    spread.set_random_seed(0)
    outs = [lab_stats(spread(image=img)["image"]) for _ in range(30)]
    assert np.std([o[0] for o in outs]) > 0.5  # a different style per view


def test_lab_options_inside_the_multi_view_transform() -> None:
    views = ViewsConfig(n_views=4, grayscale_p=0.5, randstain_p=0.5, zoom_out_p=0.5, randstain_std=2.0)
    t = build_view_transform(views, DataConfig(image_size=32), 3, seed=0)
    out = t(_smear())
    assert out["views"].shape == (4, 3, 32, 32) and torch.isfinite(out["views"]).all()


@pytest.mark.parametrize("key", ["grayscale_p", "randstain_p"])
def test_rgb_only_views_are_refused_for_fluorescence(key: str) -> None:
    with pytest.raises(ConfigError, match=f"views.{key}=0.5 applies to bright-field RGB images only.*views.{key}=0"):
        build_view_transform(ViewsConfig(**{key: 0.5}), DataConfig(modality="fluorescence"), 2)
    build_view_transform(ViewsConfig(zoom_out_p=0.5), DataConfig(modality="fluorescence"), 2)  # zoom: any channels


def test_local_crops_never_zoom_out() -> None:
    views = ViewsConfig(zoom_out_p=1.0, local_views=2, local_size=16, local_scale=[0.2, 0.2])
    t = build_view_transform(views, DataConfig(image_size=32), 3, seed=0)
    assert t.global_t.transforms[0].zoom_out_p == 1.0 and t.local_t.transforms[0].zoom_out_p == 0.0
