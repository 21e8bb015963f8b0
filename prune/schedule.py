"""Pruning-ratio schedules: the cumulative fraction of filters removed after each step."""
from __future__ import annotations

import math
from typing import Callable, Sequence

__all__ = ["agp", "linear", "resolve_schedule", "check_ratio", "check_steps"]

Schedule = Callable[[float, int], Sequence[float]]


def check_ratio(ratio: object) -> float:
    """``ratio`` must be a real number in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in [0, 1), got {type(ratio).__name__}")
    r = float(ratio)
    if not math.isfinite(r) or not 0.0 <= r < 1.0:
        raise ValueError(f"ratio must be in [0, 1) (the fraction of prunable filters removed), got {ratio!r}")
    return r


def check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int >= 1, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps


def agp(ratio: float, steps: int) -> list[float]:
    """Automated gradual pruning (Zhu & Gupta 2017): ``r_t = ratio * (1 - (1 - t/steps)^3)``.

    Removes most filters early, when the network has the most redundancy, and little at the end.
    """
    return [ratio * (1.0 - (1.0 - t / steps) ** 3) for t in range(1, steps + 1)]


def linear(ratio: float, steps: int) -> list[float]:
    """The same number of filters each step: ``r_t = ratio * t / steps``."""
    return [ratio * t / steps for t in range(1, steps + 1)]


_NAMED: dict[str, Schedule] = {"agp": agp, "linear": linear}


def resolve_schedule(schedule: str | Schedule, ratio: float, steps: int) -> list[float]:
    """Cumulative ratios ``[r_1, ..., r_steps]`` with ``r_steps == ratio``, validated.

    A callable ``schedule(ratio, steps)`` may return ``steps`` values or ``steps + 1`` values starting
    with 0 (torch-pruning's scheduler convention).
    """
    if isinstance(schedule, str):
        if schedule not in _NAMED:
            raise ValueError(f"schedule must be one of {sorted(_NAMED)} or a callable, got {schedule!r}")
        fn = _NAMED[schedule]
    elif callable(schedule):
        fn = schedule
    else:
        raise TypeError(f"schedule must be 'agp', 'linear' or a callable (ratio, steps) -> ratios, got "
                        f"{type(schedule).__name__}")
    values = [float(v) for v in fn(ratio, steps)]
    if len(values) == steps + 1 and abs(values[0]) < 1e-12:
        values = values[1:]
    if len(values) != steps:
        raise ValueError(f"schedule returned {len(values)} ratios for steps={steps} (expected {steps})")
    prev = 0.0
    for i, v in enumerate(values):
        if not math.isfinite(v) or v < prev - 1e-12 or v > ratio + 1e-9:
            raise ValueError(f"schedule: ratios must be non-decreasing within [0, ratio={ratio}], got {values}")
        prev = v
    if abs(values[-1] - ratio) > 1e-9:
        raise ValueError(f"schedule: the last ratio must equal ratio={ratio}, got {values[-1]}")
    values[-1] = ratio
    return values
