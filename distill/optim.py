"""Learning rates relative to each weight tensor's scale: fine-tuning a pretrained network whose weights differ
by orders of magnitude without one Adam step destroying the small ones.

Adam moves every element by about ``lr`` per step whatever its size. Most SR checkpoints have weight tensors
of RMS 0.01-1, where ``lr = 1e-4`` is a small relative step. Some do not: the official NTIRE 2022 FMEN runs on
0-255 inputs and its attention branches grow activations to ~1e6, so their last convs (``excitate``) have
weights of RMS 1e-7..1e-5; a single step at ``lr = 1e-4`` changes those by 10^3-10^5 times their size and the
network outputs garbage (measured: L1 loss 0.023 -> 5e5 after one step). :func:`relative_lr_groups` caps each
weight tensor's learning rate at ``max_relative_step * RMS(w)`` (measured once, on the weights training starts
from), the relative-step idea of Adafactor (Shazeer & Stern, 2018) applied only where it is needed: tensors whose
RMS is at least ``lr / max_relative_step`` keep ``lr``, so for RFDN, RLFN and IMDN at ``lr = 1e-4`` nothing
changes. Biases (1-D tensors) and all-zero tensors keep ``lr``: there is no scale to be relative to.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from reparam.utils.validate import is_number

__all__ = ["MAX_RELATIVE_STEP", "relative_lr_groups", "capped_lrs", "lr_groups"]

#: Default cap: no weight tensor's learning rate exceeds 1 % of its RMS per step.
MAX_RELATIVE_STEP = 1e-2


def _check(lr: Any, max_relative_step: Any) -> None:
    if not (is_number(lr) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if max_relative_step is not None and not (is_number(max_relative_step) and math.isfinite(max_relative_step)
                                              and max_relative_step > 0):
        raise ValueError(f"max_relative_step must be None or a finite number > 0, got {max_relative_step!r}")


def capped_lrs(named_params: Iterable[tuple[str, nn.Parameter]], lr: float,
               max_relative_step: float | None = MAX_RELATIVE_STEP) -> dict[str, float]:
    """``{name: capped lr}`` of the weight tensors (``dim >= 2``, not all zero) whose RMS is below
    ``lr / max_relative_step``; empty when ``max_relative_step`` is None."""
    _check(lr, max_relative_step)
    out: dict[str, float] = {}
    if max_relative_step is None:
        return out
    for name, p in named_params:
        if p.dim() < 2:
            continue
        with torch.no_grad():
            rms = float(p.detach().double().pow(2).mean().sqrt())
        cap = max_relative_step * rms
        if 0.0 < cap < lr:
            out[name] = cap
    return out


def lr_groups(named_params: Iterable[tuple[str, nn.Parameter]], lr: float,
              caps: dict[str, float]) -> list[dict[str, Any]]:
    """Optimizer parameter groups for ``caps`` (from :func:`capped_lrs`): one group at ``lr`` with every
    parameter not in ``caps``, then one group per capped weight tensor at its learning rate
    (``group["name"]`` names it). With nothing capped this is exactly ``[{"params": all, "lr": lr}]``."""
    named = list(named_params)
    plain = [p for n, p in named if n not in caps]
    groups: list[dict[str, Any]] = [{"params": plain, "lr": lr}] if plain else []
    groups += [{"params": [p], "lr": caps[n], "name": n} for n, p in named if n in caps]
    return groups


def relative_lr_groups(named_params: Iterable[tuple[str, nn.Parameter]], lr: float,
                       max_relative_step: float | None = MAX_RELATIVE_STEP) -> list[dict[str, Any]]:
    """:func:`lr_groups` of :func:`capped_lrs`: the plain optimizer's single group, with each weight tensor
    whose RMS is below ``lr / max_relative_step`` moved to a group of its own at ``max_relative_step * RMS``.

    ``ValueError`` naming ``lr`` / ``max_relative_step`` for a value that is not a finite number > 0
    (``max_relative_step=None`` turns the cap off).
    """
    named = list(named_params)
    return lr_groups(named, lr, capped_lrs(named, lr, max_relative_step))
