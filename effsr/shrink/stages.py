"""The stages of a shrink run, each declared once as a :class:`Stage` in :data:`STAGES`.

A stage is a function of the :class:`~effsr.shrink.state.RunState` that updates ``state.student`` /
``state.recipe`` and returns what it measured (JSON-able). Its declaration names when it runs
(``enabled``) and which :class:`~effsr.shrink.config.ShrinkConfig` fields it reads beyond the common ones
(``settings``): the fingerprint a resumed stage must match covers the common settings and those of the
stage and every stage before it.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from .compress import stage_compress, stage_distill
from .config import ShrinkConfig
from .finetune import distill_finetune
from .recipe import add_op, load_student, recipe_for, save_student, tucker_ranks
from .state import RunState, count_params, has_rep_blocks, training_form
from .verify import verify_same

__all__ = ["Stage", "STAGES", "STAGE_NAMES", "get_stage", "PRUNE_INPUT_SHAPE", "evaluate_all"]

#: Example input for tracing when pruning (ESA needs >= 16 px).
PRUNE_INPUT_SHAPE = (1, 3, 32, 32)


def _always(cfg: ShrinkConfig) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: its index and name (file names ``<index>_<name>.*``), what it does, when it runs."""

    index: int
    name: str
    run: Callable[[RunState], dict[str, Any]]
    enabled: Callable[[ShrinkConfig], bool] = _always
    #: ShrinkConfig fields only this stage reads (the common ones are in every stage's fingerprint)
    settings: tuple[str, ...] = ()
    #: write ``<index>_<name>.safetensors`` (the student after the stage) next to its JSON
    saves_student: bool = True


def evaluate_all(state: RunState, model: nn.Module, label: str) -> dict[str, Any]:
    """PSNR/SSIM of ``model`` on every eval set (logged), with the per-image values."""
    from effsr import inference

    out = {}
    for name, pairs in state.eval_sets.items():
        r = inference.evaluate(model, pairs, progress=state.cfg.progress, device=state.device,
                               y_round=state.cfg.y_round)
        out[name] = {k: r[k] for k in ("psnr_rgb", "psnr_y", "ssim_y", "images")}
        out[name]["per_image"] = r["per_image"]
        state.log(f"{label} on {name}: PSNR-Y {r['psnr_y']:.3f} dB, PSNR-RGB {r['psnr_rgb']:.3f} dB, "
                  f"SSIM-Y {r['ssim_y']:.4f}")
    return out


def stage_teacher(state: RunState) -> dict[str, Any]:
    """Evaluate the teacher; the student starts as a copy of it."""
    teacher = state.teacher
    state.student = copy.deepcopy(teacher)
    config = {k: v for k, v in teacher.config.items()}
    state.recipe = recipe_for(teacher)
    info: dict[str, Any] = {"params": count_params(teacher), "arch": teacher.arch, "config": config}
    if state.main:
        info["eval"] = evaluate_all(state, teacher, state.teacher_label)
    return info


def stage_repify(state: RunState) -> dict[str, Any]:
    """Turn the student's 3x3 conv slots into rep blocks equal to them, then distil in online mode."""
    from effsr.models.conv import apply_conv

    cfg = state.cfg
    block = str(cfg.repify).lower()
    before = copy.deepcopy(state.student).eval()
    student = apply_conv(state.student, {"block": block}, pretrained=True)
    state.recipe = add_op(state.recipe, {"op": "repify", "block": block, "options": {}})
    check = verify_same(before, student, state.verify_inputs()[:1], "repify (blocks vs the convs they replace)",
                        cfg.verify_tolerance, state.device)
    del before
    n_blocks = sum(1 for m in student.modules() if type(m).__module__.startswith("reparam."))
    state.log(f"repify: {block} blocks, training-form params {count_params(student):,}")
    info = {"block": block, "params_training_form": count_params(student), "verify": check, "modules": n_blocks}
    info["finetune"] = distill_finetune(state, student, cfg.steps, state.finetune_seed(), "repify")
    state.student = student
    return info


