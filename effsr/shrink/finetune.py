"""Distillation fine-tuning of a student by the run's teacher (after repify, each pruning round, Tucker)."""
from __future__ import annotations

import math
import os
from typing import Any, Callable

from distill.optim import MAX_RELATIVE_STEP
from effsr.inference import input_range as model_input_range

from torch import nn

from .config import COSINE_FLOOR, LR_SCHEDULES
from .seeds import seed_everything
from .state import RunState, training_form

__all__ = ["distill_finetune", "feature_pairs", "feature_layers", "check_feature_layers", "lr_scheduler",
           "STOP_STEP_ENV", "stop_hook"]

#: Test hook: ``EFFSR_SHRINK_STOP_AT_STEP=<stage>:<round>:<step>`` raises KeyboardInterrupt after distillation
#: step ``step`` of pruning round ``round`` (0 for the other stages) of stage ``stage`` (``teacher_training``
#: for the demo's teacher) -- a checkpoint of
#: that step is written first, so ``--resume`` continues from there.
STOP_STEP_ENV = "EFFSR_SHRINK_STOP_AT_STEP"


def stop_hook(stage: str, round_: int) -> Any:
    """The :data:`STOP_STEP_ENV` hook for ``train_steps(on_step=...)`` of ``stage`` / ``round_``, or None."""
    spec = os.environ.get(STOP_STEP_ENV)
    if not spec:
        return None
    try:
        name, r, step = spec.split(":")
        r_i, step_i = int(r), int(step)
    except ValueError:
        raise ValueError(f"{STOP_STEP_ENV}: expected <stage>:<round>:<step>, got {spec!r}") from None
    if name != stage or r_i != round_:
        return None

    def hook(done: int) -> None:
        if done == step_i:
            raise KeyboardInterrupt(f"stopped at {stage} round {round_} step {done} ({STOP_STEP_ENV})")
    return hook


def lr_scheduler(schedule: str, steps: int) -> Callable[[Any], Any] | None:
    """``train_steps``' ``scheduler_fn`` for ``--lr-schedule`` over a fine-tune of ``steps`` steps (None: constant).

    ``"cosine"`` multiplies every parameter group's learning rate (capped small-weight groups included, see
    :mod:`distill.optim`) by ``f + (1 - f) * (1 + cos(pi * k / steps)) / 2`` at step ``k``, ``f`` =
    :data:`~effsr.shrink.config.COSINE_FLOOR`: the first step at ``lr``, ``f * lr`` reached after the last.
    """
    if schedule == "constant":
        return None
    if schedule != "cosine":
        raise ValueError(f"--lr-schedule: unknown schedule {schedule!r}; choose from {', '.join(LR_SCHEDULES)}")

    def factor(k: int) -> float:
        return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / max(steps, 1)))

    def make(opt: Any) -> Any:
        import torch

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return make


