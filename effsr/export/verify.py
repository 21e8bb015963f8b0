"""``verify``: does the ONNX graph compute what the PyTorch network computes, on real images?

Each LR image runs through both; the error is ``max |onnx - torch| / max |torch|`` per image (relative to
the output's peak, so it means the same for 0-255 and 0-1 networks). A batch of two images (crops of the
first two to a common size) checks the dynamic batch axis. Above ``tolerance`` (default ``1e-5`` for an
fp32 graph) :class:`ExportMismatchError` is raised, unless the graph is within ``tolerance`` of a float64
copy of the network (float32 PyTorch is itself further than 1e-5 from it on some deep networks).

A graph with a fixed input size (``to_onnx(..., input_size=(H, W))``) is checked on the images cropped to
``H x W`` around their centre (tiled first where an image is smaller); a graph with a fixed batch size gets
batches of that size, and no batch-of-two check. onnxruntime failing on an input is a ``ValueError`` naming
the graph and the input.
"""
from __future__ import annotations

from distill.ranges import input_range as model_input_range

import copy
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


def _inputs(images: Sequence[Any], input_range: float, min_size: int = MIN_SIZE
            ) -> list[tuple[str, torch.Tensor]]:
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
        if min(t.shape[-2:]) < min_size:
            raise ValueError(f"images[{i}] is {tuple(t.shape[-2:])}; the exported graph needs >= {min_size} px")
        out.append((name, t))
    return out


