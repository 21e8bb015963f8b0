"""An exponential moving average of a module's trainable weights, kept beside training (``train_steps(ema_decay=)``).

After step ``t`` (1, 2, ...) every average moves toward its parameter: ``avg <- d_t * avg + (1 - d_t) * param`` with
``d_t = min(decay, (1 + t) / (10 + t))``; the warm-up factor keeps the first steps from being dominated by the
starting weights (the schedule of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``). Only parameters are
averaged: buffers (BatchNorm running statistics) stay those of the last step.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["WeightEMA", "check_ema_decay", "ema_factor"]


def check_ema_decay(decay: Any) -> float | None:
    """``decay`` if it is None or a finite number in (0, 1); else ``ValueError`` naming ``ema_decay``."""
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay) \
            or not 0 < decay < 1:
        raise ValueError(f"ema_decay must be None or a number in (0, 1), got {decay!r}")
    return float(decay)


def ema_factor(decay: float, step: int) -> float:
    """The weight ``d_t`` the average keeps at step ``step`` (>= 1): ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1 + step) / (10 + step))


class WeightEMA:
    """Averages of ``named`` parameters (``[(name, parameter), ...]``), started at their current values.

    The averages are clones of the parameters, so they share their dtype, device and memory format.
    """

    def __init__(self, named: Sequence[tuple[str, nn.Parameter]], decay: float) -> None:
        self.decay = check_ema_decay(decay)
        if self.decay is None:
            raise ValueError("ema_decay must be a number in (0, 1), got None")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.averages = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move every average toward its parameter after optimizer step ``step`` (>= 1)."""
        w = 1.0 - ema_factor(self.decay, step)
        for avg, p in zip(self.averages, self.params):
            avg.lerp_(p.detach(), w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: a.detach().clone() for n, a in zip(self.names, self.averages)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (the same parameter names; values copied into this object's tensors)."""
        if set(state) != set(self.names):
            missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
            raise ValueError(f"ema state does not match the parameters (missing {missing[:3]}, extra {extra[:3]})")
        for n, a in zip(self.names, self.averages):
            a.copy_(state[n])

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Write the averages into the parameters (the module then holds the averaged weights)."""
        for avg, p in zip(self.averages, self.params):
            p.copy_(avg)
