"""Image-quality metrics with the conventions of super-resolution papers and the NTIRE challenges.

* Inputs are ``uint8`` numpy arrays, ``H x W x 3`` (RGB) or ``H x W`` (grayscale); both arguments must
  have the same shape.
* ``shave`` pixels are removed from every border before measuring (the field uses ``shave = scale``).
* ``y_channel=True`` measures the luma of ITU-R BT.601 as MATLAB's ``rgb2ycbcr`` defines it,
  ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` (Y in [16, 235]), and by default
  (``y_round=True``) **rounds Y to integers** first, as MATLAB's ``rgb2ycbcr`` does for ``uint8`` input and
  as the NTIRE evaluation code does (``utils_image.rgb2ycbcr``: ``np.dot(img, [65.481, 128.553, 24.966])
  / 255 + 16``, then ``round()`` and ``uint8``). This is the challenge's Y-PSNR/SSIM: the same SR images
  measured on unrounded Y score about 0.02 dB higher (official RFDN on Set5: 32.159 dB unrounded,
  32.138 dB rounded). ``y_round=False`` keeps Y as unrounded float64 (what some Python ports do).
  Y is evaluated with the official expression in float64 and rounded half to even (``numpy.round``); of
  the 16.7 M RGB colours, 194 have an exact ``.5`` luma, where this follows the official float64
  evaluation (MATLAB's half-away-from-zero rounding can differ there by 1).
  For a grayscale image the gray values themselves are measured (what the usual MATLAB evaluation
  scripts do for Set14's ``bridge``); ``y_round`` does not apply to them.
* :func:`psnr` of identical images is ``inf``.
* :func:`ssim` is Wang et al.'s SSIM with an 11 x 11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
  L = 255, evaluated only where the window lies fully inside the (shaved) image, averaged over the map
  and, for RGB, over the three channels. This is the implementation used by BasicSR's and the NTIRE
  code's ``calculate_ssim``; it equals ``skimage.metrics.structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255)`` because scikit-image also crops the
  5-pixel window radius before averaging.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["psnr", "ssim", "rgb_to_y", "gaussian_window"]

#: BT.601 luma weights of MATLAB's ``rgb2ycbcr`` for 8-bit RGB (before the division by 255).
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def _check_image(img: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"{name} must be H x W or H x W x 3, got shape {img.shape}")
    return img


def _check_pair(sr: np.ndarray, hr: np.ndarray, shave: int,
                min_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    sr = _check_image(sr, "sr")
    hr = _check_image(hr, "hr")
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr must have the same shape, got sr {sr.shape} and hr {hr.shape}")
    if isinstance(shave, bool) or not isinstance(shave, (int, np.integer)) or shave < 0:
        raise ValueError(f"shave must be a non-negative int, got {shave!r}")
    h, w = hr.shape[:2]
    if h - 2 * shave < min_size or w - 2 * shave < min_size:
        raise ValueError(
            f"shave={shave} leaves less than {min_size} x {min_size} pixels of a {h} x {w} image (hr)"
        )
    if shave:
        sr = sr[shave:-shave, shave:-shave]
        hr = hr[shave:-shave, shave:-shave]
    return sr, hr


def rgb_to_y(img: np.ndarray, y_round: bool = True) -> np.ndarray:
    """Luma Y of ITU-R BT.601 (MATLAB ``rgb2ycbcr`` convention) as float64 in [16, 235].

    ``img`` is a ``uint8`` ``H x W x 3`` RGB image; the result is ``H x W``. With ``y_round=True``
    (default, the NTIRE/MATLAB convention) Y is rounded to integers (the values MATLAB's ``uint8`` luma
    holds); ``y_round=False`` returns it unrounded.

    >>> import numpy as np
    >>> px = np.array([[[10, 20, 30]]], np.uint8)   # Y = 16 + 3974.85 / 255 = 31.5876...
    >>> float(rgb_to_y(px)[0, 0]), round(float(rgb_to_y(px, y_round=False)[0, 0]), 4)
    (32.0, 31.5876)
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f"img must be a numpy ndarray, got {type(img).__name__}")
    if img.dtype != np.uint8:
        raise ValueError(f"img must have dtype uint8, got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img must be H x W x 3 RGB, got shape {img.shape}")
    _check_y_round(y_round)
    # The official expression, evaluated the same way (float64 dot product, then / 255 + 16), so that
    # rounding agrees with it even for lumas within a few ulps of .5.
    y = np.dot(img, _Y_WEIGHTS) / 255.0 + 16.0
    return np.round(y) if y_round else y


