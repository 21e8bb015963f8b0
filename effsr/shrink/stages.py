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
import time
from typing import Any, Callable

import torch
from torch import nn

from effsr.inference import input_range as model_input_range

from .compress import (PRUNE_EXAMPLE_SHAPE, calibration_patch_size, calibration_patches, check_budget, choose,
                       fitting_images, held_out, make_calibration, oneshot, patch_psnr_y, refine_blocks_of,
                       runtime_target)
from .config import REFINE_MIN_GAIN_DB, ShrinkConfig
from .finetune import distill_finetune
from .recipe import add_op, load_student, recipe_for, save_student, tucker_ranks
from .state import RunState, count_params, has_rep_blocks, training_form
from .verify import verify_same

__all__ = ["Stage", "STAGES", "STAGE_NAMES", "get_stage", "PRUNE_INPUT_SHAPE", "evaluate_all"]

#: Example input for tracing when pruning (ESA needs >= 16 px): the data-aware path's, one shape for both.
PRUNE_INPUT_SHAPE = PRUNE_EXAMPLE_SHAPE


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


# ------------------------------------------------------------------ the data-aware path (budgets)
def _run_candidates(state: RunState, methods: list[str], calib: Any, held: tuple[torch.Tensor, torch.Tensor],
                    target_params: int | None, target_flops: float | None) -> tuple[str, nn.Module, dict[str, Any]]:
    from effsr import metrics

    cfg = state.cfg
    base = state.student.to(state.device).eval()
    teacher = state.teacher.to(state.device).eval()
    built: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    for m in methods:
        model, info = oneshot(m, base, teacher, calib, target_params, target_flops,
                              importance=cfg.importance, min_channels=cfg.tucker_min_channels,
                              progress=cfg.progress, allocation=cfg.allocation, refine=cfg.tucker_refine)
        info["held_out_psnr_y"] = patch_psnr_y(model, *held, y_round=cfg.y_round)
        if cfg.refine_steps > 0:
            model, info = _refined(state, m, model, info, calib, held)
        prof = metrics.profile(model)
        info.update({"params": prof.params, "flops": prof.flops, "activations": prof.activations,
                     "convs": prof.convs})
        if len(methods) > 1 and cfg.objective == "runtime":
            first = next(iter(state.eval_sets.values()))
            info["runtime_ms"] = metrics.runtime(model, [p.lr for p in first[:2]], device=state.device,
                                                 trials=cfg.runtime_trials, warmup=1)["ms_per_image"]
        state.log(f"one-shot {m}: {prof.params:,} params, {prof.flops / 1e9:.2f} G FLOPs, "
                  f"{prof.activations / 1e6:.1f} M acts, {prof.convs} convs; held-out patches PSNR-Y "
                  f"{info['held_out_psnr_y']:.3f} dB ({info['seconds']:.1f} s)")
        if info.get("locked"):
            state.log(f"one-shot {m}: {len(info['locked'])} group(s) locked, kept whole: " + "; ".join(
                f"{name} ({why})" for name, why in info["locked"].items()))
        built[m] = (model, info)
    pick = methods[0] if len(methods) == 1 else choose({m: i for m, (_, i) in built.items()}, cfg.objective,
                                                      cfg.objective_tolerance)
    cands = {m: {k: v for k, v in i.items() if k not in ("history", "ranks", "layers")} for m, (_, i) in built.items()}
    return pick, built[pick][0], {"candidates": cands, **built[pick][1]}