def stage_prune(state: RunState) -> dict[str, Any]:
    """Iterative L2 filter pruning, distillation fine-tuning after each step."""
    import prune

    cfg = state.cfg
    before = count_params(state.student)
    training_form(state.student)
    student = state.student.to(state.device)

    def finetune(model: nn.Module, step: int) -> dict[str, Any]:
        return distill_finetune(state, model, cfg.steps, state.finetune_seed(step),
                                f"prune step {step}/{cfg.prune_steps}")

    example = torch.zeros(PRUNE_INPUT_SHAPE, device=state.device)
    pruned = prune.l2_filter_prune(student, example, float(cfg.prune), steps=cfg.prune_steps,
                                   finetune=finetune if cfg.steps > 0 else None, progress=cfg.progress)
    history = getattr(pruned, prune.HISTORY_ATTR)
    report = getattr(pruned, prune.REPORT_ATTR)
    state.recipe = add_op(state.recipe, {"op": "prune", "history": history, "input_shape": list(PRUNE_INPUT_SHAPE),
                                         "ratio": float(cfg.prune), "steps": cfg.prune_steps})
    state.student = pruned.eval()
    state.log(f"prune: ratio {cfg.prune} in {cfg.prune_steps} step(s): params {before:,} -> {count_params(pruned):,}")
    steps = [{"step": s.step, "target_ratio": s.target_ratio, "params": s.params, "flops": s.flops,
              "removed_filters": s.removed_filters, "prunable_filters": s.prunable_filters, "finetune": s.finetune}
             for s in report.history]
    return {"ratio": float(cfg.prune), "params_before": before, "params_after": count_params(pruned),
            "history": steps, "locked": dict(report.locked)}


def stage_fuse(state: RunState) -> dict[str, Any]:
    """``reparam.fuse_all`` and the numerical check: fused vs training form (branches and online modes)."""
    import reparam

    cfg = state.cfg
    train_form = state.student.to(state.device)
    inputs = state.verify_inputs()
    had_blocks = has_rep_blocks(train_form)
    fused = reparam.fuse_all(train_form.eval())
    info: dict[str, Any] = {"had_rep_blocks": had_blocks, "params_training_form": count_params(train_form),
                            "params": count_params(fused)}
    reparam.set_mode(train_form, "branches")
    info["verify_branches"] = verify_same(train_form, fused, inputs, "fuse (fused vs branches form)",
                                          cfg.verify_tolerance, state.device)
    if had_blocks:
        reparam.set_mode(train_form, "online")
        info["verify_online"] = verify_same(train_form, fused, inputs, "fuse (fused vs online form)",
                                            cfg.verify_tolerance, state.device)
    state.log(f"fuse: {'rep blocks fused' if had_blocks else 'no rep blocks'}; fused vs training form max "
              f"relative error {info['verify_branches']['max_rel_error']:.3g} on {len(inputs)} real image(s)")
    state.recipe = add_op(state.recipe, {"op": "fuse"})
    state.student = fused
    return info


def stage_tucker(state: RunState) -> dict[str, Any]:
    """Tucker-2 decomposition of the 3x3 convs (keep ``--tucker`` of each one's parameters), then distil."""
    from decompose import recompose_model, tucker_model

    cfg = state.cfg
    before = count_params(state.student)
    dec, report = tucker_model(state.student.cpu(), rank=float(cfg.tucker), min_channels=cfg.tucker_min_channels,
                               progress=cfg.progress)
    ranks = tucker_ranks(dec)
    state.recipe = add_op(state.recipe, {"op": "tucker", "ranks": ranks, "fraction": float(cfg.tucker)})
    layers = [{"name": r.name, "rank_out": r.rank_out, "rank_in": r.rank_in, "params_before": r.params_before,
               "params_after": r.params_after, "rel_error": r.rel_error}
              for r in report if r.status == "decomposed"]
    # the decomposed layers must recompose exactly into the convs they approximate (rel_error is HOOI's error)
    recomposed = recompose_model(dec)
    info: dict[str, Any] = {"fraction": float(cfg.tucker), "params_before": before, "params_after": count_params(dec),
                            "layers": layers, "decomposed": len(ranks),
                            "recompose_check": verify_same(recomposed, dec, state.verify_inputs()[:1],
                                                           "tucker (decomposed vs recomposed)", cfg.verify_tolerance)}
    state.log(f"tucker: {len(ranks)} conv(s) decomposed, params {before:,} -> {count_params(dec):,}")
    dec = dec.to(state.device)
    info["finetune"] = distill_finetune(state, dec, cfg.steps, state.finetune_seed(), "tucker")
    state.student = dec.eval()
    return info