def feature_pairs(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Top-level block names (``B1``..``Bn``) present in both networks: feature distillation points."""
    t = {n for n, _ in teacher.named_children()}
    s = {n for n, _ in student.named_children()}
    names = [n for n in t & s if n[:1] == "B" and n[1:].isdigit()]
    return sorted(names, key=lambda n: int(n[1:]))


def feature_layers(state: RunState, student: nn.Module) -> tuple[list[str], str]:
    """The feature distillation points of this run and how they were chosen: ``--feature-layers NAMES``; ``blocks``:
    the network's repeated blocks at the input's resolution; by default the zoo's B1..Bn blocks, and the output
    only for a user's network (300 steps on LightRLFN: block features -0.545 dB from the teacher, the output only
    -0.316, docs/results.md); none when ``--feature-weight`` is 0 or no block is found."""
    import torch

    from distill.blocks import block_layers
    from effsr.models import source_of

    cfg, teacher = state.cfg, state.teacher
    if cfg.feature_weight <= 0:
        return [], "output only (--feature-weight 0)"
    if isinstance(cfg.feature_layers, list):
        return list(cfg.feature_layers), "given (--feature-layers)" if cfg.feature_layers else "output only (given)"
    if cfg.feature_layers is None:
        if source_of(teacher) is None:
            return feature_pairs(teacher, student), "the network's B1..Bn blocks"
        return [], "output only (the default for a user's network; --feature-layers blocks distils its blocks)"
    dev = next(teacher.parameters()).device
    example = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev) * model_input_range(teacher)
    names = block_layers(teacher, student, example=example)
    if not names:
        return [], "output only (no repeated blocks returning one feature map at the input's resolution)"
    return names, "the network's repeated blocks (--feature-layers blocks)"


def check_feature_layers(teacher: nn.Module, names: list[str] | str | None) -> None:
    """``ValueError`` naming ``--feature-layers`` when a given name is not a module of ``teacher``."""
    if not names or not isinstance(names, list):
        return
    have = dict(teacher.named_modules())
    missing = [n for n in names if n not in have]
    if missing:
        import difflib

        close = difflib.get_close_matches(missing[0], [n for n in have if n], n=3, cutoff=0.5)
        raise ValueError(f"--feature-layers: the teacher has no module {missing[0]!r}"
                         + (f" (close: {', '.join(close)})" if close else ""))


def distill_finetune(state: RunState, student: nn.Module, steps: int, seed: int, label: str) -> dict[str, Any]:
    """Distil ``state.teacher`` into ``student`` for ``steps`` steps (block features + teacher output + GT L1).

    Builds a fresh :class:`distill.Distiller` (and so a fresh optimizer): call it again after pruning.
    When the runner gave the stage a ``state.partial_dir``, training is checkpointed there every
    ``cfg.checkpoint_every`` steps and on interruption (one file per fine-tune, keyed by ``seed``), and
    with ``cfg.resume`` continues from that checkpoint: a finished fine-tune is restored without
    training, an interrupted one continues at its step, so the weights are those of an uninterrupted run.
    """
    import distill
    from effsr.data import PatchDataset

    cfg = state.cfg
    if steps == 0:
        return {"steps": 0}
    seed_everything(seed)
    training_form(student)
    student.to(state.device).train()
    teacher = state.teacher.to(state.device)
    rng = model_input_range(teacher)
    names, how = feature_layers(state, student)
    pairs = [(n, n, cfg.feature_weight / rng) for n in names]
    ds = PatchDataset(state.train_pairs, patch_size=state.patch_size, augment=True,
                      length=max(len(state.train_pairs), cfg.batch_size * state.dist.world_size), seed=seed)
    d = distill.Distiller(teacher, student, pairs=pairs, adapter="conv1x1", output_weight=1.0, gt_weight=1.0)
    round_ = seed - state.finetune_seed(0)  # pruning round (0 outside pruning)
    ckpt = state.partial_dir / f"finetune_{seed}.pt" if state.partial_dir is not None else None
    try:
        res = distill.train_steps(d, ds, steps, lr=cfg.lr, batch_size=cfg.batch_size, device=state.device,
                                  seed=seed, scheduler_fn=lr_scheduler(cfg.lr_schedule, steps),
                                  channels_last=cfg.channels_last, ema_decay=cfg.ema_decay,
                                  max_seconds=cfg.train_minutes * 60 if cfg.train_minutes is not None else None,
                                  progress=cfg.progress, ctx=state.dist,
                                  log_every=max(1, min(steps // 10, 100)), desc=f"{label}: distill", checkpoint=ckpt,
                                  checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
                                  on_step=stop_hook(state.stage_name, round_))
    finally:
        d.close()
    student.eval()
    hist = res.history
    info = {"steps": res.step, "seconds": round(res.seconds, 3), "train_seconds": round(res.total_seconds, 3),
            "out_of_time": res.out_of_time, "pairs": names, "feature_layers": how,
            "loss_first": hist[0]["loss"] if hist else None, "loss_last": hist[-1]["loss"] if hist else None,
            "ema_decay": res.ema_decay}
    if res.lr_capped:
        info["lr_capped"] = dict(res.lr_capped)
        low = min(res.lr_capped, key=res.lr_capped.__getitem__)
        state.log(f"{label}: learning rate capped at {MAX_RELATIVE_STEP:.0%} of the weights' RMS per step for "
                  f"{len(res.lr_capped)} small-weight tensor(s) (smallest: {low}, lr {res.lr_capped[low]:.2g})")
    resumed = f" (resumed at step {res.start_step})" if res.start_step else ""
    ema = f"; student = their weight average (EMA decay {res.ema_decay:g})" if res.ema_decay is not None else ""
    state.log(f"{label}: feature distillation at {', '.join(names) or 'the output only'}: {how}")
    budget = f", the --train-minutes {cfg.train_minutes:g} budget reached" if res.out_of_time else ""
    state.log(f"{label}: {res.step} distillation steps{resumed}, loss {info['loss_first']} -> {info['loss_last']} "
              f"({res.seconds:.1f} s{budget}){ema}")
    return info
