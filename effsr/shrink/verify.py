"""Numerical checks between two forms of a network (fused vs training form, reloaded vs in memory)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["VerificationError", "verify_same"]


class VerificationError(RuntimeError):
    """The fused (or reloaded) student does not compute what its training form computes."""


@torch.no_grad()
def verify_same(reference: nn.Module, candidate: nn.Module, inputs: Sequence[torch.Tensor], what: str,
                tolerance: float, device: torch.device | str = "cpu") -> dict[str, float]:
    """Max relative error ``max|a - b| / max|a|`` of ``candidate`` vs ``reference`` over ``inputs`` (float32).

    Raises :class:`VerificationError` naming ``what`` when it exceeds ``tolerance``.
    """
    worst = 0.0
    worst_abs = 0.0
    modes = [(m, m.training) for m in (reference, candidate)]
    reference.eval()
    candidate.eval()
    try:
        for x in inputs:
            x = x.to(device=device, dtype=torch.float32)
            a = reference(x).double()
            b = candidate(x).double()
            diff = float((a - b).abs().max())
            rel = diff / max(float(a.abs().max()), 1e-12)
            worst, worst_abs = max(worst, rel), max(worst_abs, diff)
    finally:
        for m, flag in modes:
            m.train(flag)
    if not worst <= tolerance:  # also catches NaN
        raise VerificationError(f"verification failed at {what}: max relative error {worst:.3g} > tolerance "
                                f"{tolerance:g} (max abs error {worst_abs:.3g}) on {len(inputs)} real image(s)")
    return {"max_rel_error": worst, "max_abs_error": worst_abs, "images": len(inputs), "tolerance": tolerance}