def _check_y_round(y_round: object) -> None:
    if not isinstance(y_round, (bool, np.bool_)):
        raise TypeError(f"y_round must be a bool, got {type(y_round).__name__}")


def _measured(img: np.ndarray, y_channel: bool, y_round: bool) -> np.ndarray:
    """float64 planes that are measured: Y (or gray) if ``y_channel`` else all channels."""
    if y_channel and img.ndim == 3:
        return rgb_to_y(img, y_round=y_round)
    return img.astype(np.float64)


def psnr(sr: np.ndarray, hr: np.ndarray, shave: int = 4, y_channel: bool = False,
         y_round: bool = True) -> float:
    """Peak signal-to-noise ratio in dB (peak 255), after shaving ``shave`` pixels off each border.

    With ``y_channel=False`` the mean squared error runs over all RGB values (the NTIRE number); with
    ``y_channel=True`` over BT.601 luma (the papers' number), rounded to integers unless
    ``y_round=False`` (see the module docstring). Identical images give ``inf``.

    >>> import numpy as np
    >>> a = np.zeros((16, 16, 3), np.uint8)
    >>> round(psnr(a + 1, a, shave=0), 4)  # MSE 1
    48.1308
    """
    _check_y_round(y_round)
    sr, hr = _check_pair(sr, hr, shave)
    diff = _measured(sr, y_channel, y_round) - _measured(hr, y_channel, y_round)
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalized 1-D Gaussian taps (``exp(-x^2 / (2 sigma^2))`` for x = -size//2 .. size//2)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with ``taps`` along both axes, keeping only the 'valid' part."""
    k = taps.size
    h, w = img.shape
    rows = np.zeros((h - k + 1, w), dtype=np.float64)
    for i, t in enumerate(taps):
        rows += t * img[i:i + h - k + 1, :]
    out = np.zeros((h - k + 1, w - k + 1), dtype=np.float64)
    for i, t in enumerate(taps):
        out += t * rows[:, i:i + w - k + 1]
    return out


def _ssim_plane(x: np.ndarray, y: np.ndarray, taps: np.ndarray) -> float:
    c1 = (0.01 * 255.0) ** 2
    c2 = (0.03 * 255.0) ** 2
    mu_x = _filter_valid(x, taps)
    mu_y = _filter_valid(y, taps)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = _filter_valid(x * x, taps) - mu_xx
    var_y = _filter_valid(y * y, taps) - mu_yy
    cov = _filter_valid(x * y, taps) - mu_xy
    num = (2.0 * mu_xy + c1) * (2.0 * cov + c2)
    den = (mu_xx + mu_yy + c1) * (var_x + var_y + c2)
    return float(np.mean(num / den))


def ssim(sr: np.ndarray, hr: np.ndarray, shave: int = 4, y_channel: bool = True,
         y_round: bool = True) -> float:
    """Structural similarity (Wang et al. 2004; 11 x 11 Gaussian, sigma 1.5) after shaving borders.

    RGB images (``y_channel=False``) are measured per channel and averaged; with ``y_channel=True``
    (default) on BT.601 luma, rounded to integers unless ``y_round=False``. The image left after
    shaving must be at least 11 x 11.

    >>> import numpy as np
    >>> a = np.arange(400, dtype=np.uint8).reshape(20, 20)
    >>> ssim(a, a, shave=0)
    1.0
    """
    _check_y_round(y_round)
    taps = gaussian_window(11, 1.5)
    sr, hr = _check_pair(sr, hr, shave, min_size=taps.size)
    x = _measured(sr, y_channel, y_round)
    y = _measured(hr, y_channel, y_round)
    if x.ndim == 2:
        return _ssim_plane(x, y, taps)
    return float(np.mean([_ssim_plane(x[:, :, c], y[:, :, c], taps) for c in range(x.shape[2])]))
