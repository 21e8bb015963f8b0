"""Data-aware compression to a budget: calibration patches, one-shot pruning / Tucker, method choice.

The generic work is done by the toolkits; this module only wires them to SR data and the challenge's counts:

* calibration: ``n`` LR patches cut at seeded random positions from the training pairs (whose LR images
  ``effsr.data`` makes with the MATLAB-exact bicubic), wrapped in a :class:`prune.calibration.Calibration`;
  a further ``held_out(n)`` LR/HR patch pairs are kept aside to compare methods (``--method auto``);
* ``prune``: filters removed to meet the budget (importance ``l2`` / ``activation`` / ``recon``), then every
  affected conv re-solved toward the teacher in closed form (:func:`prune.reconstruct.reconstruct`);
* ``tucker``: :func:`decompose.data_aware_tucker_model` with ranks allocated globally under the budget;
* block refinement (``refine_steps``): each one-shot student's repeated blocks fitted to the teacher's block
  outputs with a few Adam steps per block on the calibration patches (:func:`distill.local.refine_blocks`),
  kept only when the held-out PSNR-Y rises;
* ``auto``: both one-shot students, then the better held-out PSNR-Y (``objective="psnr"``) or, with
  ``objective="runtime"``, the lowest measured latency among the students within ``tolerance`` dB of the
  best held-out PSNR-Y.

Budgets: ``target_params`` (parameters, ``<=``) or ``target_flops`` (MACs on a 3x256x256 input in the
challenge convention of :func:`effsr.metrics.profile`, ``<=``).
"""
from __future__ import annotations

from effsr.inference import input_range as model_input_range

import copy
import math
import time
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from prune.budget import ALLOCATIONS  # how pruning spreads a budget: see prune.prune_to_budget(allocation=)

from .config import CALIB_PATCH, CALIB_ROWS, IMPORTANCES, METHODS, OBJECTIVES, TUCKER_REFINE

__all__ = ["METHODS", "IMPORTANCES", "OBJECTIVES", "ALLOCATIONS", "calibration_patch_size", "held_out",
           "fitting_images", "calibration_patches", "make_calibration", "challenge_conv_flops", "budget_of",
           "check_budget", "oneshot", "choose", "patch_psnr_y", "PRUNE_EXAMPLE_SHAPE", "refine_blocks_of",
           "block_names", "block_output_channels", "runtime_target", "MAX_PRUNE_RATIO"]

#: Tracing input of the pruning graph (ESA needs >= 16 px); recorded in the recipe.
PRUNE_EXAMPLE_SHAPE = (1, 3, 32, 32)
#: Largest fraction of each group's filters pruning may remove while meeting a budget.
MAX_PRUNE_RATIO = 0.9


def held_out(n: int) -> int:
    """Held-out patches beside ``n`` calibration patches (a quarter, at least 8)."""
    return max(8, n // 4)


def fitting_images(pairs: Sequence[Any], patch: int) -> list[Any]:
    """The pairs whose LR image takes a ``patch x patch`` crop."""
    return [p for p in pairs if min(p.lr.shape[:2]) >= patch]


def calibration_patches(pairs: Sequence[Any], n: int, patch: int, seed: int, scale: int = 4
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (LR ``[n, 3, patch, patch]``, HR ``[n, 3, patch*scale, patch*scale]``) uint8-valued float crops
    (0-255) at seeded random positions, cycling over the pairs (in a seeded order) whose LR image fits."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--calib-images must be an int >= 1, got {n!r}")
    fit = fitting_images(pairs, patch)
    if not fit:
        raise ValueError(f"--calib-images: no training image has an LR side >= {patch} px")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(fit))
    lrs, hrs = [], []
    for i in range(n):
        p = fit[order[i % len(fit)]]
        lr = p.lr if p.lr.ndim == 3 else np.repeat(p.lr[..., None], 3, axis=2)
        hr = p.hr if p.hr.ndim == 3 else np.repeat(p.hr[..., None], 3, axis=2)
        y = int(rng.integers(0, lr.shape[0] - patch + 1))
        x = int(rng.integers(0, lr.shape[1] - patch + 1))
        # copies: a crop may be a read-only view of a cached image
        lrs.append(torch.from_numpy(lr[y:y + patch, x:x + patch].copy()).permute(2, 0, 1))
        hrs.append(torch.from_numpy(hr[y * scale:(y + patch) * scale, x * scale:(x + patch) * scale].copy())
                   .permute(2, 0, 1))
    return torch.stack(lrs).float(), torch.stack(hrs).float()


