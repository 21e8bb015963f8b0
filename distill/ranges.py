"""The value range a network expects its images in: one accessor, one rule, for every package.

Rule: a network that declares ``input_range`` (e.g. ``255.0`` for RFDN, ``1.0`` for IMDN) takes float
images in ``[0, input_range]``; one that declares nothing takes ``[0, 1]`` (PyTorch's convention for
float images). The value must be a finite number > 0.
"""
from __future__ import annotations

import math
from numbers import Real

from torch import nn

__all__ = ["input_range", "declared_input_range", "DEFAULT_INPUT_RANGE"]

#: The range of a network that declares no ``input_range``.
DEFAULT_INPUT_RANGE = 1.0


def input_range(model: nn.Module, argname: str = "model") -> float:
    """``model.input_range`` as a float (``DEFAULT_INPUT_RANGE`` when absent); ``ValueError`` naming
    ``argname`` when it is not a finite number > 0."""
    r = declared_input_range(model, argname)
    return DEFAULT_INPUT_RANGE if r is None else r


def declared_input_range(model: nn.Module, argname: str = "model") -> float | None:
    """``model.input_range`` as a float, or None when the network declares none; ``ValueError`` naming
    ``argname`` when it is not a finite number > 0."""
    r = getattr(model, "input_range", None)
    if r is None:
        return None
    if isinstance(r, bool) or not isinstance(r, Real) or not math.isfinite(float(r)) or float(r) <= 0:
        raise ValueError(f"{argname}.input_range must be a finite number > 0, got {r!r}")
    return float(r)
