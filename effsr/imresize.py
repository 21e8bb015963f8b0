"""MATLAB-compatible bicubic ``imresize`` (what made the LR images of the SR benchmarks).

``imresize(img, scale)`` reproduces MATLAB's ``imresize(img, scale, 'bicubic')`` (antialiasing on,
the default) pixel for pixel on uint8 images. How MATLAB computes it, and therefore this module:

* Output size: ``ceil(scale * in)`` per dimension when ``scale`` is given (the given scale is also
  the one used for the weights); with ``output_shape`` the per-dimension scale is ``out / in``.
* Kernel: Keys' cubic convolution with ``a = -0.5``, support [-2, 2]. When downscaling (scale < 1) the
  kernel is stretched by ``1 / scale`` (and divided by it) to antialias, so it spans ``4 / scale`` inputs.
* Output pixel ``x`` (1-based) samples the input at ``u = x / scale + 0.5 * (1 - 1 / scale)``; it uses
  the ``ceil(width) + 2`` inputs starting at ``floor(u - width / 2)``, whose weights are normalized to
  sum to 1. Out-of-range indices are mirrored ('symmetric': the edge pixel is repeated).
* The resize is separable: one pass per dimension, dimensions in order of increasing scale (the
  stronger shrink first; rows first when the scales are equal).
* The arithmetic is double precision. For uint8 images MATLAB's resampler returns uint8 from *each*
  pass, i.e. the intermediate image is rounded (half away from zero) and saturated to [0, 255] before
  the second pass; skipping that rounding leaves a few pixels off by one.
  Float images are never rounded or clipped.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["imresize", "cubic", "contributions"]


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with ``a = -0.5`` (MATLAB's ``cubic``), evaluated elementwise."""
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * (
        (ax > 1) & (ax <= 2)
    )


def contributions(in_length: int, out_length: int, scale: float, antialiasing: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based input indices (both ``out_length x taps``) of a 1-D bicubic resize."""
    width = 4.0
    if scale < 1 and antialiasing:
        width = width / scale

        def kernel(v: np.ndarray) -> np.ndarray:
            return scale * cubic(scale * v)
    else:
        kernel = cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based, may be out of range
    weights = kernel(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)
    # Mirror out-of-range indices: [1..n, n..1] repeated (MATLAB's 'symmetric' padding).
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    idx = mirror[np.mod(indices.astype(np.int64) - 1, mirror.size)]
    keep = np.any(weights != 0, axis=0)  # drop tap columns that are zero for every output
    return weights[:, keep], idx[:, keep]


def _resize_axis(img: np.ndarray, axis: int, weights: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """One separable pass: ``out[k] = sum_j weights[k, j] * img[idx[k, j]]`` along ``axis`` (float64)."""
    moved = np.moveaxis(img, axis, 0)
    out = np.zeros((weights.shape[0],) + moved.shape[1:], dtype=np.float64)
    extra = (slice(None),) + (None,) * (moved.ndim - 1)
    for j in range(weights.shape[1]):
        out += weights[:, j][extra] * moved[idx[:, j]]
    return np.moveaxis(out, 0, axis)


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB's double -> uint8 conversion: round half away from zero, saturate."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _plan(shape: tuple[int, int], scale: float | tuple[float, float] | None,
          output_shape: tuple[int, int] | None) -> tuple[tuple[float, float], tuple[int, int]]:
    if scale is None and output_shape is None:
        raise ValueError("give scale or output_shape")
    if output_shape is not None:
        if (not isinstance(output_shape, (tuple, list)) or len(output_shape) != 2
                or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                           for s in output_shape)):
            raise ValueError(f"output_shape must be two positive ints (height, width), got {output_shape!r}")
        out = (int(output_shape[0]), int(output_shape[1]))
        if scale is None:
            return (out[0] / shape[0], out[1] / shape[1]), out
    if isinstance(scale, (tuple, list)):
        if len(scale) != 2:
            raise ValueError(f"scale must be a number or a (height, width) pair, got {scale!r}")
        scales = (float(scale[0]), float(scale[1]))
    elif isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, bool):
        scales = (float(scale), float(scale))
    else:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if not all(math.isfinite(s) and s > 0 for s in scales):
        raise ValueError(f"scale must be positive and finite, got {scale!r}")
    if output_shape is None:
        out = (int(math.ceil(scales[0] * shape[0])), int(math.ceil(scales[1] * shape[1])))
    return scales, out


def imresize(img: np.ndarray, scale: float | tuple[float, float] | None = None,
             output_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Resize ``img`` (``H x W`` or ``H x W x C``) like MATLAB ``imresize(img, scale, 'bicubic')``.

    Give ``scale`` (a number, or a ``(height, width)`` pair) or ``output_shape = (height, width)``; when
    both are given, ``output_shape`` sets the size and ``scale`` the kernel (as in MATLAB).
    uint8 input gives uint8 output (rounded, saturated); float input gives float output of the same
    dtype, computed in float64 and not clipped.

    >>> import numpy as np
    >>> imresize(np.full((8, 8), 200, np.uint8), 0.25)
    array([[200, 200],
           [200, 200]], dtype=uint8)
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f"img must be a numpy ndarray, got {type(img).__name__}")
    if img.ndim not in (2, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"img must be a non-empty H x W or H x W x C array, got shape {img.shape}")
    is_uint8 = img.dtype == np.uint8
    if not is_uint8 and not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"img must be uint8 or floating point, got dtype {img.dtype}")
    scales, out_shape = _plan(img.shape[:2], scale, output_shape)

    result: np.ndarray = img
    order = sorted(range(2), key=lambda d: scales[d])  # stable: rows first on ties
    for axis in order:
        if out_shape[axis] == result.shape[axis] and scales[axis] == 1.0:
            continue
        weights, idx = contributions(result.shape[axis], out_shape[axis], scales[axis])
        result = _resize_axis(result.astype(np.float64, copy=False), axis, weights, idx)
        if is_uint8:
            result = _round_uint8(result)
    if is_uint8:
        return result.astype(np.uint8, copy=False)
    return result.astype(img.dtype, copy=False)
