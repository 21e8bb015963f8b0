"""Opening a shrink run's data: training pairs that fit a patch, and the named evaluation sets."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["open_train_pairs", "open_eval_sets", "fitting_pairs"]


def fitting_pairs(pairs: Sequence[Any], patch_size: int | None, limit: int | None = None,
                  what: str = "--train-data") -> Any:
    """:func:`effsr.data.select_patch_pairs` with errors naming ``what``: the pairs that take a
    ``patch_size`` crop (None: auto), the patch size, and which images were left out (``.message()``)."""
    from effsr import data

    try:
        return data.select_patch_pairs(pairs, patch_size, limit)
    except ValueError as err:
        raise ValueError(f"{what}: {err} (--patch-size {'auto' if patch_size is None else patch_size})") from None


def open_train_pairs(spec: str, patch_size: int | None, limit: int | None = None) -> Any:
    """Training pairs of ``spec`` (folder or ``"default"``) that fit a ``patch_size`` crop (None: auto), as
    a :class:`effsr.data.PatchSelection`."""
    from effsr import data

    return fitting_pairs(data.open_dataset(spec), patch_size, limit, what=f"--train-data {spec}")


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
