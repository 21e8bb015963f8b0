"""Fine-tuning between pruning steps: a fresh optimizer per call.

Pruning replaces parameters (new, smaller ``nn.Parameter`` objects), so an optimizer created before a
pruning step holds stale tensors and silently trains nothing. :func:`fresh_optimizer` builds a **new
optimizer over the current parameters**, which is what a ``l2_filter_prune(..., finetune=...)`` callback
needs. (A ready-made SR fine-tune callback, on ``distill.train_steps``, is ``effsr.train.sr_finetune``.)
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["fresh_optimizer"]


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
