"""Fine-tuning between pruning steps.

Pruning replaces parameters (new, smaller ``nn.Parameter`` objects), so an optimizer created before a
pruning step holds stale tensors and silently trains nothing. The helpers here build a **new
optimizer on every call**, which is what ``l2_filter_prune(..., finetune=...)`` needs.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm
from distill.losses import get_loss

__all__ = ["fresh_optimizer", "sr_finetune"]


def fresh_optimizer(model: nn.Module, optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
                    **kwargs: Any) -> torch.optim.Optimizer:
    """A new optimizer over ``model``'s *current* trainable parameters (call it after each pruning step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no trainable parameters")
    if isinstance(optimizer, str):
        table = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
        if optimizer not in table:
            raise ValueError(f"optimizer must be one of {sorted(table)} or a callable, got {optimizer!r}")
        optimizer = table[optimizer]
    elif not callable(optimizer):
        raise TypeError(f"optimizer must be a name or a callable, got {type(optimizer).__name__}")
    return optimizer(params, **kwargs)


def sr_finetune(
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    iterations: int | Callable[[int], int],
    lr: float = 2e-4,
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "l1",
    optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
    device: str | torch.device | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
) -> Callable[[nn.Module, int], dict[str, Any]]:
    """A ``finetune(model, step)`` callback for super-resolution models.

    ``loader`` yields ``(lr, hr)`` float batches in [0, 1] (e.g. a DataLoader over
    ``effsr.data.PatchDataset``); they are scaled by ``model.input_range`` (default 1). Each call builds
    a fresh optimizer (pruning replaced the parameters), trains ``iterations`` iterations
    (or ``iterations(step)``), stops early after ``max_seconds`` and returns
    ``{"iterations", "loss_first", "loss_last", "seconds"}``. The model is left in eval mode.
    """
    if not (callable(iterations) or (isinstance(iterations, int) and not isinstance(iterations, bool))):
        raise TypeError("iterations must be an int or a callable step -> int")
    if isinstance(iterations, int) and iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    loss_fn = get_loss(loss, "loss")  # one loss-name resolver for the project (l1, l2/mse, charbonnier, ...)
    batches = itertools.cycle(loader) if not hasattr(loader, "__next__") else loader

    def run(model: nn.Module, step: int) -> dict[str, Any]:
        n = iterations(step) if callable(iterations) else iterations
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        rng = float(getattr(model, "input_range", 1.0))
        opt = fresh_optimizer(model, optimizer, lr=lr)
        model.train()
        first = last = None
        start = time.perf_counter()
        done = 0
        for _ in tqdm(range(n), desc=f"finetune step {step}", disable=not progress, leave=False):
            lr_img, hr_img = next(batches)
            lr_img, hr_img = lr_img.to(dev) * rng, hr_img.to(dev) * rng
            out = model(lr_img)
            value = loss_fn(out / rng, hr_img / rng)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            last = float(value.detach())
            first = last if first is None else first
            done += 1
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
        model.eval()
        return {"iterations": done, "loss_first": first, "loss_last": last,
                "seconds": time.perf_counter() - start}

    return run
