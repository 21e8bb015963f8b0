"""The shrink pipeline: teacher -> [repify] -> [prune + distill] -> fuse + verify -> [Tucker + distill] -> report.

Each stage is a function of a :class:`RunState`. :func:`run_shrink` runs them in order through
:class:`StageRunner`, which seeds ``torch``/``numpy``/``random`` with ``seed + stage index`` before a stage,
and after it writes ``RUN_DIR/stages/<k>_<name>.safetensors`` (the student with its recipe, see
:mod:`effsr.shrink.recipe`) and ``<k>_<name>.json`` (what the stage measured, the settings' fingerprint).
With ``resume=True`` a completed stage is skipped and its student reloaded from those files, so an
interrupted run that is resumed ends with the same weights as one that was never interrupted.

Under ``torchrun`` every process runs the pipeline (pruning and Tucker are deterministic, so all ranks
make the same cuts); distillation steps are data-parallel (:func:`distill.train_steps`), and only rank 0
evaluates and writes files.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .config import ShrinkConfig
from .recipe import add_op, load_student, new_recipe, save_student, tucker_ranks

__all__ = [
    "RunState", "StageRunner", "run_shrink", "STAGES", "VerificationError", "verify_same", "seed_everything",
    "distill_finetune", "STOP_ENV", "open_eval_sets", "open_train_pairs",
]

#: (index, name) of every stage, in order; disabled stages are skipped (no files).
STAGES = ((0, "teacher"), (1, "repify"), (2, "prune"), (3, "fuse"), (4, "tucker"), (5, "report"))
#: Test hook: ``EFFSR_SHRINK_STOP_AFTER=<stage name>`` raises KeyboardInterrupt after that stage is saved.
STOP_ENV = "EFFSR_SHRINK_STOP_AFTER"
#: Example input for tracing when pruning (ESA needs >= 16 px).
PRUNE_INPUT_SHAPE = (1, 3, 32, 32)


class VerificationError(RuntimeError):
    """The fused (or reloaded) student does not compute what its training form computes."""


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _log(msg: str, main: bool = True, logfile: Path | None = None) -> None:
    if not main:
        return
    from tqdm.auto import tqdm

    tqdm.write(f"[shrink] {msg}", file=sys.stderr)
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


# ------------------------------------------------------------------------------------------------ data
def open_train_pairs(spec: str, patch_size: int, limit: int | None = None) -> list[Any]:
    """Training pairs of ``spec`` (folder or ``"default"``) whose LR image fits a ``patch_size`` crop."""
    from effsr import data

    pairs = data.open_dataset(spec)
    n = len(pairs) if limit is None else min(limit, len(pairs))
    chosen = []
    for i in range(len(pairs)):
        p = pairs[i]
        if min(p.lr.shape[:2]) >= patch_size:
            chosen.append(p)
        if len(chosen) >= n:
            break
    if not chosen:
        raise ValueError(f"--train-data: no image of {spec} has an LR side >= --patch-size {patch_size}")
    return chosen


def open_eval_sets(specs: Sequence[str], limit: int | None = None) -> dict[str, list[Any]]:
    """``{set name: pairs}`` for each eval folder (name = folder name, made unique)."""
    from effsr import data

    sets: dict[str, list[Any]] = {}
    for spec in specs:
        base = "default" if spec == "default" else Path(spec).resolve().name
        name, i = base, 2
        while name in sets:
            name, i = f"{base}_{i}", i + 1
        pairs = data.open_dataset(spec)
        n = len(pairs) if limit is None else min(limit, len(pairs))
        sets[name] = [pairs[j] for j in range(n)]
        if not sets[name]:
            raise ValueError(f"--eval-data: no images in {spec}")
    return sets


# ------------------------------------------------------------------------------------------------ state
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

    @property
    def main(self) -> bool:
        return self.dist.is_main

    @property
    def logfile(self) -> Path:
        return self.run_dir / "log.txt"

    def log(self, msg: str) -> None:
        _log(msg, self.main, self.logfile)

    def verify_inputs(self) -> list[torch.Tensor]:
        """A few real LR images of the first eval set as float NCHW tensors in the model's input range."""
        pairs = next(iter(self.eval_sets.values()))[: self.cfg.verify_images]
        rng = float(getattr(self.teacher, "input_range", 255.0))
        return [torch.from_numpy(np.ascontiguousarray(p.lr.transpose(2, 0, 1))).float()[None] / 255.0 * rng
                for p in pairs]


def _barrier(state: RunState) -> None:
    if state.dist.distributed:
        import torch.distributed as dist

        dist.barrier()


def _has_rep_blocks(model: nn.Module) -> bool:
    from reparam import RepBlock

    return any(isinstance(m, RepBlock) for m in model.modules())


