"""Multi-view augmentation for cell images (albumentations + a vectorised HED stain jitter).

A view is: a random resized crop that keeps most of the cell, rotation by any angle with
reflected borders and flips (cells have no "up"), then appearance changes that depend on the
modality. Bright-field RGB (Wright-Giemsa, H&E): stain jitter in HED optical-density space, a
colour jitter, and (off by default) RandStainNA-style re-staining in LAB and random greyscale.
Fluorescence or any non-RGB channel count: an independent gain and gamma per channel, never mixing
channels. Then blur, Gaussian / Poisson noise, optional elastic warping,
and per-channel normalisation to a (C, S, S) float32 tensor.

Input everywhere: float32 (H, W, C) arrays in [0, 1] (what :func:`cellssl.data.io.read_image`
returns). Output of :class:`MultiViewTransform`: ``{"views": (M, C, S, S)}`` plus
``{"local": (L, C, s, s)}`` when local views are configured.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch

from cellssl.config import DataConfig, ViewsConfig
from cellssl.errors import ConfigError, DataError

# --- HED colour deconvolution (the matrices of skimage.color) --------------------------------
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_HED_F32 = HED_FROM_RGB.astype(np.float32)
_RGB_F32 = RGB_FROM_HED.astype(np.float32)


class HEDJitter(A.ImageOnlyTransform):
    """Stain jitter (Tellez et al. 2018): per stain channel s of H, E, D optical density,
    ``s' = s * a + b`` with ``a ~ 1 + N(0, sigma)`` and ``b ~ N(0, sigma)``; sigma=0 is identity.
    Input/output: float32 RGB (H, W, 3) in [0, 1]."""

    def __init__(self, sigma: float = 0.04, p: float = 1.0):
        super().__init__(p=p)
        self.sigma = float(sigma)

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        return {
            "alpha": (1.0 + rng.normal(0.0, self.sigma, 3)).astype(np.float32),
            "beta": rng.normal(0.0, self.sigma, 3).astype(np.float32),
        }

    def apply(self, img: np.ndarray, alpha: np.ndarray, beta: np.ndarray, **_: Any) -> np.ndarray:
        if self.sigma == 0:
            return img
        # (od @ H^-1 * a + b) @ H == od @ (H^-1 diag(a) H) + b @ H: one 3x3 product per pixel
        mat = (_HED_F32 * alpha[None, :]) @ _RGB_F32
        offset = beta @ _RGB_F32
        od = np.log(np.maximum(img, 1e-6, dtype=np.float32))  # = -OD
        # cv2.transform applies a per-pixel 3x4 affine map (rows = output channels)
        affine = np.concatenate([mat.T, -offset[:, None]], axis=1).astype(np.float32)
        out = np.exp(cv2.transform(od, affine))
        return np.clip(out, 0.0, 1.0, out=out)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("sigma",)


class ChannelIntensityJitter(A.ImageOnlyTransform):
    """Independent per-channel gamma then gain: ``x_c' = clip(gain_c * x_c ** gamma_c, 0, 1)``,
    gain ~ U(1 - strength, 1 + strength), log gamma ~ U(log g0, log g1). Channels never mix, so a
    channel that is all zero stays zero. Input/output float32 (H, W, C)."""

    def __init__(self, strength: float = 0.25, gamma: Sequence[float] = (0.8, 1.25), p: float = 1.0):
        super().__init__(p=p)
        self.strength = float(strength)
        self.gamma = (float(gamma[0]), float(gamma[1]))

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        c = data["image"].shape[2] if data["image"].ndim == 3 else 1
        rng = self.random_generator
        gain = rng.uniform(1 - self.strength, 1 + self.strength, c).astype(np.float32)
        lg = np.log(np.clip(self.gamma, 1e-3, None))
        gamma = np.exp(rng.uniform(lg[0], lg[1], c)).astype(np.float32)
        return {"gain": gain, "gamma": gamma}

    def apply(self, img: np.ndarray, gain: np.ndarray, gamma: np.ndarray, **_: Any) -> np.ndarray:
        out = np.power(np.clip(img, 0.0, 1.0), gamma.reshape(1, 1, -1)) * gain.reshape(1, 1, -1)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("strength", "gamma")


class AdditiveGaussianNoise(A.ImageOnlyTransform):
    """Adds N(0, std) noise (same std for all channels, independent per pixel); clips to [0, 1].

    The noise is a random window of a fixed bank of 2**20 standard normals (fast; any window is
    i.i.d. N(0, 1) noise)."""

    _BANK = np.random.default_rng(12345).standard_normal(2**20, dtype=np.float32)

    def __init__(self, std: float = 0.02, p: float = 0.5):
        super().__init__(p=p)
        self.std = float(std)

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        return {"offset": int(rng.integers(2**20)), "sign": float(rng.choice((-1.0, 1.0)))}

    def apply(self, img: np.ndarray, offset: int, sign: float, **_: Any) -> np.ndarray:
        n = img.size
        bank = self._BANK
        if n > bank.size:
            noise = np.random.default_rng(offset).standard_normal(n, dtype=np.float32)
        else:
            offset %= bank.size - n + 1
            noise = bank[offset : offset + n]
        out = img + (sign * self.std) * noise.reshape(img.shape)
        return np.clip(out, 0.0, 1.0, out=out)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("std",)


def _warp(img: np.ndarray, mat: np.ndarray, size: tuple[int, int], flags: int,
          border: np.ndarray | None = None) -> np.ndarray:
    """cv2.warpAffine for any channel count; (H, W, C) -> (h, w, C). Outside the image the borders
    are reflected, or filled with the per-channel colour ``border`` (C,) when it is given."""

    def one(x: np.ndarray, k: int) -> np.ndarray:
        extra: dict[str, Any] = {"borderMode": cv2.BORDER_REFLECT_101}
        if border is not None:
            extra = {"borderMode": cv2.BORDER_CONSTANT,
                     "borderValue": tuple(float(v) for v in border[k : k + x.shape[2]]) + (0.0,) * (4 - x.shape[2])}
        y = cv2.warpAffine(np.ascontiguousarray(x), mat, size, flags=flags, **extra)
        return y[:, :, None] if y.ndim == 2 else y

    c = img.shape[2]
    if c <= 4:
        return one(img, 0)
    return np.concatenate([one(img[:, :, k : k + 4], k) for k in range(0, c, 4)], axis=2)


def border_colour(img: np.ndarray) -> np.ndarray:
    """The background colour of a crop: the per-channel median of its outermost pixels, (C,) float32
    (the slide around a centred cell)."""
    edge = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]], axis=0)  # (n, C)
    return np.median(edge, axis=0).astype(np.float32)


class RandomResizedCropRotateFlip(A.ImageOnlyTransform):
    """Random resized crop (area fraction ``scale``, aspect ``ratio``, as torchvision) rotated by
    a uniform angle about its centre and optionally mirrored, resampled in ONE bilinear warp to
    (size, size); outside the image the borders are reflected. Input (H, W, C) -> (size, size, C).
    Doing crop, resize, rotation and flips in one warp is ~4x faster than four separate steps.

    Zoom out (scale jitter below 1x): with probability ``zoom_out_p`` the crop is instead a square
    ``z`` times the image's longer side, ``log z ~ U(0, log zoom_out_max)``, placed at random so that
    the whole (unrotated) image lies inside it: the cell shrinks to 1/z of its size and stays in the
    view (a centred cell also after rotation), and the margin is filled with the background colour
    (:func:`border_colour`), never with mirrored copies of the cell."""

    def __init__(self, size: int, scale: Sequence[float] = (0.5, 1.0), ratio: Sequence[float] = (0.8, 1.25),
                 rotate: bool = True, flip: bool = True, zoom_out_p: float = 0.0, zoom_out_max: float = 1.5,
                 p: float = 1.0):
        super().__init__(p=p)
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.rotate, self.flip = bool(rotate), bool(flip)
        self.zoom_out_p, self.zoom_out_max = float(zoom_out_p), float(zoom_out_max)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = data["image"].shape[:2]
        rng = self.random_generator
        ch = cw = float(min(h, w))  # fallback: the largest centred square
        zoom_out = self.zoom_out_p > 0 and rng.random() < self.zoom_out_p
        if zoom_out:
            ch = cw = float(max(h, w)) * float(np.exp(rng.uniform(0.0, np.log(max(self.zoom_out_max, 1.0)))))
        for _ in range(0 if zoom_out else 10):
            area = h * w * rng.uniform(*self.scale)
            r = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
            tw, th = np.sqrt(area * r), np.sqrt(area / r)
            if tw <= w and th <= h:
                cw, ch = tw, th
                break
        if zoom_out:  # the image lies inside the crop
            cx, cy = rng.uniform(w - cw / 2, cw / 2), rng.uniform(h - ch / 2, ch / 2)
        else:  # the crop lies inside the image
            cx = rng.uniform(cw / 2, w - cw / 2) if w > cw else w / 2
            cy = rng.uniform(ch / 2, h - ch / 2) if h > ch else h / 2
        angle = rng.uniform(-np.pi, np.pi) if self.rotate else 0.0
        fx = -1.0 if self.flip and rng.random() < 0.5 else 1.0
        fy = -1.0 if self.flip and not self.rotate and rng.random() < 0.5 else 1.0  # rotation covers the other flip
        return {"cx": cx, "cy": cy, "cw": cw, "ch": ch, "angle": angle, "fx": fx, "fy": fy, "zoom_out": zoom_out}

    def apply(self, img: np.ndarray, cx: float, cy: float, cw: float, ch: float, angle: float, fx: float, fy: float,
              zoom_out: bool = False, **_: Any) -> np.ndarray:
        s = self.size
        c, si = np.cos(angle), np.sin(angle)
        lin = np.array([[c, -si], [si, c]]) @ np.diag([cw / s * fx, ch / s * fy])  # output offset -> source offset
        shift = np.array([cx - 0.5, cy - 0.5]) - lin @ np.array([s / 2 - 0.5, s / 2 - 0.5])
        mat = np.concatenate([lin, shift[:, None]], axis=1)
        return _warp(img, mat, (s, s), cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                     border=border_colour(img) if zoom_out else None)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "scale", "ratio", "rotate", "flip", "zoom_out_p", "zoom_out_max")


class RGBColorJitter(A.ImageOnlyTransform):
    """Brightness, contrast, saturation and hue jitter for float32 RGB (H, W, 3), as one affine
    colour map: brightness b (multiply), contrast c (blend with the mean luminance), saturation s
    (blend with the per-pixel luminance), hue h (rotation by 2*pi*h of the chroma plane in YIQ,
    a linear stand-in for an HSV hue shift). Factors: b, c, s ~ U(1 - x, 1 + x), h ~ U(-x, x)."""

    _LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    _RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64)
    _YIQ2RGB = np.linalg.inv(_RGB2YIQ)

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.15, hue: float = 0.03,
                 p: float = 0.8):
        super().__init__(p=p)
        self.brightness, self.contrast, self.saturation, self.hue = map(float, (brightness, contrast, saturation, hue))

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        b = rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)
        c = rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)
        s = rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)
        h = rng.uniform(-self.hue, self.hue)
        return {"b": b, "c": c, "s": s, "h": h}

    def apply(self, img: np.ndarray, b: float, c: float, s: float, h: float, **_: Any) -> np.ndarray:
        a = 2 * np.pi * h
        rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        yiq = self._RGB2YIQ
        # column-vector map: rgb -> yiq, scale chroma by s, rotate hue, back to rgb
        m = (b * c) * (self._YIQ2RGB @ rot @ np.diag([1.0, s, s]) @ yiq)
        luma_mean = float(np.dot(cv2.mean(img)[:3], self._LUMA)) * b
        affine = np.concatenate([m, np.full((3, 1), (1 - c) * luma_mean)], axis=1).astype(np.float32)
        out = cv2.transform(img, affine)
        return np.clip(out, 0.0, 1.0, out=out)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast", "saturation", "hue")


def lab_stats(img: np.ndarray) -> np.ndarray:
    """Per-channel mean and std of an RGB image in CIE LAB (OpenCV's float scale: L in [0, 100],
    a and b about [-127, 127]): float64 (6,) = (mean L, a, b, std L, a, b). Input float32 (H, W, 3) in [0, 1]."""
    lab = cv2.cvtColor(np.ascontiguousarray(img, dtype=np.float32), cv2.COLOR_RGB2Lab)
    mean, std = cv2.meanStdDev(lab)
    return np.concatenate([mean.ravel(), std.ravel()])


def lab_stain_stats(images: Sequence[np.ndarray]) -> tuple[list[float], list[float]]:
    """Dataset-typical stain statistics for :class:`RandStainLAB`: the mean over ``images`` of
    :func:`lab_stats` and its spread (std over images), two lists of 6 floats: what
    ``views.randstain_mean`` and ``views.randstain_sigma`` hold. Images: float32 RGB (H, W, 3) in [0, 1]."""
    st = np.stack([lab_stats(im) for im in images])
    return [round(float(v), 2) for v in st.mean(axis=0)], [round(float(v), 2) for v in st.std(axis=0)]


class RandStainLAB(A.ImageOnlyTransform):
    """RandStainNA-style stain augmentation (Shen et al., MICCAI 2022, arXiv:2206.12694): sample a
    target stain style and re-normalise the image to it in CIE LAB (Reinhard's transfer).

    Per view, target ``t = mean + randstain_std * sigma * N(0, I)`` over the 6 statistics (LAB means,
    LAB stds; each std kept at least half its typical value, so that no view loses its contrast),
    then per channel k of L, a, b: ``x_k' = (x_k - mu_k) / sd_k * t_std_k + t_mean_k`` with
    ``mu, sd`` the image's own statistics, and back to RGB, clipped to [0, 1].
    ``mean`` and ``sigma`` describe the per-image statistics of a typical training set (what
    :func:`lab_stain_stats` measures); ``std`` > 1 reaches stain styles further from it, as a
    second lab's. Written with cv2.cvtColor (float32 LAB) rather than torchstain's Reinhard
    normaliser, which quantises to uint8, fits one fixed target and converts in slow NumPy.
    Input/output float32 RGB (H, W, 3) in [0, 1]."""

    def __init__(self, mean: Sequence[float], sigma: Sequence[float], std: float = 1.0, p: float = 0.5):
        super().__init__(p=p)
        self.mean = np.asarray(mean, np.float64).reshape(6)
        self.sigma = np.asarray(sigma, np.float64).reshape(6)
        self.std = float(std)

    def get_params(self) -> dict[str, Any]:
        target = self.mean + self.std * self.sigma * self.random_generator.standard_normal(6)
        target[3:] = np.maximum(target[3:], 0.5 * self.mean[3:])  # never a view without contrast
        return {"target": target}

    def apply(self, img: np.ndarray, target: np.ndarray, **_: Any) -> np.ndarray:
        lab = cv2.cvtColor(np.ascontiguousarray(img, dtype=np.float32), cv2.COLOR_RGB2Lab)
        mu, sd = (v.ravel() for v in cv2.meanStdDev(lab))
        gain = target[3:] / np.maximum(sd, 1e-3)
        # x' = x * gain + (t_mean - mu * gain) per channel: one 3x4 affine map, rows = output channels
        affine = np.concatenate([np.diag(gain), (target[:3] - mu * gain)[:, None]], axis=1).astype(np.float32)
        lab = cv2.transform(lab, affine)
        np.clip(lab[:, :, 0], 0.0, 100.0, out=lab[:, :, 0])
        out = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)
        return np.clip(out, 0.0, 1.0, out=out)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("mean", "sigma", "std")


class PoissonNoise(A.ImageOnlyTransform):
    """Shot noise: ``x' = Poisson(x * peak) / peak`` with ``peak`` (photons at full scale) drawn
    log-uniformly from ``peak_range``. Input/output float32 (H, W, C) in [0, 1]."""

    def __init__(self, peak_range: Sequence[float] = (30.0, 300.0), p: float = 0.5):
        super().__init__(p=p)
        self.peak_range = (float(peak_range[0]), float(peak_range[1]))

    def get_params(self) -> dict[str, Any]:
        lo, hi = np.log(self.peak_range)
        return {"peak": float(np.exp(self.random_generator.uniform(lo, hi))),
                "seed": int(self.random_generator.integers(2**31))}

    def apply(self, img: np.ndarray, peak: float, seed: int, **_: Any) -> np.ndarray:
        counts = np.random.default_rng(seed).poisson(np.clip(img, 0, 1) * peak)
        return np.clip(counts.astype(np.float32) / peak, 0.0, 1.0)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("peak_range",)


# --- building the pipeline -------------------------------------------------------------------
def channel_stats(data: DataConfig, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) arrays of shape (C,) from ``data.mean``/``data.std`` (default 0.5/0.25)."""

    def expand(values: Sequence[float] | None, default: float, name: str) -> np.ndarray:
        if values is None:
            return np.full(channels, default, np.float32)
        v = np.asarray(values, np.float32).reshape(-1)
        if v.size == 1:
            return np.full(channels, float(v[0]), np.float32)
        if v.size != channels:
            raise DataError(f"data.{name} has {v.size} values but the images have {channels} channel(s): "
                            "give one value per channel")
        return v

    mean, std = expand(data.mean, 0.5, "mean"), expand(data.std, 0.25, "std")
    if (std <= 0).any():
        raise DataError(f"data.std must be positive, got {list(std)}")
    return mean, std


def to_tensor(img: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """(H, W, C) float32 -> normalised (C, H, W) float32 tensor: (x - mean) / std per channel."""
    if img.ndim == 2:
        img = img[:, :, None]
    x = np.empty((img.shape[2], img.shape[0], img.shape[1]), np.float32)
    np.subtract(img.transpose(2, 0, 1), mean[:, None, None], out=x)
    x *= (1.0 / std)[:, None, None]
    return torch.from_numpy(x)


def is_brightfield_rgb(data: DataConfig, channels: int) -> bool:
    """Bright-field colour recipe applies: modality brightfield and three channels."""
    return data.modality == "brightfield" and channels == 3


RGB_ONLY = ("grayscale_p", "randstain_p")  # views values that only bright-field RGB images can use


def check_rgb_only(views: ViewsConfig, data: DataConfig, channels: int) -> None:
    """ConfigError when a colour-only augmentation (:data:`RGB_ONLY`) is switched on for images that
    are not bright-field RGB (fluorescence, greyscale, multi-channel): it has no meaning there."""
    if is_brightfield_rgb(data, channels):
        return
    on = [f"views.{k}={getattr(views, k):g}" for k in RGB_ONLY if getattr(views, k) > 0]
    if on:
        raise ConfigError(f"{', '.join(on)} applies to bright-field RGB images only, but these are "
                          f"{data.modality} with {channels} channel(s): set {on[0].split('=')[0]}=0")


def _view_pipeline(views: ViewsConfig, data: DataConfig, channels: int, size: int, scale: Sequence[float],
                   zoom_out: bool = True) -> A.Compose:
    """albumentations pipeline for one view at ``size`` px (geometry at output size, then appearance,
    then blur and noise); ``zoom_out=False`` (local crops: small parts of the cell by definition) never
    zooms out."""
    return A.Compose([*_geometry(views, size, scale, zoom_out), *_appearance(views, data, channels),
                      *_degradation(views)], strict=False)


def _geometry(views: ViewsConfig, size: int, scale: Sequence[float], zoom_out: bool) -> list[A.BasicTransform]:
    """Crop (or zoom out), rotate, flip to ``size`` px; elastic deformation."""
    t: list[A.BasicTransform] = [
        RandomResizedCropRotateFlip(size, scale, views.crop_ratio, rotate=views.rotate, flip=views.flip,
                                    zoom_out_p=views.zoom_out_p if zoom_out else 0.0, zoom_out_max=views.zoom_out_max),
    ]
    if views.elastic_prob > 0:
        t.append(A.ElasticTransform(alpha=size * 0.5, sigma=size * 0.08, border_mode=cv2.BORDER_REFLECT_101,
                                    p=views.elastic_prob))
    return t


def _appearance(views: ViewsConfig, data: DataConfig, channels: int) -> list[A.BasicTransform]:
    """Stain and colour of bright-field RGB images; per-channel intensity and gamma of the others."""
    t: list[A.BasicTransform] = []
    if not is_brightfield_rgb(data, channels):
        if views.channel_intensity > 0 or tuple(views.gamma) != (1.0, 1.0):
            t.append(ChannelIntensityJitter(views.channel_intensity, views.gamma, p=1.0))
        return t
    if views.randstain_p > 0:
        t.append(RandStainLAB(views.randstain_mean, views.randstain_sigma, views.randstain_std, p=views.randstain_p))
    if views.hed_jitter > 0:
        t.append(HEDJitter(views.hed_jitter, p=1.0))
    if views.color_jitter_prob > 0:
        t.append(RGBColorJitter(views.brightness, views.contrast, views.saturation, views.hue,
                                p=views.color_jitter_prob))
    if views.grayscale_p > 0:  # luminance (0.299 R + 0.587 G + 0.114 B) in all three channels
        t.append(A.ToGray(num_output_channels=3, method="weighted_average", p=views.grayscale_p))
    return t


def _degradation(views: ViewsConfig) -> list[A.BasicTransform]:
    """Blur, additive Gaussian and Poisson noise."""
    t: list[A.BasicTransform] = []
    if views.blur_prob > 0:
        t.append(A.GaussianBlur(blur_limit=0, sigma_limit=tuple(views.blur_sigma), p=views.blur_prob))
    if views.noise_prob > 0 and views.noise_std > 0:
        t.append(AdditiveGaussianNoise(views.noise_std, p=views.noise_prob))
    if views.poisson_prob > 0:
        t.append(PoissonNoise(p=views.poisson_prob))
    return t


class MultiViewTransform:
    """Callable: float32 (H, W, C) in [0, 1] -> ``{"views": Tensor (M, C, S, S)}`` and, when
    ``views.local_views > 0``, ``{"local": Tensor (L, C, s, s)}`` (s = ``views.local_size``).

    Random state is private to the transform (``seed``) and re-seeded from
    ``torch.initial_seed()`` inside each DataLoader worker, so workers never repeat each other.
    """

    def __init__(self, views: ViewsConfig, data: DataConfig, channels: int, seed: int | None = None):
        self.views_cfg, self.data_cfg, self.channels = views, data, int(channels)
        self.size = int(data.image_size)
        self.n_views = int(views.n_views)
        self.n_local = int(views.local_views)
        self.mean, self.std = channel_stats(data, self.channels)
        check_rgb_only(views, data, self.channels)
        self.global_t = _view_pipeline(views, data, self.channels, self.size, views.crop_scale)
        self.local_t = (
            _view_pipeline(views, data, self.channels, int(views.local_size), views.local_scale, zoom_out=False)
            if self.n_local else None
        )
        self.seed = seed
        self._seed_key: tuple[int, int | None] | None = None
        self._reseed(seed)

    def _reseed(self, seed: int | None) -> None:
        self.global_t.set_random_seed(seed)
        if self.local_t is not None:
            self.local_t.set_random_seed(None if seed is None else seed + 1)
        self._seed_key = (os.getpid(), None)

    def set_seed(self, seed: int) -> None:
        """Seed all randomness of the next calls (the engine does this per (epoch, image) so that
        views do not depend on worker count or on where a resumed run restarted)."""
        self._reseed(int(seed))
        info = torch.utils.data.get_worker_info()
        self._seed_key = (os.getpid(), info.seed if info is not None else None)

    def _maybe_reseed_worker(self) -> None:
        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), info.seed if info is not None else None)
        if info is not None and key != self._seed_key:
            base = 0 if self.seed is None else self.seed
            self._reseed(int((info.seed + 7919 * base) % (2**31)))
            self._seed_key = key

    def _check(self, img: np.ndarray) -> np.ndarray:
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3 or img.shape[2] != self.channels:
            raise DataError(f"view transform built for {self.channels} channel(s) got an image of shape {img.shape}")
        return np.ascontiguousarray(img, dtype=np.float32)

    def view(self, img: np.ndarray, local: bool = False) -> np.ndarray:
        """One augmented view as float32 (S, S, C) in [0, 1] before normalisation."""
        out = (self.local_t if local else self.global_t)(image=img)["image"]
        return out[:, :, None] if out.ndim == 2 else out

    def one_view(self, img: np.ndarray) -> torch.Tensor:
        """One augmented, normalised global view ``(C, S, S)`` (what fine-tuning trains on)."""
        self._maybe_reseed_worker()
        return to_tensor(self.view(self._check(img)), self.mean, self.std)

    def __call__(self, img: np.ndarray) -> dict[str, torch.Tensor]:
        self._maybe_reseed_worker()
        img = self._check(img)
        out = {"views": torch.stack([to_tensor(self.view(img), self.mean, self.std) for _ in range(self.n_views)])}
        if self.n_local:
            out["local"] = torch.stack([to_tensor(self.view(img, True), self.mean, self.std)
                                        for _ in range(self.n_local)])
        return out

    def __repr__(self) -> str:
        return f"MultiViewTransform(M={self.n_views}, L={self.n_local}, C={self.channels}, S={self.size})"


