"""``train_steps``: a small training loop for a Distiller (or :class:`Supervised`), single-process or DDP.

Under ``torchrun`` it joins the process group from the environment, wraps the module in
DistributedDataParallel, shards a Dataset with a DistributedSampler (``batch_size`` is per process), shows a
progress bar named ``desc`` on rank 0 (:func:`reparam.utils.progress.progress`: plain lines when stderr is not a
terminal) and writes checkpoints from rank 0 only. Checkpoints hold tensors and plain values only
(``torch.load(..., weights_only=True)``): the trainable module's ``state_dict`` (student + adapters), the optimizer
and scheduler states, the weight average (``ema_decay``), the step and the loss history; they are written
atomically every ``checkpoint_every`` steps, at the end, and on ``KeyboardInterrupt``; with ``resume=True`` a later
call continues from the saved step.

Resuming is exact: when ``data`` is a dataset, the sampler is fast-forwarded past the batches already trained on
(whole epochs are drawn and dropped, so a seeded sampler's generator ends where it would have been, and the
current epoch skips its first batches without loading them), so an interrupted and resumed run ends with the
very same weights as one that never stopped.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from reparam.utils.io import atomic_write
from reparam.utils.validate import check_int
from reparam.utils.progress import progress as progress_bar

from . import ddp as ddp_utils
from .ema import WeightEMA, check_ema_decay
from .optim import MAX_RELATIVE_STEP, capped_lrs, lr_groups

__all__ = ["train_steps", "TrainResult", "save_checkpoint", "load_checkpoint"]

OptimizerFn = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFn = Callable[[torch.optim.Optimizer], Any]


@dataclass
class TrainResult:
    """What :func:`train_steps` did: steps run now (``steps_run``) out of ``step`` total, timing and loss history."""

    step: int
    start_step: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None
    interrupted: bool = False
    world_size: int = 1
    #: weight tensors whose learning rate the default optimizer capped (name -> lr), see :mod:`distill.optim`
    lr_capped: dict[str, float] = field(default_factory=dict)
    #: the decay of the weight average the module was given at the end (None: the last step's weights)
    ema_decay: float | None = None
    #: training ended because ``max_seconds`` of training time were spent (before ``steps``)
    out_of_time: bool = False
    #: training time of every call that trained this checkpoint, this one included (``seconds`` is this call's)
    total_seconds: float = 0.0

    @property
    def steps_run(self) -> int:
        return self.step - self.start_step

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps_run"] = self.steps_run
        return d


def save_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, step: int = 0, history: list[dict[str, float]] | None = None,
                    ema: dict[str, torch.Tensor] | None = None, seconds: float = 0.0) -> None:
    """Atomically write ``{"model", "optimizer", "scheduler", "ema", "step", "history", "seconds"}`` (tensors
    and plain values; ``model`` holds the training weights, ``ema`` their running average when there is one,
    ``seconds`` the training time spent so far)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"model": ddp_utils.unwrap(module).state_dict(), "step": int(step),
                             "history": [dict(h) for h in history or []], "seconds": float(seconds)}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if ema is not None:
        state["ema"] = ema
    atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, map_location: str | torch.device = "cpu") -> int:
    """Load a :func:`save_checkpoint` file (``weights_only=True``) into the given objects; returns the step."""
    return int(_load_checkpoint(path, module, optimizer, scheduler, map_location)["step"])


def _load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer | None,
                     scheduler: Any, map_location: str | torch.device) -> dict[str, Any]:
    state = torch.load(path, map_location=map_location, weights_only=True)
    ddp_utils.unwrap(module).load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    return {"step": int(state.get("step", 0)), "history": list(state.get("history", [])), "ema": state.get("ema"),
            "seconds": float(state.get("seconds", 0.0))}