def _training_form(model: nn.Module) -> nn.Module:
    """Rep blocks train in "online" mode (one conv with the merged kernel: fast, same gradients)."""
    import reparam

    if _has_rep_blocks(model):
        reparam.set_mode(model, "online")
    return model


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ checks
@torch.no_grad()
def verify_same(reference: nn.Module, candidate: nn.Module, inputs: Sequence[torch.Tensor], what: str,
                tolerance: float, device: torch.device | str = "cpu") -> dict[str, float]:
    """Max relative error ``max|a - b| / max|a|`` of ``candidate`` vs ``reference`` over ``inputs`` (float32).

    Raises :class:`VerificationError` naming ``what`` when it exceeds ``tolerance``.
    """
    worst = 0.0
    worst_abs = 0.0
    modes = [(m, m.training) for m in (reference, candidate)]
    reference.eval()
    candidate.eval()
    try:
        for x in inputs:
            x = x.to(device=device, dtype=torch.float32)
            a = reference(x).double()
            b = candidate(x).double()
            diff = float((a - b).abs().max())
            rel = diff / max(float(a.abs().max()), 1e-12)
            worst, worst_abs = max(worst, rel), max(worst_abs, diff)
    finally:
        for m, flag in modes:
            m.train(flag)
    if not worst <= tolerance:  # also catches NaN
        raise VerificationError(f"verification failed at {what}: max relative error {worst:.3g} > tolerance "
                                f"{tolerance:g} (max abs error {worst_abs:.3g}) on {len(inputs)} real image(s)")
    return {"max_rel_error": worst, "max_abs_error": worst_abs, "images": len(inputs), "tolerance": tolerance}