def calibration_patch_size(pairs: Sequence[Any], preferred: int = CALIB_PATCH) -> int:
    """``preferred`` LR px if some training image is that large, else the largest LR side an image offers
    (at least 16: ESA's strided conv and 7x7 pool)."""
    largest = max((min(p.lr.shape[:2]) for p in pairs), default=0)
    return max(16, min(preferred, largest))


def make_calibration(lr: torch.Tensor, input_range: float, seed: int, batch_size: int = 8,
                     rows: int | None = CALIB_ROWS) -> Any:
    """A :class:`prune.calibration.Calibration` of 0-255 LR patches rescaled to the network's input range,
    each layer's statistics on at most ``rows`` output pixels per batch (None: all)."""
    from prune.calibration import Calibration

    return Calibration(lr / 255.0 * float(input_range), batch_size=batch_size, input_range=float(input_range),
                       rows_per_batch=rows, seed=seed)


# ------------------------------------------------------------------------------------------------ counts
def challenge_conv_flops(conv: nn.Conv2d, in_hw: tuple[int, int]) -> float:
    """MACs of one conv on an ``in_hw`` input, counted by :mod:`effsr.metrics`' challenge convention
    (the ``flops_fn`` the toolkits' budgets take)."""
    from reparam.utils.flops import count_macs

    from effsr.metrics import CHALLENGE_CONVENTION

    x = torch.empty((1, conv.in_channels, int(in_hw[0]), int(in_hw[1])), device="meta")
    shell = conv if conv.weight.device.type == "meta" else copy.deepcopy(conv).to("meta")
    return float(count_macs(shell, x, convention=CHALLENGE_CONVENTION).macs)


def _conv_only_flops(model: nn.Module) -> int:
    """Challenge MACs of the model's convs alone (3x256x256 input)."""
    from reparam.utils.flops import MacConvention, profile_macs

    from effsr.metrics import CHALLENGE_CONVENTION

    only = MacConvention(convs=CHALLENGE_CONVENTION.convs, linears=(), activations=(), norms=())
    return int(profile_macs(model, (3, 256, 256), convention=only).macs)


def budget_of(model: nn.Module, kind: str) -> float:
    """``params`` or challenge ``flops`` (MACs, 3x256x256) of ``model``."""
    from effsr import metrics

    if kind == "params":
        return float(metrics.count_params(model))
    return float(metrics.profile(model).flops)


def _budget(target_params: int | None, target_flops: float | None) -> tuple[str, float, str]:
    if (target_params is None) == (target_flops is None):
        raise ValueError("give exactly one of --target-params or --target-flops")
    if target_params is not None:
        return "params", float(target_params), "--target-params"
    return "flops", float(target_flops) * 1e9, "--target-flops"


# ----------------------------------------------------------------------------------------------- pruning
def _prune_at(student: nn.Module, ratio: float, importance: Any = None) -> nn.Module:
    import prune

    example = torch.zeros(PRUNE_EXAMPLE_SHAPE, device=next(student.parameters()).device)
    return prune.l2_filter_prune(student, example, ratio, steps=1, importance=importance, flops_input_size=None,
                                 progress=False)


def _min_pruned(student: nn.Module, kind: str) -> float:
    return budget_of(_prune_at(student, MAX_PRUNE_RATIO), kind)


def _tucker_min_params(student: nn.Module, min_channels: int, include_1x1: bool = False) -> float:
    """Parameters if every decomposable conv (k x k with k > 1; also 1x1 with ``include_1x1``) went to ranks
    (1, 1) (the Tucker path's floor)."""
    from decompose import conv_params, eligible_convs, tucker_params

    total = float(sum(p.numel() for p in student.parameters()))
    for _, conv in eligible_convs(student):
        cout, cin, kh, kw = conv.weight.shape
        if conv.groups != 1 or ((kh, kw) == (1, 1) and not include_1x1) or min(cin, cout) < min_channels:
            continue
        b = conv.bias is not None
        total -= conv_params(cout, cin, kh, kw, b) - tucker_params(cout, cin, kh, kw, b, 1, 1)
    return total


