"""Runtime budgets: ``--target-speedup X`` / ``--target-runtime MS``, met by pruning and timed on the run's device.

A parameter or FLOPs budget does not say how fast the student runs: a Tucker student has fewer parameters but
more layers and activations, and on a CPU or GPU it may run no faster than its teacher. A runtime budget is
therefore measured, on the device the run uses (``--device``, at torch's thread count) and at a stated LR input
size (``--runtime-size``, default 256 x 256):

1. the teacher is timed;
2. the pruning ratio is searched by bisection: at each ratio the network pruned to it (the structure of the
   uniform allocation; its weights do not matter for time) is timed beside the teacher, alternately, and the
   speed-up is the median ratio of a teacher forward over the student forward timed right after it, so a
   machine that slows down during the search slows both;
3. the parameter count of the slowest ratio that still meets the budget becomes the data-aware pruning's
   budget (:mod:`effsr.shrink.compress`), and the finished student is timed again beside its teacher.

A budget pruning cannot reach (even at the largest ratio) fails before any work with one line naming the
fastest reachable runtime.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["RUNTIME_SIZE", "timing_input", "time_pair", "params_for_runtime", "check_runtime_budget"]

#: LR input (height, width) of the runtime budget's timings when ``--runtime-size`` is not given.
RUNTIME_SIZE = (256, 256)
#: Bisection steps over the pruning ratio (the ratio is then known to within MAX_PRUNE_RATIO / 2**steps).
SEARCH_STEPS = 6


def _ms(model: nn.Module, x: torch.Tensor) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    model(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() - t0) * 1e3


def timing_input(size: Any, input_range: float, device: torch.device | str) -> torch.Tensor:
    """The one LR input every runtime-budget timing uses: a seeded random ``1 x 3 x H x W`` image in the range."""
    return (torch.rand(1, 3, int(size[0]), int(size[1]), generator=torch.Generator().manual_seed(0))
            * float(input_range)).to(device)


@torch.no_grad()
def time_pair(teacher: nn.Module, student: nn.Module, x: torch.Tensor, trials: int = 5, warmup: int = 1
              ) -> tuple[float, float, float]:
    """``(teacher ms, student ms, speed-up)`` of one forward on ``x``: the fastest of ``trials`` timings each, and
    the median over the trials of the teacher's time over the student's timed right after it (a pair timed back
    to back sees the same load, so the ratio survives other work on the machine better than either time)."""
    teacher.eval()
    student.eval()
    for _ in range(warmup):
        teacher(x)
        student(x)
    t, s = [], []
    for _ in range(trials):
        t.append(_ms(teacher, x))
        s.append(_ms(student, x))
    return min(t), min(s), statistics.median(a / b for a, b in zip(t, s))


def check_runtime_budget(target_speedup: float | None, target_runtime: float | None) -> None:
    """``ValueError`` naming the option for a speed-up that is not > 1 or a runtime that is not > 0."""
    from reparam.utils.validate import is_number

    if target_speedup is not None and target_runtime is not None:
        raise ValueError("--target-speedup and --target-runtime: give one runtime budget, not both")
    if target_speedup is not None and (not is_number(target_speedup) or not float(target_speedup) > 1.0
                                       or target_speedup == float("inf")):
        raise ValueError(f"--target-speedup must be a finite number > 1 (times faster than the teacher), "
                         f"got {target_speedup!r}")
    if target_runtime is not None and (not is_number(target_runtime) or not float(target_runtime) > 0
                                       or target_runtime == float("inf")):
        raise ValueError(f"--target-runtime must be a finite number of milliseconds > 0, got {target_runtime!r}")


def params_for_runtime(teacher: nn.Module, student: nn.Module, prune_at: Callable[[nn.Module, float], nn.Module],
                       max_ratio: float, *, target_speedup: float | None = None, target_runtime: float | None = None,
                       size: tuple[int, int] = RUNTIME_SIZE, input_range: float = 1.0, trials: int = 3,
                       device: torch.device | str = "cpu", log: Callable[[str], None] | None = None,
                       steps: int = SEARCH_STEPS) -> dict[str, Any]:
    """The parameter budget at which pruning ``student`` meets the runtime budget, with the timings that chose it.

    ``prune_at(student, ratio)`` returns ``student`` pruned by one uniform ``ratio`` (a copy). ``ValueError``
    naming the option when even ``max_ratio`` does not meet the budget. ``steps`` bisection steps (0: only that
    check).
    """
    check_runtime_budget(target_speedup, target_runtime)
    if (target_speedup is None) == (target_runtime is None):
        raise ValueError("give exactly one of --target-speedup or --target-runtime")
    dev = torch.device(device)
    x = timing_input(size, input_range, dev)
    teacher = teacher.to(dev).eval()
    arg = "--target-speedup" if target_speedup is not None else "--target-runtime"
    where = f"{dev.type} ({torch.get_num_threads()} threads)" if dev.type == "cpu" else str(dev)
    search: list[dict[str, Any]] = []

    def meets(ratio: float) -> tuple[bool, nn.Module, dict[str, Any]]:
        cand = prune_at(student, ratio).to(dev).eval() if ratio > 0 else student.to(dev).eval()
        t_ms, s_ms, gain = time_pair(teacher, cand, x, trials=trials)
        ok = gain >= target_speedup if target_speedup is not None else s_ms <= target_runtime
        row = {"ratio": round(ratio, 5), "params": sum(p.numel() for p in cand.parameters()),
               "teacher_ms": round(t_ms, 3), "student_ms": round(s_ms, 3), "speedup": round(gain, 4),
               "meets": ok}
        search.append(row)
        if log is not None:
            log(f"runtime budget: ratio {ratio:.3f}: {row['params']:,} params, {s_ms:.1f} ms vs the teacher's "
                f"{t_ms:.1f} ms ({row['speedup']:.2f}x){' - meets it' if ok else ''}")
        return ok, cand, row

    ok, _, fastest = meets(max_ratio)
    if not ok:
        raise ValueError(f"{arg}: cannot be reached on {where} at {size[0]}x{size[1]}: pruning reaches at best "
                         f"{fastest['student_ms']:.1f} ms ({fastest['speedup']:.2f}x the teacher's "
                         f"{fastest['teacher_ms']:.1f} ms)")
    lo, hi, best = 0.0, max_ratio, fastest
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok, _, row = meets(mid)
        if ok:
            hi, best = mid, row
        else:
            lo = mid
    return {"target_params": best["params"], "ratio": best["ratio"], "predicted_speedup": best["speedup"],
            "predicted_ms": best["student_ms"], "teacher_ms": best["teacher_ms"], "size": [int(size[0]), int(size[1])],
            "device": where, "trials": trials, "target_speedup": target_speedup, "target_runtime_ms": target_runtime,
            "search": search}