# ------------------------------------------------------------------------------------------------ training
def _pairs_for(teacher: nn.Module, student: nn.Module) -> list[str]:
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
    _training_form(student)
    student.to(state.device).train()
    teacher = state.teacher.to(state.device)
    rng = float(getattr(teacher, "input_range", 1.0))
    names = _pairs_for(teacher, student) if cfg.feature_weight > 0 else []
    pairs = [(n, n, cfg.feature_weight / rng) for n in names]
    ds = PatchDataset(state.train_pairs, patch_size=cfg.patch_size, augment=True,
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


def _evaluate_all(state: RunState, model: nn.Module, label: str) -> dict[str, Any]:
    from effsr import inference

    out = {}
    for name, pairs in state.eval_sets.items():
        r = inference.evaluate(model, pairs, progress=state.cfg.progress, device=state.device)
        out[name] = {k: r[k] for k in ("psnr_rgb", "psnr_y", "ssim_y", "images")}
        out[name]["per_image"] = r["per_image"]
        state.log(f"{label} on {name}: PSNR-Y {r['psnr_y']:.3f} dB, PSNR-RGB {r['psnr_rgb']:.3f} dB, "
                  f"SSIM-Y {r['ssim_y']:.4f}")
    return out


# ------------------------------------------------------------------------------------------------ stages
def stage_teacher(state: RunState) -> dict[str, Any]:
    """Evaluate the teacher; the student starts as a copy of it."""
    teacher = state.teacher
    state.student = copy.deepcopy(teacher)
    config = {k: v for k, v in teacher.config.items()}
    state.recipe = new_recipe(teacher.arch, config)
    info: dict[str, Any] = {"params": _params(teacher), "arch": teacher.arch, "config": config}
    if state.main:
        info["eval"] = _evaluate_all(state, teacher, state.teacher_label)
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
    state.log(f"repify: {block} blocks, training-form params {_params(student):,}")
    info = {"block": block, "params_training_form": _params(student), "verify": check, "modules": n_blocks}
    info["finetune"] = distill_finetune(state, student, cfg.steps, cfg.seed * 1000 + 1, "repify")
    state.student = student
    return info


def stage_prune(state: RunState) -> dict[str, Any]:
    """Iterative L2 filter pruning, distillation fine-tuning after each step."""
    import prune

    cfg = state.cfg
    k = 2
    before = _params(state.student)
    _training_form(state.student)
    student = state.student.to(state.device)

    def finetune(model: nn.Module, step: int) -> dict[str, Any]:
        return distill_finetune(state, model, cfg.steps, cfg.seed * 1000 + k * 100 + step,
                                f"prune step {step}/{cfg.prune_steps}")

    example = torch.zeros(PRUNE_INPUT_SHAPE, device=state.device)
    pruned = prune.l2_filter_prune(student, example, float(cfg.prune), steps=cfg.prune_steps,
                                   finetune=finetune if cfg.steps > 0 else None, progress=cfg.progress)
    history = getattr(pruned, prune.HISTORY_ATTR)
    report = getattr(pruned, prune.REPORT_ATTR)
    state.recipe = add_op(state.recipe, {"op": "prune", "history": history, "input_shape": list(PRUNE_INPUT_SHAPE),
                                         "ratio": float(cfg.prune), "steps": cfg.prune_steps})
    state.student = pruned.eval()
    state.log(f"prune: ratio {cfg.prune} in {cfg.prune_steps} step(s): params {before:,} -> {_params(pruned):,}")
    steps = [{"step": s.step, "target_ratio": s.target_ratio, "params": s.params, "flops": s.flops,
              "removed_filters": s.removed_filters, "prunable_filters": s.prunable_filters, "finetune": s.finetune}
             for s in report.history]
    return {"ratio": float(cfg.prune), "params_before": before, "params_after": _params(pruned),
            "history": steps, "locked": dict(report.locked)}


def stage_fuse(state: RunState) -> dict[str, Any]:
    """``reparam.fuse_all`` and the numerical check: fused vs training form (branches and online modes)."""
    import reparam

    cfg = state.cfg
    train_form = state.student.to(state.device)
    inputs = state.verify_inputs()
    had_blocks = _has_rep_blocks(train_form)
    fused = reparam.fuse_all(train_form.eval())
    info: dict[str, Any] = {"had_rep_blocks": had_blocks, "params_training_form": _params(train_form),
                            "params": _params(fused)}
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
    before = _params(state.student)
    dec, report = tucker_model(state.student.cpu(), rank=float(cfg.tucker), min_channels=cfg.tucker_min_channels,
                               progress=cfg.progress)
    ranks = tucker_ranks(dec)
    state.recipe = add_op(state.recipe, {"op": "tucker", "ranks": ranks, "fraction": float(cfg.tucker)})
    layers = [{"name": r.name, "rank_out": r.rank_out, "rank_in": r.rank_in, "params_before": r.params_before,
               "params_after": r.params_after, "rel_error": r.rel_error}
              for r in report if r.status == "decomposed"]
    # the decomposed layers must recompose exactly into the convs they approximate (rel_error is HOOI's error)
    recomposed = recompose_model(dec)
    info: dict[str, Any] = {"fraction": float(cfg.tucker), "params_before": before, "params_after": _params(dec),
                            "layers": layers, "decomposed": len(ranks),
                            "recompose_check": verify_same(recomposed, dec, state.verify_inputs()[:1],
                                                           "tucker (decomposed vs recomposed)", cfg.verify_tolerance)}
    state.log(f"tucker: {len(ranks)} conv(s) decomposed, params {before:,} -> {_params(dec):,}")
    dec = dec.to(state.device)
    info["finetune"] = distill_finetune(state, dec, cfg.steps, cfg.seed * 1000 + 4 * 100, "tucker")
    state.student = dec.eval()
    return info


def stage_report(state: RunState) -> dict[str, Any]:
    """Save the student, reload it and check it, then profile + evaluate teacher, student, peers; write files."""
    from . import report as rep

    if not state.main:
        return {}
    path = state.run_dir / "student.safetensors"
    student = state.student.cpu().eval()
    save_student(student, state.recipe, path)
    reloaded = load_student(path)
    check = verify_same(student, reloaded, state.verify_inputs()[:1], "reload (saved student vs in-memory)", 0.0)
    state.log(f"student saved to {path} and reloaded identically ({_params(reloaded):,} params)")
    stages = {name: state.results.get(name) for _, name in STAGES if name != "report"}
    teacher_eval = (stages.get("teacher") or {}).get("eval")
    data = rep.measure_all(state, reloaded, teacher_eval)
    data["student_file"] = str(path)
    data["reload_check"] = check
    data["stages"] = stages
    data["config"] = state.cfg.as_dict()
    rep.write_outputs(state.run_dir, data)
    state.log(f"wrote {state.run_dir / 'report.json'}, report.md, frontier.png")
    return {"student_file": str(path), "reload_check": check}


STAGE_FUNCTIONS: dict[str, Callable[[RunState], dict[str, Any]]] = {
    "teacher": stage_teacher, "repify": stage_repify, "prune": stage_prune, "fuse": stage_fuse,
    "tucker": stage_tucker, "report": stage_report,
}


def _enabled(cfg: ShrinkConfig, name: str) -> bool:
    if name == "repify":
        return cfg.repify is not None
    if name == "prune":
        return float(cfg.prune) > 0
    if name == "tucker":
        return cfg.tucker is not None
    return True


# ------------------------------------------------------------------------------------------------ runner
class StageRunner:
    """Runs the stages in order with per-stage seeds, checkpoints and resume."""

    def __init__(self, state: RunState, stop_after: str | None = None) -> None:
        self.state = state
        self.stop_after = stop_after if stop_after is not None else os.environ.get(STOP_ENV) or None
        self.fingerprint = state.cfg.fingerprint()

    def paths(self, k: int, name: str) -> tuple[Path, Path]:
        base = self.state.run_dir / "stages" / f"{k}_{name}"
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def _resume(self, k: int, name: str) -> bool:
        st = self.state
        weights, meta = self.paths(k, name)
        if not (st.cfg.resume and meta.is_file()):
            return False
        info = json.loads(meta.read_text(encoding="utf-8"))
        if info.get("fingerprint") != self.fingerprint:
            raise ValueError(f"--resume: {meta} was written with different settings (fingerprint "
                             f"{info.get('fingerprint')} vs {self.fingerprint}); use a new --out folder")
        if weights.is_file():
            st.student = load_student(weights, device=st.device)
            st.recipe = info["recipe"]
        st.results[name] = info["result"]
        st.log(f"stage {k} {name}: done before, reloaded from {weights.name if weights.is_file() else meta.name}")
        return True

    def run_stage(self, k: int, name: str) -> None:
        st = self.state
        if not _enabled(st.cfg, name):
            st.log(f"stage {k} {name}: skipped (not requested)")
            return
        if self._resume(k, name):
            return
        st.log(f"stage {k} {name}: start")
        seed_everything(st.cfg.seed * 1000 + k)
        t0 = time.perf_counter()
        result = STAGE_FUNCTIONS[name](st)
        seconds = time.perf_counter() - t0
        result["seconds"] = round(seconds, 3)
        result["params"] = _params(st.student) if st.student is not None else None
        st.results[name] = result
        weights, meta = self.paths(k, name)
        if st.main:
            if name != "report":
                save_student(st.student.cpu(), st.recipe, weights)
                st.student.to(st.device)
            _write_json(meta, {"stage": name, "index": k, "fingerprint": self.fingerprint, "recipe": st.recipe,
                               "result": result, "seconds": seconds})
        if name != "report":  # rank 0 alone measures and writes the report; nobody waits for it
            _barrier(st)
        st.log(f"stage {k} {name}: done in {seconds:.1f} s")
        if self.stop_after == name:
            raise KeyboardInterrupt(f"stopped after stage {name!r} ({STOP_ENV})")

    def run(self) -> dict[str, Any]:
        for k, name in STAGES:
            self.run_stage(k, name)
        return self.state.results


def _load_teacher(cfg: ShrinkConfig) -> nn.Module:
    from effsr import models

    from .recipe import has_recipe

    if has_recipe(cfg.weights):
        teacher = load_student(cfg.weights)
        if teacher.arch != cfg.model:
            raise ValueError(f"--weights: {cfg.weights} is a shrunk {teacher.arch!r}, not {cfg.model!r}")
        if any(op["op"] != "fuse" for op in teacher.recipe["ops"]):
            raise ValueError(f"--weights: {cfg.weights} is a shrunk student; its recipe cannot be shrunk again "
                             "(pass the original teacher checkpoint)")
        return teacher
    try:
        return models.load(cfg.model, cfg.weights, **cfg.model_config)
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as err:
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
    teacher = _load_teacher(cfg).to(device).eval()
    if train_pairs is None:
        train_pairs = open_train_pairs(cfg.train_data, cfg.patch_size, cfg.max_train_images)
    else:
        train_pairs = [p for p in train_pairs if min(p.lr.shape[:2]) >= cfg.patch_size]
        if not train_pairs:
            raise ValueError(f"train_pairs: no image has an LR side >= patch_size {cfg.patch_size}")
    if eval_sets is None:
        eval_sets = open_eval_sets(cfg.eval_data, cfg.max_eval_images)
    state = RunState(cfg=cfg, run_dir=run_dir, device=device, teacher=teacher, train_pairs=list(train_pairs),
                     eval_sets={k: list(v) for k, v in eval_sets.items()}, dist=dist_ctx,
                     teacher_label=teacher_label)
    if state.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "config.json", cfg.as_dict())
    state.log(f"teacher {cfg.model} ({_params(teacher):,} params) from {cfg.weights}; "
              f"{len(state.train_pairs)} training image(s), eval sets {list(state.eval_sets)}; device {device}; "
              f"world size {dist_ctx.world_size}")
    t0 = time.perf_counter()
    try:
        results = StageRunner(state, stop_after).run()
    finally:
        distill.ddp.cleanup(dist_ctx)
    state.log(f"finished in {time.perf_counter() - t0:.1f} s: {run_dir}")
    results["is_main"] = dist_ctx.is_main
    return results