def build_view_transform(views: ViewsConfig, data: DataConfig, channels: int,
                         seed: int | None = None) -> MultiViewTransform:
    """The multi-view transform of a recipe: float32 (H, W, C) -> {"views": (M, C, S, S)[, "local": (L, C, s, s)]}."""
    return MultiViewTransform(views, data, channels, seed=seed)


class EvalTransform:
    """Float32 (H, W, C) in [0, 1] -> normalised Tensor (C, S, S): resize only, no augmentation."""

    def __init__(self, data: DataConfig, channels: int):
        self.size = int(data.image_size)
        self.channels = int(channels)
        self.mean, self.std = channel_stats(data, self.channels)

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        if img.ndim == 2:
            img = img[:, :, None]
        img = np.ascontiguousarray(img, dtype=np.float32)
        if img.shape[:2] != (self.size, self.size):
            shrink = img.shape[0] > self.size and img.shape[1] > self.size
            out = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            img = out[:, :, None] if out.ndim == 2 else out
        return to_tensor(img, self.mean, self.std)


def build_eval_transform(data: DataConfig, channels: int) -> EvalTransform:
    """Deterministic transform for evaluation/feature extraction: (H, W, C) -> Tensor (C, S, S)."""
    return EvalTransform(data, channels)


def denormalize(t: torch.Tensor, data: DataConfig) -> np.ndarray:
    """Undo the normalisation for display: (C, H, W) -> (H, W, C), or (N, C, H, W) -> (N, H, W, C),
    float32 clipped to [0, 1]."""
    x = t.detach().float().cpu().numpy()
    c = x.shape[-3]
    mean, std = channel_stats(data, c)
    x = np.moveaxis(x, -3, -1) * std + mean
    return np.clip(x, 0.0, 1.0).astype(np.float32)
