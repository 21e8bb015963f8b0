"""Every seed of a shrink run, derived in one place from ``--seed``.

* stage ``k`` starts with :func:`seed_everything` ``(stage_seed(seed, k))`` = ``seed*1000 + k``;
* the distillation fine-tune of stage ``k`` (round ``step`` of pruning, 0 otherwise) uses
  :func:`finetune_seed` ``(seed, k, step)`` = ``seed*1000 + k*100 + step`` for its data order and init;
* the demo teacher trains with ``seed`` itself.
"""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "stage_seed", "finetune_seed"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stage_seed(seed: int, stage_index: int) -> int:
    """The seed set before stage ``stage_index`` runs."""
    return seed * 1000 + stage_index


def finetune_seed(seed: int, stage_index: int, step: int = 0) -> int:
    """The seed of the distillation fine-tune of stage ``stage_index`` (pruning round ``step``, else 0)."""
    return seed * 1000 + stage_index * 100 + step