#: Stages whose ``eval`` result is the evaluation of the very student they leave behind.
_STUDENT_EVALUATING_STAGES = ("compress", "distill")


def _same_weights(a: Any, b: Any) -> bool:
    """Whether safetensors files ``a`` and ``b`` hold the same tensors (names, shapes, dtypes, values)."""
    from safetensors.torch import load_file

    try:
        ta, tb = load_file(str(a)), load_file(str(b))
    except (OSError, ValueError, RuntimeError):
        return False
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
                                          and torch.equal(ta[k], tb[k]) for k in ta)


def _final_student_eval(state: RunState, student_file: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The evaluation a stage made of exactly the student saved at ``student_file``, and that stage's name.

    Only the last stage that ran before the report can have evaluated the final student, and only stages of
    :data:`_STUDENT_EVALUATING_STAGES` evaluate the student they leave; its saved weights must also equal
    the final student's. Otherwise ``(None, None)``: the report evaluates the student itself.
    """
    from .runner import StageRunner

    ran = [s for s in STAGES if s.name != "report" and s.enabled(state.cfg)]
    if not ran or ran[-1].name not in _STUDENT_EVALUATING_STAGES:
        return None, None
    last = ran[-1]
    evals = (state.results.get(last.name) or {}).get("eval")
    if not evals:
        return None, None
    weights, _ = StageRunner(state, stop_after="").paths(last)
    if not _same_weights(weights, student_file):
        return None, None
    return evals, last.name


def stage_report(state: RunState) -> dict[str, Any]:
    """Save the student, reload it and check it, then profile + evaluate teacher, student, peers; write files.

    The teacher stage's evaluation of the teacher and the last stage's evaluation of the final student are
    reused (see :func:`effsr.shrink.report.measure_all`)."""
    from . import report as rep

    if not state.main:
        return {}
    path = state.run_dir / "student.safetensors"
    student = state.student.cpu().eval()
    save_student(student, state.recipe, path)
    reloaded = load_student(path)
    check = verify_same(student, reloaded, state.verify_inputs()[:1], "reload (saved student vs in-memory)", 0.0)
    state.log(f"student saved to {path} and reloaded identically ({count_params(reloaded):,} params)")
    stages = {s.name: state.results.get(s.name) for s in STAGES if s.name != "report"}
    teacher_eval = (stages.get("teacher") or {}).get("eval")
    student_eval, source = _final_student_eval(state, path)
    data = rep.measure_all(state, reloaded, teacher_eval, student_eval=student_eval, student_eval_stage=source)
    data["student_file"] = str(path)
    data["reload_check"] = check
    data["stages"] = stages
    data["config"] = state.cfg.as_dict()
    rep.write_outputs(state.run_dir, data)
    state.log(f"wrote {state.run_dir / 'report.json'}, report.md, frontier.png")
    return {"student_file": str(path), "reload_check": check}


#: Every stage, in order; a disabled stage is skipped (no files).
STAGES: tuple[Stage, ...] = (
    Stage(0, "teacher", stage_teacher),
    Stage(1, "repify", stage_repify, enabled=lambda cfg: cfg.repify is not None, settings=("repify",)),
    Stage(2, "prune", stage_prune, enabled=lambda cfg: float(cfg.prune) > 0, settings=("prune", "prune_steps")),
    Stage(3, "fuse", stage_fuse),
    Stage(4, "tucker", stage_tucker, enabled=lambda cfg: cfg.tucker is not None,
          settings=("tucker", "tucker_min_channels")),
    Stage(5, "compress", stage_compress, enabled=lambda cfg: cfg.data_aware,
          settings=("target_params", "target_flops", "method", "importance", "calib_images", "calib_patch",
                    "calib_rows", "tucker_refine", "objective", "objective_tolerance", "tucker_min_channels",
                    "allocation", "refine_steps", "refine_lr", "target_speedup", "target_runtime",
                    "runtime_size")),
    Stage(6, "distill", stage_distill, enabled=lambda cfg: cfg.data_aware and cfg.steps > 0),
    Stage(7, "report", stage_report, saves_student=False),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    """The :class:`Stage` called ``name``."""
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"stage: unknown stage {name!r}; choose from {', '.join(STAGE_NAMES)}")