def _refined(state: RunState, method: str, model: nn.Module, info: dict[str, Any], calib: Any,
             held: tuple[torch.Tensor, torch.Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """The one-shot student with its blocks refined (``--refine-steps``) when that raises the held-out PSNR-Y."""
    cfg = state.cfg
    t0 = time.perf_counter()
    refined, rep = refine_blocks_of(model, state.teacher, calib, cfg.refine_steps, cfg.refine_lr, cfg.seed,
                                    progress=cfg.progress)
    before = info["held_out_psnr_y"]
    after = patch_psnr_y(refined, *held, y_round=cfg.y_round) if rep.get("blocks") else before
    keep = after >= before + REFINE_MIN_GAIN_DB  # 16 held-out patches: a smaller gain is within their noise
    fitted = [b for b in rep.get("blocks", []) if not b.get("skipped")]
    skipped = {b["name"]: b["skipped"] for b in rep.get("blocks", []) if b.get("skipped")}
    info = {**info, "refine": {"steps": cfg.refine_steps, "lr": cfg.refine_lr, "kept": keep,
                               "held_out_before": before, "held_out_after": after,
                               "blocks": [b["name"] for b in fitted], "skipped": skipped,
                               "seconds": round(time.perf_counter() - t0, 3), "per_block": rep.get("blocks", []),
                               "refit": rep.get("refit")}}
    state.log(f"one-shot {method}: block refinement of {len(fitted)} block(s), {cfg.refine_steps} steps each: "
              f"held-out PSNR-Y {before:.3f} -> {after:.3f} dB ({'kept' if keep else 'not kept'}, "
              f"{info['refine']['seconds']:.1f} s)" + (f"; skipped {skipped}" if skipped else ""))
    if keep:
        info["held_out_psnr_y"] = after
        info["seconds"] = round(info["seconds"] + info["refine"]["seconds"], 3)
        return refined, info
    return model, info


def stage_compress(state: RunState) -> dict[str, Any]:
    """Data-aware compression to ``--target-params`` / ``--target-flops`` (no gradient step)."""
    cfg = state.cfg
    t0 = time.perf_counter()
    target_params, target_flops, timed = cfg.target_params, cfg.target_flops, None
    if cfg.runtime_budget:  # the parameter count whose pruned network meets it, timed on this device
        timed = runtime_target(cfg, state.teacher, state.student.to(state.device), state.device, log=state.log)
        target_params = timed["target_params"]
        methods = ["prune"]
        state.log(f"runtime budget: pruning to {target_params:,} params (predicted {timed['predicted_speedup']:.2f}x, "
                  f"{timed['predicted_ms']:.1f} ms at {timed['size'][0]}x{timed['size'][1]} on {timed['device']})")
    else:
        methods = check_budget(state.student, cfg.method, target_params, target_flops, cfg.tucker_min_channels)
    if cfg.method == "auto" and len(methods) < 2:
        state.log(f"auto: only {methods[0]} can reach the budget")
    pairs = state.calib_pairs  # every training image, also those under the training patch
    patch = calibration_patch_size(pairs, cfg.calib_patch)
    n = int(cfg.calib_images)
    lr, hr = calibration_patches(pairs, n + (held_out(n) if len(methods) > 1 else 0), patch, cfg.seed)
    rng = model_input_range(state.teacher)
    calib = make_calibration(lr[:n], rng, cfg.seed, rows=cfg.calib_rows)
    held = (lr[n:], hr[n:]) if len(methods) > 1 else (lr[:n], hr[:n])
    t_calib = time.perf_counter() - t0
    fit = len(fitting_images(pairs, patch))
    state.log(f"calibration: {n} LR patches of {patch} px from {fit} training image(s)"
              + (f" ({held[0].shape[0]} more held out)" if len(methods) > 1 else ""))
    pick, model, info = _run_candidates(state, methods, calib, held, target_params, target_flops)
    if pick == "prune":
        state.recipe = add_op(state.recipe, {"op": "prune", "history": info["history"],
                                             "input_shape": list(PRUNE_INPUT_SHAPE), "budget": info["budget"],
                                             "importance": cfg.importance, "reconstructed": True})
    else:
        state.recipe = add_op(state.recipe, {"op": "tucker", "ranks": info["ranks"], "data_aware": True})
    if len(methods) > 1:
        state.log(f"auto ({cfg.objective}): chose {pick}")
    state.student = model
    info = {k: v for k, v in info.items() if k != "history"}
    info.update({"chosen": pick, "calibration_seconds": round(t_calib, 3),
                 "oneshot_seconds": round(time.perf_counter() - t0, 3), "calib_patches": n, "calib_patch": patch,
                 "calib_images": fit, "calib_rows": cfg.calib_rows, "tucker_refine": cfg.tucker_refine})
    if timed is not None:
        info["runtime_budget"] = _timed_student(state, model, timed)
    if state.main:
        info["eval"] = evaluate_all(state, model, f"one-shot {pick}")
    return info


def _timed_student(state: RunState, model: nn.Module, timed: dict[str, Any]) -> dict[str, Any]:
    """The runtime budget's search and the finished student timed beside its teacher (same input and device)."""
    from .speed import time_pair, timing_input

    x = timing_input(timed["size"], model_input_range(state.teacher), state.device)
    t_ms, s_ms, speedup = time_pair(state.teacher.to(state.device), model.to(state.device), x,
                                    trials=timed["trials"])
    cfg = state.cfg
    met = speedup >= cfg.target_speedup if cfg.target_speedup is not None else s_ms <= cfg.target_runtime
    want = f"{cfg.target_speedup:g}x" if cfg.target_speedup is not None else f"{cfg.target_runtime:g} ms"
    state.log(f"runtime budget: the student runs {s_ms:.1f} ms vs the teacher's {t_ms:.1f} ms ({speedup:.2f}x; "
              f"budget {want}: {'met' if met else 'missed on this measurement'})")
    return {**timed, "student_ms": round(s_ms, 3), "teacher_ms_final": round(t_ms, 3), "speedup": round(speedup, 4),
            "met": met}


def stage_distill(state: RunState) -> dict[str, Any]:
    """Distillation of the compressed student (``--steps``), then its PSNR."""
    t0 = time.perf_counter()
    ft = distill_finetune(state, state.student, state.cfg.steps, state.finetune_seed(), "distill")
    state.student = state.student.eval()
    info: dict[str, Any] = {"finetune": ft, "distill_seconds": round(time.perf_counter() - t0, 3)}
    if state.main:
        info["eval"] = evaluate_all(state, state.student, "after distillation")
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
    ran = [s for s in STAGES if s.name != "report" and s.enabled(state.cfg)]
    if not ran or ran[-1].name not in _STUDENT_EVALUATING_STAGES:
        return None, None
    last = ran[-1]
    evals = (state.results.get(last.name) or {}).get("eval")
    if not evals:
        return None, None
    weights, _ = state.stage_paths(last)
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
