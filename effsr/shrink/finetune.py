"""Distillation fine-tuning of a student by the run's teacher (after repify, each pruning round, Tucker)."""
from __future__ import annotations

from typing import Any

from torch import nn

from .seeds import seed_everything
from .state import RunState, training_form

__all__ = ["distill_finetune", "feature_pairs"]


def feature_pairs(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Top-level block names (``B1``..``Bn``) present in both networks: feature distillation points."""
    t = {n for n, _ in teacher.named_children()}
    s = {n for n, _ in student.named_children()}
    names = [n for n in t & s if n[:1] == "B" and n[1:].isdigit()]
    return sorted(names, key=lambda n: int(n[1:]))


def distill_finetune(state: RunState, student: nn.Module, steps: int, seed: int, label: str) -> dict[str, Any]:
    """Distil ``state.teacher`` into ``student`` for ``steps`` steps (block features + teacher output + GT L1).

    Builds a fresh :class:`distill.Distiller` (and so a fresh optimizer): call it again after pruning.
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
    rng = float(getattr(teacher, "input_range", 1.0))
    names = feature_pairs(teacher, student) if cfg.feature_weight > 0 else []
    pairs = [(n, n, cfg.feature_weight / rng) for n in names]
    ds = PatchDataset(state.train_pairs, patch_size=state.patch_size, augment=True,
                      length=max(len(state.train_pairs), cfg.batch_size * state.dist.world_size), seed=seed)
    d = distill.Distiller(teacher, student, pairs=pairs, adapter="conv1x1", output_weight=1.0, gt_weight=1.0)
    try:
        res = distill.train_steps(d, ds, steps, lr=cfg.lr, batch_size=cfg.batch_size, device=state.device,
                                  seed=seed, progress=cfg.progress, ctx=state.dist,
                                  log_every=max(1, steps // 10))
    finally:
        d.close()
    student.eval()
    hist = res.history
    info = {"steps": res.steps_run, "seconds": round(res.seconds, 3), "pairs": names,
            "loss_first": hist[0]["loss"] if hist else None, "loss_last": hist[-1]["loss"] if hist else None}
    state.log(f"{label}: {res.steps_run} distillation steps, loss {info['loss_first']} -> {info['loss_last']} "
              f"({res.seconds:.1f} s)")
    return info