class _SkippingBatchSampler(BatchSampler):
    """A :class:`BatchSampler` whose next pass drops its first ``skip`` batches (their indices are still drawn,
    so the sampler's random state advances exactly as if they had been trained on)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    for obj in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        if hasattr(obj, "set_epoch"):  # DistributedSampler order; PatchDataset crops
            obj.set_epoch(epoch)


def _batches(loader: DataLoader, done: int = 0) -> Iterator[Any]:
    """Batches of ``loader`` forever, epoch after epoch, starting after the first ``done`` batches."""
    epoch = 0
    batch_sampler = getattr(loader, "batch_sampler", None)
    if done and isinstance(batch_sampler, _SkippingBatchSampler):  # fast-forward without loading any data
        per_epoch = len(batch_sampler)
        if per_epoch == 0:
            raise ValueError("data yields no batches (dataset smaller than batch_size * world_size?)")
        while done >= per_epoch:
            _set_epoch(loader, epoch)
            for _ in batch_sampler:  # draws the epoch's order (advances a seeded sampler) and drops it
                pass
            done -= per_epoch
            epoch += 1
        batch_sampler.skip = done
        done = 0
    while True:
        _set_epoch(loader, epoch)
        n = 0
        for batch in loader:
            n += 1
            if done:  # a caller's own DataLoader: skip by loading (slower, same result)
                done -= 1
                continue
            yield batch
        if n == 0:
            raise ValueError("data yields no batches (dataset smaller than batch_size * world_size?)")
        epoch += 1


def train_steps(
    module: nn.Module,
    data: Dataset | DataLoader,
    steps: int,
    optimizer_fn: OptimizerFn | None = None,
    *,
    lr: float = 2e-4,
    batch_size: int = 16,
    scheduler_fn: SchedulerFn | None = None,
    device: str | torch.device | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    grad_clip: float | None = None,
    log_every: int = 10,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    on_step: Callable[[int], None] | None = None,
    ctx: ddp_utils.DistContext | None = None,
    max_relative_step: float | None = MAX_RELATIVE_STEP,
    channels_last: bool = False,
    ema_decay: float | None = None,
    max_seconds: float | None = None,
) -> TrainResult:
    """Train ``module`` (a :class:`Distiller` or anything whose ``forward(lr, hr)`` returns ``(loss, parts)``)
    until it has done ``steps`` optimizer steps in total (counting steps restored from ``checkpoint``).

    Args:
        data: a map-style dataset (e.g. :class:`effsr.data.PatchDataset`) of ``(lr, hr)`` pairs in [0, 1]
            (sampled with a seeded RandomSampler, or a DistributedSampler under DDP) or a ready DataLoader.
        optimizer_fn: ``params -> Optimizer``; default Adam (the report's teams all use it) at ``lr``, with the
            learning rate of any weight tensor whose RMS is below ``lr / max_relative_step`` capped at
            ``max_relative_step * RMS`` (:func:`distill.optim.relative_lr_groups`; ``None``: plain
            ``Adam(params, lr=lr)``). The caps are in ``TrainResult.lr_capped``; ``optimizer_fn`` ignores them.
        scheduler_fn: ``optimizer -> scheduler``, stepped once per step.
        device: default: ``ctx.device`` (``cuda:LOCAL_RANK`` under torchrun with nccl, else CPU).
        ctx: a :class:`distill.ddp.DistContext`; default :func:`distill.ddp.init_from_env` (joins torchrun's group).
        desc: the progress bar's name (say which job this is: "teacher training", "prune round 2 distill").
        on_step: ``on_step(step)`` after every optimizer step (after that step's checkpoint); raising
            ``KeyboardInterrupt`` in it stops training with a checkpoint at ``step`` (used to test resume).
        channels_last: train with the 4-D weights and the batches in ``torch.channels_last`` memory format
            (NHWC). The values are the same up to float rounding; on CPU oneDNN's NHWC convolutions are the
            faster ones (``benchmarks/train_speed.py``). The module, and a :class:`Distiller`'s teacher, are
            returned in ``torch.contiguous_format`` however training ends.
        ema_decay: keep an exponential moving average of the trainable parameters (:class:`distill.ema.WeightEMA`:
            ``decay`` with a warm-up, ``min(decay, (1 + t) / (10 + t))`` at step ``t``) and give it to the module
            when training reaches ``steps``; the checkpoint holds both, so a resumed run ends the same. An
            interrupted run leaves the module at its last step's weights. None (default): no average.
        max_seconds: a training-time budget: training also ends (as if ``steps`` were reached: the average is
            applied, ``TrainResult.out_of_time`` is set) once this many seconds of training have been spent,
            counting the time of earlier calls restored from ``checkpoint``; a resumed run whose budget is spent
            trains no further. ``steps`` stays the upper bound. The steps done depend on the machine's speed.

    Returns a :class:`TrainResult`; the trained student is ``module.student`` (updated in place).
    """
    check_int("steps", steps, 0)
    check_int("batch_size", batch_size, 1)
    check_int("checkpoint_every", checkpoint_every, 1)
    check_int("log_every", log_every, 1)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
        raise ValueError(f"grad_clip must be None or > 0, got {grad_clip!r}")
    ema_decay = check_ema_decay(ema_decay)
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                    or not math.isfinite(max_seconds) or max_seconds <= 0):
        raise ValueError(f"max_seconds must be None or a finite number > 0, got {max_seconds!r}")
    ctx = ctx or ddp_utils.init_from_env(device=device)
    dev = torch.device(device) if device is not None else ctx.device
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
    module.to(dev)

    if isinstance(data, DataLoader):
        loader = data
    elif isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if ctx.distributed:
            sampler = DistributedSampler(data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                         seed=seed, drop_last=True)
        else:
            sampler = RandomSampler(data, generator=torch.Generator().manual_seed(seed))
        loader = DataLoader(data, batch_sampler=_SkippingBatchSampler(sampler, batch_size, drop_last=True),
                            num_workers=num_workers, pin_memory=dev.type == "cuda")
    else:
        raise TypeError(
            f"data must be a map-style dataset (__len__, __getitem__) or a DataLoader, got {type(data).__name__}"
        )

    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("module has no parameters that require grad")
    # max_relative_step is validated whatever the optimizer; the RMS is measured only for the default one
    caps = capped_lrs(named if optimizer_fn is None else (), lr, max_relative_step)
    if optimizer_fn is not None:
        optimizer = optimizer_fn(params)
    else:
        optimizer = torch.optim.Adam(lr_groups(named, lr, caps), lr=lr)
    scheduler = scheduler_fn(optimizer) if scheduler_fn is not None else None
    ckpt = Path(checkpoint) if checkpoint is not None else None
    start = 0
    history: list[dict[str, float]] = []
    saved_ema = None
    spent = 0.0  # training seconds of earlier calls (from the checkpoint)
    if ckpt is not None and resume and ckpt.is_file():
        restored = _load_checkpoint(ckpt, module, optimizer, scheduler, map_location=dev)
        start, history, saved_ema = restored["step"], restored["history"], restored["ema"]
        spent = restored["seconds"]
        if ema_decay is not None and start > 0 and saved_ema is None:
            raise ValueError(f"ema_decay: checkpoint {ckpt} was written without a weight average; resume it "
                             "with ema_decay=None or start a new checkpoint")
    result = TrainResult(step=start, start_step=start, seconds=0.0, history=history, world_size=ctx.world_size,
                         checkpoint=str(ckpt) if ckpt is not None else None, lr_capped=caps, ema_decay=ema_decay,
                         total_seconds=spent)
    ema: WeightEMA | None = None
    t0 = time.perf_counter()

    def save() -> None:
        if ckpt is not None and ctx.is_main:
            save_checkpoint(ckpt, module, optimizer, scheduler, result.step, result.history,
                            ema=ema.state_dict() if ema is not None else None,
                            seconds=spent + time.perf_counter() - t0)

    def out_of_time() -> bool:
        if max_seconds is None:
            return False
        flag = torch.tensor([float(spent + time.perf_counter() - t0 >= max_seconds)], device=dev)
        if ctx.distributed:  # every rank stops at the same step: rank 0's clock decides
            torch.distributed.broadcast(flag, 0)
        return bool(flag.item())

    # with a time budget the number of steps is unknown: the bar counts steps without a total
    bar = progress_bar(total=steps if max_seconds is None else None, initial=min(start, steps),
                       disable=not (progress and ctx.is_main), unit="step",
                       desc=desc if max_seconds is None else f"{desc} (at most {max_seconds:g} s)")
    result.out_of_time = start < steps and out_of_time()
    sums: dict[str, float] = {}
    count = 0
    fmt = torch.channels_last if channels_last else None
    if fmt is not None:  # Adam's moments, made at the first step, follow the weights' strides
        module.to(memory_format=fmt)
    if ema_decay is not None:  # after the format: the averages are clones of the weights as they train
        ema = WeightEMA(named, ema_decay)
        if saved_ema is not None and start > 0:
            ema.load_state_dict({k: v.to(dev) for k, v in saved_ema.items()})
    try:
        model = ddp_utils.wrap(module, ctx)  # after loading and the format: every rank starts from the same weights
        model.train()
        batches = _batches(loader, done=start)  # per process: each step takes one batch on every rank
        while result.step < steps and not result.out_of_time:
            lr_img, hr_img = next(batches)[:2]
            lr_img = lr_img.to(dev, non_blocking=True)
            hr_img = hr_img.to(dev, non_blocking=True)
            if fmt is not None:
                lr_img, hr_img = lr_img.contiguous(memory_format=fmt), hr_img.contiguous(memory_format=fmt)
            loss, parts = model(lr_img, hr_img)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {result.step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            result.step += 1
            if ema is not None:
                ema.update(result.step)
            result.out_of_time = out_of_time()
            count += 1
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if result.step % log_every == 0 or result.step == steps or result.out_of_time:
                entry = {"step": float(result.step), **{k: v / count for k, v in sums.items()}}
                result.history.append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4g}")
                sums, count = {}, 0
            bar.update(1)
            if result.step % checkpoint_every == 0:
                save()
            if on_step is not None:
                on_step(result.step)
    except KeyboardInterrupt:
        result.interrupted = True
        save()
        raise
    finally:
        result.seconds = time.perf_counter() - t0
        result.total_seconds = spent + result.seconds
        bar.close()
        if fmt is not None:
            module.to(memory_format=torch.contiguous_format)
    save()  # the training weights and the average: a resumed run goes on from both
    if ema is not None:
        ema.copy_to_params()
    return result