def check_budget(student: nn.Module, method: str, target_params: int | None, target_flops: float | None,
                 min_channels: int = 16) -> list[str]:
    """Check the budget against ``student`` before any work; returns the methods that can meet it
    (``ValueError`` naming the option when it is not below the model's size or no method reaches it)."""
    kind, target, arg = _budget(target_params, target_flops)
    have = budget_of(student, kind)
    unit = "params" if kind == "params" else "G FLOPs"
    show = (lambda v: f"{v:,.0f}") if kind == "params" else (lambda v: f"{v / 1e9:.3f}")
    if target >= have:
        raise ValueError(f"{arg}: {show(target)} {unit} is not below the model's {show(have)} {unit}: "
                         "nothing to compress")
    methods = ["prune", "tucker"] if method == "auto" else [method]
    ok, why = [], []
    for m in methods:
        if m == "prune":
            floor = _min_pruned(student, kind)
        elif kind == "params":  # 1x1 convs join when the k x k convs alone cannot reach the budget
            floor = min(_tucker_min_params(student, min_channels), _tucker_min_params(student, min_channels, True))
        else:  # a FLOPs floor needs the conv sizes: the allocation itself reports an unreachable budget
            ok.append(m)
            continue
        if target >= floor:
            ok.append(m)
        else:
            why.append(f"{m} reaches at best {show(floor)}")
    if not ok:
        raise ValueError(f"{arg}: {show(target)} {unit} cannot be reached ({'; '.join(why)})")
    return ok


def _importance(name: str, calib: Any) -> Any:
    import prune
    from prune.importance import ReconstructionImportance

    if name == "l2":
        return prune.L2FilterImportance()
    if name == "activation":
        return prune.ActivationImportance(torch.cat(calib.batches)[:16])
    if name == "recon":
        return ReconstructionImportance(calib)
    raise ValueError(f"--importance: unknown importance {name!r}; choose from {', '.join(IMPORTANCES)}")


