"""Opening a shrink run's data: training pairs that fit a patch, and the named evaluation sets."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["open_train_pairs", "open_eval_sets", "fitting_pairs"]


def fitting_pairs(pairs: Sequence[Any], patch_size: int, limit: int | None = None) -> list[Any]:
    """The first ``limit`` (all when None) of ``pairs`` whose LR image fits a ``patch_size`` crop."""
    n = len(pairs) if limit is None else min(limit, len(pairs))
    chosen = []
    for i in range(len(pairs)):
        p = pairs[i]
        if min(p.lr.shape[:2]) >= patch_size:
            chosen.append(p)
        if len(chosen) >= n:
            break
    return chosen


def open_train_pairs(spec: str, patch_size: int, limit: int | None = None) -> list[Any]:
    """Training pairs of ``spec`` (folder or ``"default"``) whose LR image fits a ``patch_size`` crop."""
    from effsr import data

    chosen = fitting_pairs(data.open_dataset(spec), patch_size, limit)
    if not chosen:
        raise ValueError(f"--train-data: no image of {spec} has an LR side >= --patch-size {patch_size}")
    return chosen


def open_eval_sets(specs: Sequence[str], limit: int | None = None) -> dict[str, list[Any]]:
    """``{set name: pairs}`` for each eval folder (name = folder name, made unique)."""
    from effsr import data

    sets: dict[str, list[Any]] = {}
    for spec in specs:
        base = "default" if spec == "default" else Path(spec).resolve().name
        name, i = base, 2
        while name in sets:
            name, i = f"{base}_{i}", i + 1
        pairs = data.open_dataset(spec)
        n = len(pairs) if limit is None else min(limit, len(pairs))
        sets[name] = [pairs[j] for j in range(n)]
        if not sets[name]:
            raise ValueError(f"--eval-data: no images in {spec}")
    return sets
