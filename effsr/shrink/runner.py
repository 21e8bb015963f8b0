"""Running the stages: :class:`StageRunner` (seeds, checkpoints, resume) and :func:`run_shrink` (set-up).

Before stage ``k`` the runner seeds ``torch``/``numpy``/``random`` (:func:`~effsr.shrink.seeds.stage_seed`);
after it, it writes ``RUN_DIR/stages/<k>_<name>.safetensors`` (the student with its recipe, see
:mod:`effsr.shrink.recipe`) and ``<k>_<name>.json`` (what the stage measured, the settings' fingerprint).
With ``resume=True`` a completed stage is skipped and its student reloaded from those files, so an
interrupted run that is resumed ends with the same weights as one that was never interrupted.

Under ``torchrun`` every process runs the pipeline (pruning and Tucker are deterministic, so all ranks
make the same cuts); distillation steps are data-parallel (:func:`distill.train_steps`), and only rank 0
evaluates and writes files.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from reparam.utils.io import write_json

from .config import ShrinkConfig
from .finetune import check_feature_layers
from .inputs import fitting_pairs, open_eval_sets, open_train_pairs
from .recipe import load_student, save_student
from .seeds import seed_everything, stage_seed
from .stages import STAGES, Stage
from .state import RunState, barrier, count_params

__all__ = ["StageRunner", "run_shrink", "load_teacher", "STOP_ENV", "stage_fingerprint"]

#: Test hook: ``EFFSR_SHRINK_STOP_AFTER=<stage name>`` raises KeyboardInterrupt after that stage is saved.
STOP_ENV = "EFFSR_SHRINK_STOP_AFTER"


def stage_fingerprint(cfg: ShrinkConfig, stage: Stage) -> str:
    """Hash of the settings that decide the student after ``stage``: the common ones and the
    ``settings`` of this stage and every stage before it (later stages' settings are left out)."""
    later = {f for s in STAGES if s.index > stage.index for f in s.settings}
    return cfg.fingerprint(exclude=later)


class StageRunner:
    """Runs the stages in order with per-stage seeds, checkpoints and resume."""

    def __init__(self, state: RunState, stop_after: str | None = None) -> None:
        self.state = state
        self.stop_after = stop_after if stop_after is not None else os.environ.get(STOP_ENV) or None

    def paths(self, stage: Stage) -> tuple[Path, Path]:
        """:meth:`RunState.stage_paths` of ``stage``."""
        return self.state.stage_paths(stage)

    def _resume(self, stage: Stage, fingerprint: str) -> bool:
        st = self.state
        weights, meta = self.paths(stage)
        if not (st.cfg.resume and meta.is_file()):
            return False
        info = json.loads(meta.read_text(encoding="utf-8"))
        if info.get("fingerprint") != fingerprint:
            raise ValueError(f"--resume: {meta} was written with different settings (fingerprint "
                             f"{info.get('fingerprint')} vs {fingerprint}); use a new --out folder")
        if weights.is_file():
            st.student = load_student(weights, device=st.device)
            st.recipe = info["recipe"]
        st.results[stage.name] = info["result"]
        st.log(f"stage {stage.index} {stage.name}: done before, reloaded from "
               f"{weights.name if weights.is_file() else meta.name}")
        return True

    def run_stage(self, stage: Stage) -> None:
        st = self.state
        k, name = stage.index, stage.name
        if not stage.enabled(st.cfg):
            st.log(f"stage {k} {name}: skipped (not requested)")
            return
        fingerprint = stage_fingerprint(st.cfg, stage)
        if self._resume(stage, fingerprint):
            return
        st.log(f"stage {k} {name}: start")
        st.stage_index, st.stage_name = k, name
        # mid-stage checkpoints (each fine-tune of the stage), keyed by the stage's settings
        st.partial_dir = st.run_dir / "stages" / "partial" / f"{k}_{name}-{fingerprint}"
        seed_everything(stage_seed(st.cfg.seed, k))
        t0 = time.perf_counter()
        result = stage.run(st)
        seconds = time.perf_counter() - t0
        result["seconds"] = round(seconds, 3)
        result["params"] = count_params(st.student) if st.student is not None else None
        st.results[name] = result
        weights, meta = self.paths(stage)
        if st.main:
            if stage.saves_student:
                save_student(st.student.cpu(), st.recipe, weights)
                st.student.to(st.device)
            write_json(meta, {"stage": name, "index": k, "fingerprint": fingerprint, "recipe": st.recipe,
                              "result": result, "seconds": seconds})
        if name != "report":  # rank 0 alone measures and writes the report; nobody waits for it
            barrier(st)
        if st.main:  # the stage is saved whole: its mid-stage checkpoints are no longer needed
            shutil.rmtree(st.partial_dir, ignore_errors=True)
            _remove_empty(st.partial_dir.parent)
        st.partial_dir = None
        st.log(f"stage {k} {name}: done in {seconds:.1f} s")
        if self.stop_after == name:
            raise KeyboardInterrupt(f"stopped after stage {name!r} ({STOP_ENV})")

    def run(self) -> dict[str, Any]:
        for stage in STAGES:
            self.run_stage(stage)
        return self.state.results


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass


def load_teacher(cfg: ShrinkConfig) -> nn.Module:
    """The teacher of ``cfg``: a zoo checkpoint or a user's network through ``effsr.models.open_model``, or a
    fused-only recipe."""
    from effsr import models

    from .recipe import has_recipe

    if has_recipe(cfg.weights):
        teacher = load_student(cfg.weights, location=cfg.model if models.is_user_spec(cfg.model) else None)
        if not models.is_user_spec(cfg.model) and teacher.arch != cfg.model:
            raise ValueError(f"--weights: {cfg.weights} is a shrunk {teacher.arch!r}, not {cfg.model!r}")
        if any(op["op"] != "fuse" for op in teacher.recipe["ops"]):
            raise ValueError(f"--weights: {cfg.weights} is a shrunk student; its recipe cannot be shrunk again "
                             "(pass the original teacher checkpoint)")
        return teacher
    try:
        return models.open_model(cfg.model, cfg.weights, config=cfg.model_config or None,
                                 input_range=cfg.input_range, scale=cfg.scale, weights_key=cfg.weights_key)
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as err:
        from effsr.cli_model import as_flags

        text = str(err)
        if text.startswith(("input_range", "scale", "weights_key", "config", "model")):
            raise ValueError(as_flags(text)) from err
        raise ValueError(f"--weights: cannot load {cfg.weights} as {cfg.model}: {err}") from err


def run_shrink(cfg: ShrinkConfig, *, train_pairs: Sequence[Any] | None = None,
               eval_sets: Mapping[str, Sequence[Any]] | None = None, stop_after: str | None = None,
               teacher_label: str = "teacher") -> dict[str, Any]:
    """Run the whole pipeline for ``cfg`` (validated here first); returns the stage results.

    ``train_pairs`` / ``eval_sets`` override ``cfg.train_data`` / ``cfg.eval_data`` with pairs already in
    memory (used by ``effsr demo``). ``stop_after``: raise ``KeyboardInterrupt`` after that stage (tests).
    """
    import distill

    cfg.validate()
    dist_ctx = distill.ddp.init_from_env(device=None)
    device = dist_ctx.device if dist_ctx.distributed else torch.device(cfg.device)
    run_dir = Path(cfg.out)
    teacher = load_teacher(cfg).to(device).eval()
    check_feature_layers(teacher, cfg.feature_layers)
    if cfg.data_aware:  # an unreachable budget fails here, before anything is written
        from .compress import check_budget, runtime_target

        if cfg.runtime_budget:  # reachable at the largest pruning ratio, timed on this device
            runtime_target(cfg, teacher, teacher, device, steps=0)
        else:
            check_budget(teacher, cfg.method, cfg.target_params, cfg.target_flops, cfg.tucker_min_channels)
    if train_pairs is None:
        selection = open_train_pairs(cfg.train_data, cfg.patch_size, cfg.max_train_images)
    else:
        selection = fitting_pairs(train_pairs, cfg.patch_size, what="train_pairs")
    if eval_sets is None:
        eval_sets = open_eval_sets(cfg.eval_data, cfg.max_eval_images)
    state = RunState(cfg=cfg, run_dir=run_dir, device=device, teacher=teacher, train_pairs=list(selection.pairs),
                     eval_sets={k: list(v) for k, v in eval_sets.items()}, dist=dist_ctx,
                     teacher_label=teacher_label, patch_size=selection.patch_size,
                     calib_pairs=list(selection.considered_pairs))
    if state.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg.as_dict())
    state.log(f"teacher {cfg.model} ({count_params(teacher):,} params) from {cfg.weights}; "
              f"{len(state.train_pairs)} training image(s), eval sets {list(state.eval_sets)}; device {device}; "
              f"world size {dist_ctx.world_size}")
    state.log(f"training data: {selection.message()}")
    t0 = time.perf_counter()
    try:
        results = StageRunner(state, stop_after).run()
    finally:
        distill.ddp.cleanup(dist_ctx)
    state.log(f"finished in {time.perf_counter() - t0:.1f} s: {run_dir}")
    results["is_main"] = dist_ctx.is_main
    return results
