"""``verify``: does the ONNX graph compute what the PyTorch network computes, on real images?

Each LR image runs through both; the error is ``max |onnx - torch| / max |torch|`` per image (relative to
the output's peak, so it means the same for 0-255 and 0-1 networks). A batch of two images (crops of the
first two to a common size) checks the dynamic batch axis. Above ``tolerance`` (default ``1e-5`` for an
fp32 graph) :class:`ExportMismatchError` is raised.
"""
from __future__ import annotations

from distill.ranges import input_range as model_input_range

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .onnx import MIN_SIZE
from .session import OnnxSR

__all__ = ["verify", "ExportMismatchError", "FP32_TOLERANCE"]

FP32_TOLERANCE = 1e-5


class ExportMismatchError(ValueError):
    """The exported graph's output differs from the PyTorch network's by more than the tolerance."""


def _inputs(images: Sequence[Any], input_range: float) -> list[tuple[str, torch.Tensor]]:
    if isinstance(images, (np.ndarray, torch.Tensor)) or not isinstance(images, Sequence) or not images:
        raise ValueError("images must be a non-empty list of uint8 H x W x 3 arrays, SR pairs or float tensors")
    out = []
    for i, img in enumerate(images):
        name = f"images[{i}]"
        if hasattr(img, "lr") and hasattr(img, "name"):
            name, img = str(img.name), img.lr
        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"images[{i}] must be uint8 H x W x 3, got {img.dtype} {img.shape}")
            t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1)[None].float() * (input_range / 255.0)
        elif isinstance(img, torch.Tensor):
            t = img[None] if img.dim() == 3 else img
            if t.dim() != 4:
                raise ValueError(f"images[{i}] must be a C x H x W or N x C x H x W tensor, got {tuple(img.shape)}")
            t = t.float()
        else:
            raise TypeError(f"images[{i}] must be a numpy array or a torch tensor, got {type(img).__name__}")
        if min(t.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"images[{i}] is {tuple(t.shape[-2:])}; the exported graph needs >= {MIN_SIZE} px")
        out.append((name, t))
    return out


def _rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    if out.shape != ref.shape:
        return float("inf")
    peak = float(np.abs(ref).max())
    return float(np.abs(out.astype(np.float64) - ref).max() / (peak if peak > 0 else 1.0))


@torch.no_grad()
def verify(model: nn.Module, onnx_path: str | os.PathLike[str] | OnnxSR, images: Sequence[Any], *,
           tolerance: float = FP32_TOLERANCE, threads: int = 1, raise_on_error: bool = True) -> dict[str, Any]:
    """Compare ``model`` (PyTorch, as given: fuse it first or not) with the graph on ``images``.

    Returns ``{"max_rel_error", "tolerance", "passed", "per_image": [{"name", "shape", "rel_error"}],
    "batch": {"shape", "rel_error"}}``. Raises :class:`ExportMismatchError` when an error exceeds
    ``tolerance`` (unless ``raise_on_error=False``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    graph = onnx_path if isinstance(onnx_path, OnnxSR) else OnnxSR(onnx_path, threads=threads)
    rng = model_input_range(model)
    was_training = model.training
    model.eval()
    try:
        rows = []
        xs = _inputs(images, rng)
        for name, x in xs:
            ref = model(x).numpy()
            err = _rel_error(graph.run_numpy(x.numpy()), ref)
            rows.append({"name": name, "shape": list(x.shape), "rel_error": err})
        # The batch axis: the first two images (or the first and its mirror) cropped to a common size.
        a, b = xs[0][1][:1], (xs[1][1] if len(xs) >= 2 else xs[0][1].flip(-1))[:1]
        h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
        xb = torch.cat([a[..., :h, :w], b[..., :h, :w]])
        batch = {"shape": list(xb.shape), "rel_error": _rel_error(graph.run_numpy(xb.numpy()), model(xb).numpy())}
    finally:
        model.train(was_training)
    errors = [r["rel_error"] for r in rows] + [batch["rel_error"]]
    worst = max(errors)
    result = {"max_rel_error": worst, "tolerance": float(tolerance), "passed": bool(worst <= tolerance),
              "per_image": rows, "batch": batch}
    if raise_on_error and not result["passed"]:
        bad = max(rows, key=lambda r: r["rel_error"])
        raise ExportMismatchError(
            f"onnx_path: onnxruntime differs from PyTorch by max relative error {worst:.3g} > {tolerance:.3g} "
            f"(worst image {bad['name']} {bad['shape']}; batch of 2: {batch['rel_error']:.3g})")
    return result
