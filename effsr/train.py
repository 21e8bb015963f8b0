"""SR fine-tuning callbacks for the toolkits, on ``distill.train_steps`` (the project's one training loop).

:func:`sr_finetune` makes the ``finetune(model, step)`` callback of :func:`prune.l2_filter_prune`: an L1
(or any :func:`distill.get_loss`) fine-tune of the pruned network against the ground truth, with a fresh
optimizer at every call -- pruning replaced the parameters, so an optimizer built before the step would
train stale tensors.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["sr_finetune"]


class _OutOfTime(Exception):
    """Raised by the step hook when the time budget is spent (caught in :func:`sr_finetune`)."""


class _Recording(nn.Module):
    """Wraps a ``forward(lr, hr) -> (loss, parts)`` module and keeps every loss value."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.losses: list[float] = []

    def forward(self, lr: torch.Tensor, hr: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, parts = self.inner(lr, hr)
        self.losses.append(float(loss.detach()))
        return loss, parts


def sr_finetune(data: Any, steps: int | Callable[[int], int], *, lr: float = 2e-4,
                loss: Any = "l1", optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
                batch_size: int = 16, device: str | torch.device | None = None, progress: bool = True,
                max_seconds: float | None = None, seed: int = 0) -> Callable[[nn.Module, int], dict[str, Any]]:
    """A ``finetune(model, step)`` callback for super-resolution models.

    ``data``: a map-style dataset of ``(lr, hr)`` float pairs in [0, 1] (e.g. :class:`effsr.data.PatchDataset`)
    or a ``DataLoader`` of such batches; the network sees them scaled by its ``input_range``
    (:func:`distill.input_range`). Each call trains ``steps`` steps (or ``steps(step)``) with
    :class:`distill.Supervised` and a fresh optimizer (:func:`prune.fresh_optimizer`), stops early once
    ``max_seconds`` have passed, leaves the model in eval mode and returns
    ``{"iterations", "loss_first", "loss_last", "seconds"}``. ``device``: default the model's.
    """
    import distill
    import prune
    from reparam.utils.device import resolve_device

    if not (callable(steps) or (isinstance(steps, int) and not isinstance(steps, bool))):
        raise TypeError("steps must be an int or a callable step -> int")
    if isinstance(steps, int) and steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                    or not max_seconds > 0):
        raise ValueError(f"max_seconds must be None or a number > 0, got {max_seconds!r}")
    distill.get_loss(loss, "loss")  # a bad loss fails here, before any pruning

    def run(model: nn.Module, step: int) -> dict[str, Any]:
        n = steps(step) if callable(steps) else steps
        rec = _Recording(distill.Supervised(model, loss))
        start = time.perf_counter()

        def budget(_: int) -> None:
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                raise _OutOfTime

        try:
            distill.train_steps(rec, data, n, lambda params: prune.fresh_optimizer(model, optimizer, lr=lr),
                                lr=lr, batch_size=batch_size, device=resolve_device(device, model),
                                progress=progress, seed=seed + step, desc=f"finetune after prune step {step}",
                                on_step=budget, log_every=max(1, n))
        except _OutOfTime:
            pass
        model.eval()
        return {"iterations": len(rec.losses), "loss_first": rec.losses[0] if rec.losses else None,
                "loss_last": rec.losses[-1] if rec.losses else None, "seconds": time.perf_counter() - start}

    return run
