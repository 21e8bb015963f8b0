"""``RunState``: what the stages of a shrink run share, and small helpers on models the stages use."""
from __future__ import annotations

from effsr.inference import input_range as model_input_range

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ShrinkConfig
from .log import log
from .seeds import finetune_seed

__all__ = ["RunState", "barrier", "has_rep_blocks", "training_form", "count_params"]


@dataclasses.dataclass
class RunState:
    """What the stages share: settings, teacher, current student and its recipe, data, results."""

    cfg: ShrinkConfig
    run_dir: Path
    device: torch.device
    teacher: nn.Module
    train_pairs: list[Any]
    eval_sets: dict[str, list[Any]]
    dist: Any  # distill.ddp.DistContext
    student: nn.Module | None = None
    recipe: dict[str, Any] | None = None
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    teacher_label: str = "teacher"
    stage_index: int = 0  #: index of the stage running now (set by the runner; seeds derive from it)
    patch_size: int = 48  #: LR training patch side (``cfg.patch_size``, resolved when that is auto)
    stage_name: str = ""  #: name of the stage running now (set by the runner)
    #: folder for the running stage's mid-stage checkpoints (set by the runner; removed when the stage is saved)
    partial_dir: Path | None = None
    #: every training pair, also those smaller than the training patch (calibration crops are 32 px)
    calib_pairs: list[Any] = dataclasses.field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.dist.is_main

    @property
    def logfile(self) -> Path:
        return self.run_dir / "log.txt"

    def log(self, msg: str) -> None:
        log(msg, self.main, self.logfile)

    def stage_paths(self, stage: Any) -> tuple[Path, Path]:
        """The files a completed stage leaves: ``RUN_DIR/stages/<index>_<name>.safetensors`` (the student with
        its recipe) and ``.json`` (what it measured, the settings' fingerprint)."""
        base = self.run_dir / "stages" / f"{stage.index}_{stage.name}"
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def finetune_seed(self, step: int = 0) -> int:
        """Seed of the current stage's distillation fine-tune (pruning round ``step``)."""
        return finetune_seed(self.cfg.seed, self.stage_index, step)

    def verify_inputs(self) -> list[torch.Tensor]:
        """A few real LR images of the first eval set as float NCHW tensors in the model's input range."""
        pairs = next(iter(self.eval_sets.values()))[: self.cfg.verify_images]
        rng = model_input_range(self.teacher)
        return [torch.from_numpy(np.ascontiguousarray(p.lr.transpose(2, 0, 1))).float()[None] / 255.0 * rng
                for p in pairs]


def barrier(state: RunState) -> None:
    """Wait for every rank (no-op outside ``torchrun``)."""
    if state.dist.distributed:
        import torch.distributed as dist

        dist.barrier()


def has_rep_blocks(model: nn.Module) -> bool:
    from reparam import RepBlock

    return any(isinstance(m, RepBlock) for m in model.modules())


def training_form(model: nn.Module) -> nn.Module:
    """Rep blocks train in "online" mode (one conv with the merged kernel: fast, same gradients)."""
    import reparam

    if has_rep_blocks(model):
        reparam.set_mode(model, "online")
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