def oneshot_prune(student: nn.Module, teacher: nn.Module, calib: Any, kind: str, target: float, importance: str,
                  reconstruct: bool = True, progress: bool = False, allocation: str = "uniform"
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``student`` (a copy) to ``target`` with ``importance``, then reconstruct toward ``teacher``."""
    from prune import HISTORY_ATTR
    from prune.budget import prune_to_budget
    from prune.reconstruct import reconstruct as recon

    t0 = time.perf_counter()
    imp = _importance(importance, calib)
    info: dict[str, Any] = {"method": "prune", "importance": importance}
    if allocation not in ALLOCATIONS:
        raise ValueError(f"--allocation: unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    # "uniform": one ratio for every group, then the unused budget filled where the measured error falls
    # most; "sensitivity": per-group ratios allocated globally from the calibration sensitivity
    example = torch.zeros(PRUNE_EXAMPLE_SHAPE, device=next(student.parameters()).device)
    budget = {"target_params": int(target)} if kind == "params" else \
        {"target_flops": int(target), "flops_fn": lambda m: int(budget_of(m, "flops"))}
    pruned = prune_to_budget(student, example, calib, importance=imp, max_ratio=MAX_PRUNE_RATIO,
                             allocation=allocation, **budget)
    rep = pruned.pruning_report
    info.update({"allocation": rep.allocation, "ratio": None if rep.ratio is None else round(rep.ratio, 6),
                 "restored": rep.restored, "rounds": rep.iterations,
                 "groups": [{"name": g.name, "channels": g.channels, "kept": g.kept} for g in rep.groups],
                 "locked": dict(rep.locked)})
    info.update({"history": getattr(pruned, HISTORY_ATTR), "prune_seconds": round(time.perf_counter() - t0, 3)})
    if reconstruct:
        rep = recon(pruned, teacher, calib, progress=progress)
        info["reconstruction"] = {"layers": len(rep.layers), "passes": rep.passes, "seconds": round(rep.seconds, 3),
                                  "compensated": len(rep.compensated), "ridge": rep.ridge,
                                  "per_layer": [{"name": f.name, "in": [f.in_kept, f.in_total],
                                                 "out": [f.out_kept, f.out_total],
                                                 "error_before": f.error_before, "error_after": f.error_after}
                                                for f in rep.layers]}
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return pruned.eval(), info


def oneshot_tucker(student: nn.Module, teacher: nn.Module, calib: Any, kind: str, target: float,
                   min_channels: int = 16, progress: bool = False, refine: int = TUCKER_REFINE
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """Data-aware Tucker-2 of ``student`` (a copy) to ``target``, fitted to ``teacher``. The k x k convs (k > 1)
    are decomposed; the 1x1 convs too (a low-rank factorisation) when a parameter budget is out of reach
    without them (networks of depthwise and 1x1 convs)."""
    from decompose import data_aware_tucker_model

    t0 = time.perf_counter()
    kw: dict[str, Any]
    if kind == "params":
        kw = {"target_params": int(target), "include_1x1": target < _tucker_min_params(student, min_channels)}
    else:  # the toolkit's budget counts convs only; the rest (activations) does not change under Tucker
        other = budget_of(student, "flops") - _conv_only_flops(student)
        kw = {"target_flops": max(target - other, 1.0), "flops_fn": challenge_conv_flops,
              "flops_input_size": (256, 256)}
    dec, report = data_aware_tucker_model(student, calib, teacher=teacher, min_channels=min_channels,
                                          refine=refine, progress=progress, **kw)
    from .recipe import tucker_ranks

    layers = [{"name": r.name, "status": r.status, "rank_out": r.rank_out, "rank_in": r.rank_in,
               "params_before": r.params_before, "params_after": r.params_after,
               "calib_error_before": getattr(r, "calib_error_before", None),
               "calib_error_after": getattr(r, "calib_error_after", None)} for r in report]
    info = {"method": "tucker", "ranks": tucker_ranks(dec), "layers": layers, "budget": report.budget,
            "include_1x1": bool(kw.get("include_1x1", False)), "seconds": round(time.perf_counter() - t0, 3)}
    return dec.eval(), info


def oneshot(method: str, student: nn.Module, teacher: nn.Module, calib: Any, target_params: int | None,
            target_flops: float | None, importance: str = "recon", min_channels: int = 16,
            progress: bool = False, allocation: str = "uniform", refine: int = TUCKER_REFINE
            ) -> tuple[nn.Module, dict[str, Any]]:
    """One-shot (training-free) student by ``method`` (``prune`` or ``tucker``) meeting the budget (``<=``)."""
    kind, target, arg = _budget(target_params, target_flops)
    if method not in ("prune", "tucker"):
        raise ValueError(f"--method: unknown method {method!r}; choose from prune, tucker (or auto)")
    try:
        if method == "prune":
            model, info = oneshot_prune(student, teacher, calib, kind, target, importance, progress=progress,
                                        allocation=allocation)
        else:
            model, info = oneshot_tucker(student, teacher, calib, kind, target, min_channels, progress=progress,
                                         refine=refine)
    except ValueError as err:
        raise ValueError(f"{arg}: {err}") from err
    got = budget_of(model, kind)
    if got > target:
        raise ValueError(f"{arg}: {method} reached {got:,.0f}, above the budget {target:,.0f}")
    info.update({"budget_kind": kind, "budget": target, "achieved": got})
    return model, info


# ------------------------------------------------------------------------------------------ block refinement
def block_names(teacher: nn.Module, student: nn.Module, example: torch.Tensor) -> list[str]:
    """The blocks to refine: the zoo's B1..Bn, else the network's repeated blocks at the input's resolution."""
    from distill.blocks import block_layers
    from effsr.models import source_of

    from .finetune import feature_pairs

    if source_of(teacher) is None:
        names = feature_pairs(teacher, student)
        if names:
            return names
    return block_layers(teacher, student, example=example)


def block_output_channels(teacher: nn.Module, student: nn.Module, blocks: Sequence[str],
                          example: torch.Tensor) -> dict[str, list[int]]:
    """``{block: teacher output channels the pruned student kept}`` for blocks whose output lost channels: the
    kept output channels of the last conv run inside the block with the block's (student) output width, read
    from the pruning history (:func:`prune.reconstruct.kept_channels`). A block without such a conv is left out
    (and then skipped by the refinement, which checks every block's width)."""
    from prune.core import HISTORY_ATTR
    from prune.reconstruct import kept_channels

    history = getattr(student, HISTORY_ATTR, None)
    if not history:
        return {}
    keep = kept_channels(teacher, history, example)
    widths: dict[str, int] = {}
    have = dict(student.named_modules())
    order = _call_order(student, [n for n in keep if n in have], example, widths_of=blocks, widths=widths)
    ran = sorted(order, key=order.__getitem__)
    out: dict[str, list[int]] = {}
    for b in blocks:
        inside = [n for n in ran if n.startswith(b + ".") and len(keep[n][0]) == widths.get(b)]
        if inside and len(keep[inside[-1]][0]) < _conv_out(teacher, inside[-1]):
            out[b] = list(keep[inside[-1]][0])
    return out


def _conv_out(model: nn.Module, name: str) -> int:
    m = model.get_submodule(name)
    w = getattr(m, "weight", None)
    return int(w.shape[0]) if w is not None else int(getattr(m, "out_channels", 0))


def _call_order(model: nn.Module, names: Sequence[str], example: torch.Tensor, widths_of: Sequence[str] = (),
                widths: dict[str, int] | None = None) -> dict[str, int]:
    """Position of each named module's first call in one forward pass of ``model`` on ``example``; the same pass
    puts the output channels of the modules ``widths_of`` (those returning one tensor) into ``widths``."""
    order: dict[str, int] = {}

    def hook(name: str) -> Any:
        def pre(_m: nn.Module, _args: Any) -> None:
            order.setdefault(name, len(order))
        return pre

    def width(name: str) -> Any:
        def post(_m: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and widths is not None:
                widths[name] = int(out.shape[1])
        return post

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in dict.fromkeys(names)]
    handles += [model.get_submodule(n).register_forward_hook(width(n)) for n in widths_of]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return order


def refine_blocks_of(model: nn.Module, teacher: nn.Module, calib: Any, steps: int, lr: float, seed: int,
                     progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`distill.local.refine_blocks` of a one-shot student's blocks on the calibration batches; returns the
    refined copy and what was done."""
    from distill.local import refine_blocks
    from prune.core import HISTORY_ATTR

    example = calib.batches[0][:1]
    names = block_names(teacher, model, example)
    if not names:
        return model, {"blocks": [], "skipped": "no repeated blocks found"}
    chans = block_output_channels(teacher, model, names, example)
    refined, rep = refine_blocks(teacher, model, calib, names, channels=chans, steps=steps, lr=lr, seed=seed,
                                 progress=progress)
    info = rep.to_dict()
    if getattr(model, HISTORY_ATTR, None) and any(b.kept for b in rep.blocks):
        # the convs outside the blocks were solved for the unrefined features: solve them again on the refined
        from prune.calibration import conv_units
        from prune.reconstruct import reconstruct

        units = conv_units(refined)
        order = _call_order(refined, [*units, *names], example)
        first_block = min(order.get(b, len(order)) for b in names)
        outside = [n for n in units if not any(n == b or n.startswith(b + ".") for b in names)
                   and order.get(n, -1) > first_block]  # after the blocks: the convs before them are unchanged
        if outside:  # the refined copy carries the pruning history the solve reads (deepcopy keeps it)
            fit = reconstruct(refined, teacher, calib, layers=outside, bias_compensation=False, progress=False)
            info["refit"] = {"layers": [f.name for f in fit.layers], "seconds": round(fit.seconds, 3)}
    return refined.eval(), info


# ------------------------------------------------------------------------------------------ method choice
@torch.no_grad()
def patch_psnr_y(model: nn.Module, lr: torch.Tensor, hr: torch.Tensor, scale: int = 4, y_round: bool = True) -> float:
    """Mean PSNR-Y (``scale`` px shaved; integer Y unless ``y_round=False``) of ``model`` on 0-255 LR/HR
    patch tensors."""
    from effsr import quality
    from effsr.inference import to_uint8

    rng = model_input_range(model)
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    vals = []
    try:
        for i in range(0, lr.shape[0], 8):
            out = model((lr[i:i + 8] / 255.0 * rng).to(dev)).cpu()
            for j in range(out.shape[0]):
                sr = to_uint8(out[j:j + 1], rng)
                ref = hr[i + j].permute(1, 2, 0).numpy().astype(np.uint8)
                vals.append(quality.psnr(sr, ref, shave=scale, y_channel=True, y_round=y_round))
    finally:
        model.train(was)
    finite = [v for v in vals if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("inf")


def choose(candidates: dict[str, dict[str, Any]], objective: str, tolerance: float) -> str:
    """The method to keep: best ``held_out_psnr_y``; with ``objective="runtime"`` the lowest ``runtime_ms``
    among those within ``tolerance`` dB of the best."""
    best = max(c["held_out_psnr_y"] for c in candidates.values())
    if objective == "psnr":
        return max(candidates, key=lambda m: (candidates[m]["held_out_psnr_y"], m == "prune"))
    near = [m for m, c in candidates.items() if c["held_out_psnr_y"] >= best - tolerance]
    return min(near, key=lambda m: candidates[m]["runtime_ms"])


# ------------------------------------------------------------------------------------------ runtime budget
def runtime_target(cfg: Any, teacher: nn.Module, student: nn.Module, device: Any, log: Any = None,
                   steps: int | None = None) -> dict[str, Any]:
    """The parameter budget meeting ``cfg``'s runtime budget by pruning ``student``
    (:func:`effsr.shrink.speed.params_for_runtime`, timed on ``device``); ``steps=0`` only checks reachability."""
    from .speed import RUNTIME_SIZE, SEARCH_STEPS, params_for_runtime

    return params_for_runtime(teacher, student, _prune_at, MAX_PRUNE_RATIO, target_speedup=cfg.target_speedup,
                              target_runtime=cfg.target_runtime, size=tuple(cfg.runtime_size or RUNTIME_SIZE),
                              input_range=model_input_range(teacher), trials=max(5, cfg.runtime_trials),
                              device=device, log=log, steps=SEARCH_STEPS if steps is None else steps)