def _fit(x: torch.Tensor, size: tuple[int, int] | None, batch: int | None) -> torch.Tensor:
    """``x`` cropped to ``size`` around its centre (tiled first where it is smaller) and repeated or cut to
    ``batch`` samples; ``None`` leaves that axis as it is."""
    if size is not None:
        h, w = size
        reps = (-(-h // x.shape[-2]), -(-w // x.shape[-1]))
        if reps != (1, 1):
            x = x.repeat(1, 1, *reps)
        top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
        x = x[..., top:top + h, left:left + w]
    if batch is not None and x.shape[0] != batch:
        x = x.repeat(-(-batch // x.shape[0]), 1, 1, 1)[:batch]
    return x.contiguous()


def _graph_input(graph: OnnxSR) -> tuple[tuple[int, int] | None, int | None]:
    """``(fixed (H, W) or None, fixed batch size or None)`` of the graph's input."""
    dims = list(graph.session.get_inputs()[0].shape)
    fixed = [d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None for d in dims]
    size = (fixed[2], fixed[3]) if len(fixed) == 4 and fixed[2] is not None and fixed[3] is not None else None
    return size, (fixed[0] if fixed else None)


def _run(graph: OnnxSR, name: str, x: torch.Tensor) -> np.ndarray:
    try:
        return graph.run_numpy(x.numpy())
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        text = str(err).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        raise ValueError(
            f"onnx_path: onnxruntime cannot run {graph.path} on {name} {list(x.shape)}: {first}") from err


def _rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    if out.shape != ref.shape:
        return float("inf")
    peak = float(np.abs(ref).max())
    return float(np.abs(out.astype(np.float64) - ref).max() / (peak if peak > 0 else 1.0))


class _Reference:
    """``model``'s outputs: float32 as given, and a float64 copy made on first use (``None`` if the network
    does not run in float64)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._model64: nn.Module | None | bool = False

    def fp64(self, x: torch.Tensor) -> np.ndarray | None:
        if self._model64 is False:
            try:
                self._model64 = copy.deepcopy(self.model).double().eval()
            except Exception:  # noqa: BLE001 - a network that cannot be made float64 keeps the fp32 check
                self._model64 = None
        if self._model64 is None:
            return None
        try:
            return self._model64(x.double()).numpy()
        except Exception:  # noqa: BLE001 - e.g. float32 tensors kept as plain attributes
            self._model64 = None
            return None


def _check(graph: OnnxSR, ref: _Reference, name: str, x: torch.Tensor, tolerance: float) -> dict[str, Any]:
    """One comparison: ``rel_error`` against float32 PyTorch; above ``tolerance`` also ``rel_error_fp64``
    (against float64 PyTorch) and ``torch_fp32_error`` (float32 PyTorch against float64 PyTorch)."""
    ref32 = ref.model(x).numpy()
    out = _run(graph, name, x)
    row: dict[str, Any] = {"name": name, "shape": list(x.shape), "rel_error": _rel_error(out, ref32)}
    if row["rel_error"] > tolerance:
        ref64 = ref.fp64(x)
        if ref64 is not None:
            row["rel_error_fp64"] = _rel_error(out, ref64)
            row["torch_fp32_error"] = _rel_error(ref32, ref64)
    return row


def _decisive(row: dict[str, Any]) -> float:
    return min(row["rel_error"], row.get("rel_error_fp64", float("inf")))


@torch.no_grad()
def verify(model: nn.Module, onnx_path: str | os.PathLike[str] | OnnxSR, images: Sequence[Any], *,
           tolerance: float = FP32_TOLERANCE, threads: int = 1, raise_on_error: bool = True) -> dict[str, Any]:
    """Compare ``model`` (PyTorch, as given: fuse it first or not) with the graph on ``images``.

    Returns ``{"max_rel_error", "tolerance", "passed", "per_image": [{"name", "shape", "rel_error"}],
    "batch": {"shape", "rel_error"}, "static_input"}`` (``static_input``: the graph's fixed ``[H, W]``, else
    ``None``; ``batch`` holds ``None``s and ``"skipped"`` when the graph's batch size is fixed).

    ``rel_error`` is measured against the float32 network. Where it exceeds ``tolerance``, the graph is also
    measured against a float64 copy of the network (``rel_error_fp64``, with ``torch_fp32_error``: the float32
    network's own error against float64): float32 PyTorch is itself off by more than 1e-5 on some deep
    networks, and a graph that is within ``tolerance`` of the float64 network computes it as exactly as the
    float32 network does. An image passes when either error is within ``tolerance``; ``max_rel_error`` is the
    largest of these per-image errors. Raises ``ValueError`` naming the graph when onnxruntime cannot run it
    on an input, and :class:`ExportMismatchError` when an error exceeds ``tolerance`` (unless
    ``raise_on_error=False``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
    graph = onnx_path if isinstance(onnx_path, OnnxSR) else OnnxSR(onnx_path, threads=threads)
    static, fixed_batch = _graph_input(graph)
    rng = model_input_range(model)
    was_training = model.training
    model.eval()
    ref = _Reference(model)
    try:
        xs = [(name, _fit(x, static, fixed_batch))
              for name, x in _inputs(images, rng, 1 if static else MIN_SIZE)]
        rows = [_check(graph, ref, name, x, tolerance) for name, x in xs]
        batch: dict[str, Any]
        if fixed_batch is None:
            # The batch axis: the first two images (or the first and its mirror) cropped to a common size.
            a, b = xs[0][1][:1], (xs[1][1] if len(xs) >= 2 else xs[0][1].flip(-1))[:1]
            h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
            xb = torch.cat([a[..., :h, :w], b[..., :h, :w]])
            batch = _check(graph, ref, "a batch of two", xb, tolerance)
            del batch["name"]
        else:
            batch = {"shape": None, "rel_error": None,
                     "skipped": f"the graph's batch size is fixed at {fixed_batch}"}
    finally:
        model.train(was_training)
    errors = [_decisive(r) for r in rows] + ([_decisive(batch)] if batch["rel_error"] is not None else [])
    worst = max(errors)
    result = {"max_rel_error": worst, "tolerance": float(tolerance), "passed": bool(worst <= tolerance),
              "per_image": rows, "batch": batch, "static_input": list(static) if static else None}
    if raise_on_error and not result["passed"]:
        bad = max(rows, key=_decisive)
        fp64 = f", {bad['rel_error_fp64']:.3g} against float64 PyTorch" if "rel_error_fp64" in bad else ""
        batch_text = f"{_decisive(batch):.3g}" if batch["rel_error"] is not None else "not checked"
        raise ExportMismatchError(
            f"onnx_path: onnxruntime differs from PyTorch by max relative error {worst:.3g} > {tolerance:.3g} "
            f"(worst image {bad['name']} {bad['shape']}: {bad['rel_error']:.3g}{fp64}; "
            f"batch of 2: {batch_text})")
    return result
