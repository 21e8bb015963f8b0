"""Run a super-resolution network on uint8 images and score it against ground truth.

* :func:`upscale` turns one ``uint8`` ``H x W x 3`` LR image into a ``uint8`` SR image. It scales the
  input to the network's ``model.input_range`` (255 or 1), and on the way out clamps to
  ``[0, input_range]``, rescales to ``[0, 255]`` and rounds (the NTIRE ``tensor2uint`` convention).
* ``tile=N`` runs the network on ``N x N`` LR tiles, each padded by ``tile_overlap`` LR pixels of real
  image context on every side (less at the image border) and cropped back to its core before it is
  pasted. Tiles therefore do not blend: for a network whose receptive-field radius is at most
  ``tile_overlap`` LR pixels the result is *identical* to untiled inference. RFDN/RLFN's ESA block
  max-pools a strided feature map and resizes the pooled map back to the input size, so its attention
  map depends on the whole input and tiled output differs slightly from untiled output (typically a
  few hundredths of a dB of PSNR); use a large tile (or none) when exact numbers matter.
* :func:`evaluate` upscales every pair and measures PSNR (RGB and Y) and SSIM (Y) with
  :mod:`effsr.quality`, shaving ``model.scale`` pixels at each border.

Neither function changes the model: it is put in eval mode for the call and its previous train/eval
state is restored afterwards; when ``device`` differs from the model's device a copy is moved there.
"""
from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.ranges import declared_input_range
from reparam.utils import modules
from reparam.utils.device import model_device, model_dtype, resolve_device

__all__ = ["upscale", "evaluate", "forward", "to_tensor", "to_uint8", "model_device", "model_dtype", "eval_mode",
           "resolve_device", "input_range", "writable"]


def input_range(model: nn.Module, argname: str = "model") -> float:
    """The range ``[0, input_range]`` ``model`` takes and returns; ``ValueError`` naming ``argname`` when the
    network declares none (feeding a 0-255 network 0-1 images loses 6-10 dB without an error): give it one
    with :func:`effsr.models.wrap` (``--input-range`` on the command line)."""
    r = declared_input_range(model, argname)
    if r is None:
        raise ValueError(f"{argname}: {type(model).__name__} declares no input_range; give it the range it takes and "
                         "returns with effsr.models.wrap(module, input_range=1.0 or 255.0) (--input-range)")
    return r


# --------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the ``with`` block, then restore each one's own state."""
    with modules.eval_mode(model):
        yield model


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when it already lives on ``device``, else a copy moved there (input untouched)."""
    if model_device(model) == device:
        return model
    return copy.deepcopy(model).to(device)


def _check_lr(lr: Any, name: str = "lr") -> np.ndarray:
    if not isinstance(lr, np.ndarray):
        raise TypeError(f"{name} must be a numpy uint8 array (H x W x 3), got {type(lr).__name__}")
    if lr.dtype != np.uint8:
        raise TypeError(f"{name} must have dtype uint8, got {lr.dtype}")
    if lr.ndim != 3 or lr.shape[2] != 3:
        raise ValueError(f"{name} must have shape H x W x 3, got {lr.shape}")
    if lr.shape[0] < 1 or lr.shape[1] < 1:
        raise ValueError(f"{name} is empty (shape {lr.shape})")
    return lr


def writable(img: np.ndarray) -> np.ndarray:
    """A contiguous, writable view or copy (torch warns on read-only arrays, e.g. cached datasets)."""
    img = np.ascontiguousarray(img)
    return img if img.flags.writeable else img.copy()


def to_tensor(img: np.ndarray, input_range: float = 255.0, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``H x W x 3`` -> float ``1 x 3 x H x W`` in ``[0, input_range]`` on ``device``."""
    img = _check_lr(img, "img")
    t = torch.from_numpy(writable(img)).permute(2, 0, 1).unsqueeze(0)
    t = t.to(device=device, dtype=dtype)
    if input_range != 255.0:
        t = t * (input_range / 255.0)
    return t


def to_uint8(t: torch.Tensor, input_range: float = 255.0) -> np.ndarray:
    """Float ``1 x 3 x H x W`` (or ``3 x H x W``) in ``[0, input_range]`` -> uint8 ``H x W x 3``.

    Clamps to the range, rescales to [0, 255] and rounds half to even (``torch.round``), like NTIRE's
    ``tensor2uint``.
    """
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"t must hold one image, got batch size {t.shape[0]}")
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"t must have shape 3 x H x W, got {tuple(t.shape)}")
    t = t.detach().float().clamp(0.0, input_range)
    if input_range != 255.0:
        t = t * (255.0 / input_range)
    return t.round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _check_tiling(tile: int | None, tile_overlap: int) -> None:
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 1):
        raise ValueError(f"tile must be a positive int or None, got {tile!r}")
    if isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int) or tile_overlap < 0:
        raise ValueError(f"tile_overlap must be a non-negative int, got {tile_overlap!r}")


