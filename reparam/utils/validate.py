"""Argument checks shared by every package: each raises ``TypeError``/``ValueError`` naming the argument."""
from __future__ import annotations

import math
from typing import Any

__all__ = ["is_int", "is_number", "check_int", "check_bool"]


def is_int(value: Any) -> bool:
    """An ``int`` (or NumPy integer) that is not a ``bool``."""
    return not isinstance(value, bool) and hasattr(value, "__index__") and isinstance(value.__index__(), int)


def is_number(value: Any) -> bool:
    """A finite real number (``int``/``float``/NumPy scalar) that is not a ``bool``."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and not isinstance(value, (str, bytes))
    except (TypeError, ValueError):
        return False


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; ``TypeError`` (not an int) or ``ValueError`` (too small) naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool; ``TypeError`` naming ``name`` else."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value
