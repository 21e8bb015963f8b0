"""``refine_blocks``: block-wise reconstruction of a compressed student on calibration inputs.

A student made from its teacher by pruning or decomposition keeps the teacher's structure: the same blocks,
under the same names. Layer-wise least squares (``prune.reconstruct``, data-aware Tucker) fits each conv on
its own; the nonlinearities, attention and residual paths *inside* a block still add up errors. Here every
block is fitted as a whole, in execution order, with a few Adam steps on calibration inputs only: its input
is what the (already refined) student feeds it, its target the teacher's block output on the same images
(the idea of BRECQ, Li et al. 2021, for compressed rather than quantized networks). No end-to-end training:
each block sees only its own input and its own target, so the cost is a few forward/backward passes of one
block per step.

A block's update is kept only when its loss on all calibration inputs falls; otherwise its weights are put
back. A block that cannot be fitted (not called, called more than once, output not one tensor, output
channels that differ from the teacher's without a channel map) is skipped and the reason recorded.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> def net(c):
...     return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()),
...                          nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()), nn.Conv2d(c, 3, 3, padding=1))
>>> teacher, student = net(8), net(8)
>>> student, report = refine_blocks(teacher, student, torch.rand(16, 3, 12, 12), ["1", "2"], steps=30, lr=1e-2)
>>> [b.loss_after < b.loss_before for b in report.blocks]
[True, True]
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from reparam.utils.progress import progress as progress_bar
from reparam.utils.validate import is_int, is_number

from .optim import MAX_RELATIVE_STEP, capped_lrs, lr_groups

__all__ = ["refine_blocks", "RefineReport", "BlockFit"]


@dataclass
class BlockFit:
    """One block: its relative calibration loss ``||f(x) - y||^2 / ||y||^2`` before and after the steps."""

    name: str
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    kept: bool = False  #: the refined weights were kept (the loss fell); else the block is as it was
    steps: int = 0
    seconds: float = 0.0
    skipped: str | None = None  #: why the block was not fitted (None: fitted)


@dataclass
class RefineReport:
    """What :func:`refine_blocks` did, block by block."""

    blocks: list[BlockFit] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    lr: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"block refinement: {sum(b.kept for b in self.blocks)}/{len(self.blocks)} block(s) improved, "
                 f"{self.steps} steps each at lr {self.lr:g}, {self.seconds:.1f} s"]
        for b in self.blocks:
            if b.skipped:
                lines.append(f"  {b.name:<24} skipped: {b.skipped}")
            else:
                lines.append(f"  {b.name:<24} loss {b.loss_before:.4g} -> {b.loss_after:.4g}"
                             + ("" if b.kept else " (measured only)" if b.steps == 0
                                else " (no gain: weights put back)"))
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


class _Stop(Exception):
    """Ends a forward pass once the block of interest has run."""


def _batches(inputs: Any) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        if inputs.dim() < 2 or inputs.shape[0] == 0:
            raise ValueError(f"inputs: expected a batch tensor [N, ...] with N >= 1, got shape {tuple(inputs.shape)}")
        return list(inputs.split(8))
    found = getattr(inputs, "batches", inputs)  # a prune.Calibration carries its batches
    if isinstance(found, (list, tuple)) and found and all(isinstance(b, Tensor) for b in found):
        return list(found)
    raise TypeError("inputs must be a tensor [N, ...], a non-empty list of batch tensors or a Calibration, got "
                    f"{type(inputs).__name__}")


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _run_until(model: nn.Module, handle: Any, x: Tensor) -> None:
    """Run ``model`` on ``x`` until the hook behind ``handle`` raises :class:`_Stop`; then remove the hook."""
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()


def _capture_output(model: nn.Module, block: nn.Module, x: Tensor) -> Any:
    got: list[Any] = []

    def hook(_m: nn.Module, _args: Any, out: Any) -> None:
        got.append(out)
        raise _Stop

    _run_until(model, block.register_forward_hook(hook), x)
    return got[0] if got else None


def _capture_input(model: nn.Module, block: nn.Module, x: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    got: list[Any] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got.append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args),
                    {k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()}))
        raise _Stop

    _run_until(model, block.register_forward_pre_hook(hook, with_kwargs=True), x)
    return got[0] if got else None


def _calls(model: nn.Module, names: Sequence[str], x: Tensor) -> dict[str, int]:
    """How often each named block runs in one forward pass, in the order they first run."""
    count: dict[str, int] = {}
    handles = []
    for n in names:
        def hook(_m: nn.Module, _args: Any, _n: str = n) -> None:
            count[_n] = count.get(_n, 0) + 1
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return count


def _rel_loss(out: Tensor, target: Tensor) -> Tensor:
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def _full_loss(block: nn.Module, xs: list[tuple[tuple[Any, ...], dict[str, Any]]], ys: list[Tensor]) -> float:
    num = den = 0.0
    for (args, kwargs), y in zip(xs, ys):
        out = block(*args, **kwargs)
        num += float((out - y).pow(2).sum())
        den += float(y.pow(2).sum())
    return num / max(den, 1e-12)


def _check(steps: Any, lr: Any, seed: Any, max_relative_step: Any) -> None:
    if not is_int(steps) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not (is_number(lr) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if max_relative_step is not None and not (is_number(max_relative_step) and max_relative_step > 0):
        raise ValueError(f"max_relative_step must be None or a number > 0, got {max_relative_step!r}")


def refine_blocks(teacher: nn.Module, student: nn.Module, inputs: Any, blocks: Iterable[str], *,
                  channels: Mapping[str, Sequence[int]] | None = None, steps: int = 100, lr: float = 1e-3,
                  seed: int = 0, inplace: bool = False, progress: bool = False,
                  max_relative_step: float | None = MAX_RELATIVE_STEP) -> tuple[nn.Module, RefineReport]:
    """Fit each of ``student``'s ``blocks`` (module names it shares with ``teacher``) to the teacher's output of
    the same block, in execution order, on calibration ``inputs`` only.

    Args:
        inputs: network inputs (in the range the network takes): a tensor ``[N, ...]`` (cut in batches of 8),
            a list of batch tensors, or a :class:`prune.Calibration`.
        channels: ``{block: teacher output channels the student kept}`` for blocks whose output lost channels
            (pruning); blocks not in it must output the teacher's channel count.
        steps: Adam steps per block, one calibration batch (drawn with ``seed``) each; 0 only measures.
        lr: Adam's learning rate; a weight tensor whose RMS is small gets at most ``max_relative_step`` times
            its RMS per step (:func:`distill.optim.relative_lr_groups`; None: no cap).
        inplace: refine ``student`` itself (default: a copy).

    Returns ``(student, RefineReport)``. ``teacher`` is not changed; both networks are left in eval mode.
    """
    if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
        raise TypeError("teacher and student must be torch.nn.Module instances, got "
                        f"{type(teacher).__name__} and {type(student).__name__}")
    _check(steps, lr, seed, max_relative_step)
    if isinstance(blocks, str):
        raise TypeError("blocks must be a list of module names, not one string")
    names = list(blocks)
    have_t, have_s = dict(teacher.named_modules()), dict(student.named_modules())
    for n in names:
        if not isinstance(n, str) or n not in have_t or n not in have_s:
            raise ValueError(f"blocks: {n!r} is not a module of both the teacher and the student")
    channels = dict(channels or {})
    batches = _batches(inputs)
    if not inplace:
        student = copy.deepcopy(student)
        have_s = dict(student.named_modules())
    dev = _device(student)
    teacher.eval()
    student.eval()
    report = RefineReport(steps=int(steps), lr=float(lr))
    t0 = time.perf_counter()
    with torch.no_grad():
        calls = _calls(student, names, batches[0].to(dev))
    order = [n for n in calls] + [n for n in names if n not in calls]
    gen = torch.Generator().manual_seed(int(seed))
    bar = progress_bar(total=len(order), desc="block refinement", unit="block", disable=not progress)
    for name in order:
        fit = BlockFit(name=name)
        report.blocks.append(fit)
        tb = time.perf_counter()
        block_s, block_t = have_s[name], have_t[name]
        if name not in calls:
            fit.skipped = "not called by the student's forward"
        elif calls[name] > 1:
            fit.skipped = f"called {calls[name]} times per forward (shared)"
        else:
            fit.skipped = _fit_block(teacher, student, block_t, block_s, batches, channels.get(name), fit, steps,
                                     lr, gen, max_relative_step, dev)
        fit.seconds = round(time.perf_counter() - tb, 3)
        bar.update(1)
    bar.close()
    report.seconds = round(time.perf_counter() - t0, 3)
    return student, report


def _fit_block(teacher: nn.Module, student: nn.Module, block_t: nn.Module, block_s: nn.Module,
               batches: list[Tensor], keep: Sequence[int] | None, fit: BlockFit, steps: int, lr: float,
               gen: torch.Generator, max_relative_step: float | None, dev: torch.device) -> str | None:
    """Fit one block; returns why it was skipped, or None."""
    xs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    ys: list[Tensor] = []
    tdev = _device(teacher)
    with torch.no_grad():
        for b in batches:
            y = _capture_output(teacher, block_t, b.to(tdev))
            got = _capture_input(student, block_s, b.to(dev))
            if not isinstance(y, Tensor) or got is None:
                return "its output is not one tensor"
            if keep is not None:
                y = y[:, list(keep)]
            xs.append(got)
            ys.append(y.to(dev))
        out = block_s(*xs[0][0], **xs[0][1])
    if not isinstance(out, Tensor) or out.shape != ys[0].shape:
        got_shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        return f"its output {got_shape} differs from the teacher's {tuple(ys[0].shape)} (give its kept channels)"
    named = [(n, p) for n, p in block_s.named_parameters() if p.is_floating_point()]
    if not named:
        return "no parameters"
    saved = {k: v.detach().clone() for k, v in block_s.state_dict().items()}
    flags = [p.requires_grad for _, p in named]
    with torch.no_grad():
        fit.loss_before = _full_loss(block_s, xs, ys)
    if steps == 0:
        fit.loss_after = fit.loss_before
        return None
    try:
        for _, p in named:
            p.requires_grad_(True)
        caps = capped_lrs(named, lr, max_relative_step)
        opt = torch.optim.Adam(lr_groups(named, lr, caps), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                i = int(torch.randint(len(xs), (1,), generator=gen))
                args, kwargs = xs[i]
                loss = _rel_loss(block_s(*args, **kwargs), ys[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        fit.steps = steps
    finally:
        for (_, p), f in zip(named, flags):
            p.requires_grad_(f)
            p.grad = None
    with torch.no_grad():
        fit.loss_after = _full_loss(block_s, xs, ys)
    fit.kept = math.isfinite(fit.loss_after) and fit.loss_after < fit.loss_before
    if not fit.kept:
        block_s.load_state_dict(saved)
        fit.loss_after = fit.loss_before if not math.isfinite(fit.loss_after) else fit.loss_after
    return None