def _tile_starts(length: int, tile: int) -> list[int]:
    return list(range(0, length, tile))


@torch.no_grad()
def forward(model: nn.Module, x: torch.Tensor, tile: int | None = None, tile_overlap: int = 8
            ) -> torch.Tensor:
    """``model(x)`` for an ``N x C x H x W`` tensor, optionally tile by tile (see the module docstring).

    The model is called as it is (no mode change, no device move); ``x`` must already be on its device.
    """
    _check_tiling(tile, tile_overlap)
    if x.dim() != 4:
        raise ValueError(f"x must be N x C x H x W, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if tile is None or (tile >= h and tile >= w):
        return model(x)
    out: torch.Tensor | None = None
    scale = 0
    for top in _tile_starts(h, tile):
        for left in _tile_starts(w, tile):
            bottom, right = min(top + tile, h), min(left + tile, w)
            t0, l0 = max(top - tile_overlap, 0), max(left - tile_overlap, 0)
            t1, l1 = min(bottom + tile_overlap, h), min(right + tile_overlap, w)
            y = model(x[..., t0:t1, l0:l1])
            if out is None:
                sh, sw = y.shape[-2] / (t1 - t0), y.shape[-1] / (l1 - l0)
                if sh != sw or sh != int(sh) or sh < 1:
                    raise ValueError(
                        f"tiled inference needs an integer scale; a {t1 - t0}x{l1 - l0} tile gave "
                        f"{y.shape[-2]}x{y.shape[-1]}"
                    )
                scale = int(sh)
                out = y.new_empty((*y.shape[:-2], h * scale, w * scale))
            s = scale
            core = y[..., (top - t0) * s:(bottom - t0) * s, (left - l0) * s:(right - l0) * s]
            out[..., top * s:bottom * s, left * s:right * s] = core
    assert out is not None
    return out


# ------------------------------------------------------------------------------------------------ API
def upscale(model: nn.Module, lr_uint8: np.ndarray, tile: int | None = None, tile_overlap: int = 8,
            device: str | torch.device | None = None) -> np.ndarray:
    """Super-resolve one ``uint8`` ``H x W x 3`` RGB image; returns ``uint8`` ``sH x sW x 3``.

    ``device=None`` runs on the model's device. ``tile``/``tile_overlap`` are in LR pixels.

    >>> import numpy as np, torch
    >>> from effsr.models import wrap
    >>> net = wrap(torch.nn.Sequential(torch.nn.Upsample(scale_factor=2)), input_range=255.0)
    >>> upscale(net, np.zeros((4, 5, 3), np.uint8)).shape
    (8, 10, 3)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lr = _check_lr(lr_uint8, "lr_uint8")
    _check_tiling(tile, tile_overlap)
    dev = resolve_device(device, model)
    net = on_device(model, dev)
    rng = input_range(net)
    with eval_mode(net):
        x = to_tensor(lr, rng, dev, model_dtype(net))
        y = forward(net, x, tile=tile, tile_overlap=tile_overlap)
    return to_uint8(y, rng)


def _pair_fields(pair: Any, index: int) -> tuple[str, np.ndarray, np.ndarray]:
    if all(hasattr(pair, a) for a in ("name", "lr", "hr")):
        return str(pair.name), pair.lr, pair.hr
    if isinstance(pair, (tuple, list)) and len(pair) == 3:
        name, lr, hr = pair
        return str(name), lr, hr
    raise TypeError(f"pairs[{index}] must be an SRPair or a (name, lr, hr) tuple, got {type(pair).__name__}")


def _match_hr(name: str, sr: np.ndarray, hr: Any, scale: int) -> np.ndarray:
    if not isinstance(hr, np.ndarray) or hr.dtype != np.uint8:
        raise TypeError(f"{name}: hr must be a uint8 numpy array")
    if hr.ndim == 2:
        hr = np.repeat(hr[:, :, None], 3, axis=2)
    if hr.ndim != 3 or hr.shape[2] != 3:
        raise ValueError(f"{name}: hr must have shape H x W x 3, got {hr.shape}")
    (h, w), (sh, sw) = hr.shape[:2], sr.shape[:2]
    # Field convention (Set14): an HR side that is not a multiple of the scale is cropped top-left.
    if sh <= h < sh + scale and sw <= w < sw + scale:
        return hr[:sh, :sw]
    raise ValueError(
        f"LR/HR size mismatch for {name}: LR x{scale} gives {sh}x{sw} but HR is {h}x{w}"
    )


def _scale_of(model: nn.Module) -> int:
    scale = getattr(model, "scale", None)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"model.scale must be a positive int, got {scale!r}")
    return scale


def evaluate(model: nn.Module, pairs: Iterable[Any], progress: bool = True,
             save_dir: str | os.PathLike[str] | None = None, tile: int | None = None,
             tile_overlap: int = 8, device: str | torch.device | None = None,
             y_round: bool = True, gray_channel: bool = False) -> dict[str, Any]:
    """Upscale every ``(name, lr, hr)`` pair and measure it against ``hr``.

    Returns ``{"psnr_rgb", "psnr_y", "ssim_y"}`` (means over images, floats), ``"images"`` (count)
    and ``"per_image"``: a list of ``{"name", "psnr_rgb", "psnr_y", "ssim_y"}``. Quality follows
    :mod:`effsr.quality` with ``shave = model.scale``; Y is rounded to integers before PSNR/SSIM (the
    NTIRE/MATLAB convention) unless ``y_round=False``. A pair marked ``gray`` (a single-channel source
    such as Set14's ``bridge``) is measured like the official NTIRE evaluation code measures it: the gray
    file read as three identical channels, Y from those. ``gray_channel=True`` instead measures it on one
    gray channel (HR's channel vs the rounded mean of the SR channels), the MATLAB papers' convention. With
    ``save_dir`` each SR result is written as ``<save_dir>/<name>.png`` (created if needed). ``progress`` reports
    on stderr (a bar on a terminal, else plain lines).
    """
    from reparam.utils.progress import progress as progress_bar

    from . import quality

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(y_round, bool):
        raise TypeError(f"y_round must be a bool, got {type(y_round).__name__}")
    if not isinstance(gray_channel, bool):
        raise TypeError(f"gray_channel must be a bool, got {type(gray_channel).__name__}")
    _check_tiling(tile, tile_overlap)
    scale = _scale_of(model)
    dev = resolve_device(device, model)
    net = on_device(model, dev)
    out_dir = Path(save_dir) if save_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    total = len(pairs) if isinstance(pairs, Sequence) else None
    if total == 0:
        raise ValueError("pairs is empty: nothing to evaluate")
    rows: list[dict[str, Any]] = []
    bar = progress_bar(pairs, total=total, desc="eval", unit="img", disable=not progress, leave=False)
    try:
        for i, pair in enumerate(bar):
            name, lr, hr = _pair_fields(pair, i)
            sr = upscale(net, lr, tile=tile, tile_overlap=tile_overlap, device=dev)
            hr = _match_hr(name, sr, hr, scale)
            if gray_channel and getattr(pair, "gray", False):
                # The papers' convention for a gray source (Set14's bridge): one gray channel,
                # HR's (identical) channels vs the mean of the SR channels.
                hr = hr[..., 0]
                sr_eval = np.clip(np.rint(sr.astype(np.float64).mean(axis=2)), 0, 255).astype(np.uint8)
            else:
                sr_eval = sr
            row = {
                "name": name,
                "psnr_rgb": float(quality.psnr(sr_eval, hr, shave=scale, y_channel=False)),
                "psnr_y": float(quality.psnr(sr_eval, hr, shave=scale, y_channel=True, y_round=y_round)),
                "ssim_y": float(quality.ssim(sr_eval, hr, shave=scale, y_channel=True, y_round=y_round)),
            }
            rows.append(row)
            if out_dir is not None:
                _save_png(sr, out_dir / f"{name}.png")
            bar.set_postfix(psnr_y=f"{row['psnr_y']:.2f}")
    finally:
        bar.close()
    if not rows:
        raise ValueError("pairs is empty: nothing to evaluate")

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    return {"psnr_rgb": mean("psnr_rgb"), "psnr_y": mean("psnr_y"), "ssim_y": mean("ssim_y"),
            "images": len(rows), "per_image": rows}


def _save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(img).save(path, format="PNG")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def tile_count(height: int, width: int, tile: int | None) -> int:
    """Number of model calls :func:`forward` makes for an ``height x width`` input."""
    if tile is None or (tile >= height and tile >= width):
        return 1
    return _ceil_div(height, tile) * _ceil_div(width, tile)

