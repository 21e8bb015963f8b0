"""Model-level data-aware Tucker-2: :func:`data_aware_tucker_model`.

The convs are processed in forward order, a stage at a time (``schedule="layer"``, the default: one conv;
``"block"``: the convs of one top-level child module). For each stage the calibration batches run through the
*student as compressed so far* and the frozen teacher (:meth:`prune.calibration.Calibration.collect`), so every
fit maps the student's actual (already compressed) inputs to the teacher's outputs at that layer: errors of
earlier layers are corrected instead of accumulated. Selected convs become :class:`~decompose.TuckerConv` with
factors from :func:`decompose.data_aware.data_aware_tucker`; the other convs are refit toward the teacher by
ridge regression toward their old weights (``refit=True``), never increasing their calibration error.

Ranks come from a rank spec (as :func:`decompose.tucker_model`) or from a budget, ``target_params=`` /
``target_flops=``, allocated globally by :func:`decompose.budget.allocate` from per-layer error-vs-rank curves
measured on the calibration statistics of the unmodified model.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from reparam.utils.progress import progress as progress_bar

from reparam.utils.modules import eval_mode, replace_module

from .budget import LayerChoices, allocate, bilinear_cost, conv_macs
from .data_aware import data_aware_tucker, rank_curves
from .model import ONE_BY_ONE_REASON, check_spec_type, rank_for, layer_rel_error, report_row, eligible_convs
from .ranks import RankError, conv_params, resolve_rank, tucker_params
from .report import TuckerReport
from .tucker import build_tucker_conv
from reparam.convert import Selector, name_selector

__all__ = ["data_aware_tucker_model"]

FlopsFn = Callable[[nn.Conv2d, tuple[int, int]], float]



def _as_calibration(calibration: Any) -> Any:
    from prune.calibration import Calibration

    if isinstance(calibration, Calibration):
        if len(calibration) == 0:
            raise ValueError("calibration: empty calibration set")
        return calibration
    if calibration is None:
        raise ValueError("calibration is required (a prune.calibration.Calibration or NCHW input batches)")
    try:
        return Calibration(calibration)
    except ValueError as err:
        raise ValueError(f"calibration: {err}") from err


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _stages(order: list[str], schedule: str) -> list[list[str]]:
    if schedule == "layer":
        return [[n] for n in order]
    stages: list[list[str]] = []
    last = None
    for n in order:
        head = n.split(".", 1)[0]
        if head != last:
            stages.append([])
            last = head
        stages[-1].append(n)
    return stages


def _probe_sizes(model: nn.Module, convs: Sequence[tuple[list[str], nn.Conv2d]], shape: tuple[int, ...]
                 ) -> dict[int, tuple[int, int]]:
    """Input spatial size of every conv on one forward of ``zeros(shape)`` (by module id)."""
    sizes: dict[int, tuple[int, int]] = {}

    def hook(m: nn.Module, inp: tuple[Any, ...]) -> None:
        sizes.setdefault(id(m), (int(inp[0].shape[-2]), int(inp[0].shape[-1])))

    p = next(model.parameters())
    with eval_mode(model, hooks=[conv.register_forward_pre_hook(hook) for _, conv in convs]), torch.no_grad():
        model(torch.zeros(shape, device=p.device, dtype=p.dtype))
    return sizes


@torch.no_grad()
def _sensitivities(teacher: nn.Module, calib: Any, names: Sequence[str], batches: int = 2, rel_noise: float = 0.05,
                   seed: int = 0) -> dict[str, float]:
    """Per layer, the final-output MSE per unit of per-element noise variance added to that layer's output.

    Gaussian noise of standard deviation ``rel_noise * std(layer output)`` is injected at one layer at a time
    (on the first ``batches`` calibration batches, seeded) and the network output's mean squared change is
    divided by the noise variance: how much a unit of that layer's error costs at the output (to first order).
    """
    mods = dict(teacher.named_modules())
    p = next(teacher.parameters())
    xs = [x.to(device=p.device, dtype=p.dtype) for x in calib.batches[:batches]]
    clean = [teacher(x) for x in xs]
    out: dict[str, float] = {}
    for n in names:
        state: dict[str, Any] = {}

        def hook(_m: nn.Module, _inp: Any, y: torch.Tensor) -> torch.Tensor:
            sigma = rel_noise * float(y.std())
            sigma = sigma if sigma > 0 else rel_noise
            noise = torch.randn(y.shape, generator=state["gen"], dtype=torch.float32).to(y)
            state["var"] = sigma * sigma
            return y + sigma * noise

        handle = mods[n].register_forward_hook(hook)
        try:
            total, var = 0.0, 0.0
            for b, x in enumerate(xs):
                state["gen"] = torch.Generator().manual_seed(seed * 1_000_003 + b)
                total += float((teacher(x) - clean[b]).double().pow(2).mean())
                var += state["var"]
        finally:
            handle.remove()
        out[n] = total / var if var > 0 else 0.0
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def data_aware_tucker_model(
    model: nn.Module,
    calibration: Any,
    rank: Any = None,
    *,
    target_params: int | None = None,
    target_flops: float | None = None,
    teacher: nn.Module | None = None,
    flops_fn: FlopsFn | None = None,
    flops_input_size: tuple[int, int] | None = None,
    include: Selector = None,
    exclude: Selector = None,
    min_channels: int = 16,
    include_1x1: bool = False,
    refit: bool = True,
    ridge: float = 1e-4,
    refit_ridge: float = 1e-2,
    schedule: str = "layer",
    sensitivity: str = "noise",
    refine: int = 0,
    inplace: bool = False,
    progress: bool = True,
) -> tuple[nn.Module, TuckerReport]:
    """Data-aware Tucker-2 of ``model`` fitted to ``teacher`` on ``calibration``; returns ``(new_model, report)``.

    Args:
        model: the network to compress (deep-copied unless ``inplace``).
        calibration: a :class:`prune.calibration.Calibration`, or NCHW input batches (in the model's input range)
            to build one from.
        rank: a rank spec as in :func:`decompose.tucker_model` (global or a dict ``{name or pattern: spec}``).
        target_params: instead of ``rank``: the largest parameter count of the whole result; per-layer ranks
            are allocated globally from the calibration error.
        target_flops: instead of ``rank``: the largest total conv cost under ``flops_fn`` (default a plain MAC
            count) on an input of spatial size ``flops_input_size`` (default the first calibration batch's).
        teacher: the network whose layer outputs are the targets (default a frozen copy of ``model``); its
            conv names and output shapes must match ``model``'s.
        include/exclude/min_channels/include_1x1: which convs may be decomposed (as in ``tucker_model``).
        refit: refit every conv that is not decomposed toward the teacher (ridge toward its old weights).
        ridge: relative ridge of the Tucker core regression; refit_ridge: that of the refit (toward the old
            weights, so larger is safer).
        schedule: ``"layer"`` (default: one calibration pass per conv, every fit sees all earlier compression)
            or ``"block"`` (one pass per top-level child module: faster, but convs of one block do not correct
            each other; on RFDN 0.2 dB lower one-shot).
        sensitivity: how a budget weighs the layers' estimated errors: ``"noise"`` (default) by how much
            noise injected at the layer changes the network's output (so an error in a layer that feeds the
            output directly costs more), ``"relative"`` by the layer's own relative error.
        refine: rounds of alternating least squares per decomposed conv on its exact calibration objective
            (see :func:`decompose.data_aware.data_aware_tucker`); 0 keeps the closed-form factors.

    The report has one row per conv (status ``"decomposed"``, ``"refit"`` or ``"skipped"``) with the relative
    calibration error before and after its fit, and for a budget ``report.budget`` (target and achieved).
    """
    if not isinstance(model, nn.Module) or isinstance(model, nn.Conv2d):
        raise TypeError(f"model must be an nn.Module network, got {type(model).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
    given = [n for n, v in (("rank", rank), ("target_params", target_params), ("target_flops", target_flops))
             if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of rank=, target_params= or target_flops= (got {given or 'none'})")
    if target_params is not None and (isinstance(target_params, bool) or not isinstance(target_params, int)
                                      or target_params < 1):
        raise ValueError(f"target_params must be a positive int, got {target_params!r}")
    if target_flops is not None:
        _positive(target_flops, "target_flops")
    if flops_fn is not None and not callable(flops_fn):
        raise TypeError("flops_fn must be callable (conv, (h, w)) -> float")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be a positive int, got {min_channels!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an int >= 0, got {refine!r}")
    if sensitivity not in ("noise", "relative"):
        raise ValueError(f"sensitivity must be 'noise' or 'relative', got {sensitivity!r}")
    if schedule not in ("block", "layer"):
        raise ValueError(f"schedule must be 'block' or 'layer', got {schedule!r}")
    ridge = _positive(ridge, "ridge") if ridge != 0 else 0.0
    refit_ridge = _positive(refit_ridge, "refit_ridge")
    if rank is not None:
        if isinstance(rank, Mapping):
            if not all(isinstance(k, str) for k in rank):
                raise RankError("rank: dict keys must be layer names or patterns (str)")
        else:
            check_spec_type(rank)
    calib = _as_calibration(calibration)
    select = name_selector(include, "include", True)
    reject = name_selector(exclude, "exclude", False)

    start = time.perf_counter()
    params_before = sum(p.numel() for p in model.parameters())
    if teacher is None:
        teacher = copy.deepcopy(model)
    teacher = teacher.eval()
    out = model if inplace else copy.deepcopy(model)
    convs = eligible_convs(out)
    by_name = {names[0]: (names, conv) for names, conv in convs}
    order = [n for n in calib.execution_order(out, list(by_name)) if n in by_name]

    # ---- which convs may be decomposed
    rows: dict[str, Any] = {}
    candidates: list[str] = []
    for n in by_name:
        names, conv = by_name[n]
        shared = f" (shared as {', '.join(names[1:])})" if len(names) > 1 else ""
        why = None
        if n not in order:
            why = "did not run on the calibration inputs"
        elif not any(select(m, conv) for m in names):
            why = "not included"
        elif any(reject(m, conv) for m in names):
            why = "excluded"
        elif conv.groups != 1:
            why = f"grouped/depthwise conv (groups={conv.groups})"
        elif conv.kernel_size == (1, 1) and not include_1x1:
            why = ONE_BY_ONE_REASON
        elif min(conv.in_channels, conv.out_channels) < min_channels:
            why = f"fewer than min_channels={min_channels} channels"
        if why is None:
            candidates.append(n)
        else:
            rows[n] = why + shared

    # ---- ranks: from a spec, or allocated under a budget
    ranks: dict[str, tuple[int, int]] = {}
    budget_info: dict[str, Any] | None = None
    if rank is not None:
        for n in candidates:
            names, conv = by_name[n]
            spec, explicit = rank_for(names, rank)
            if spec is None:
                rows[n] = "no rank given for this layer"
                continue
            w = _np(conv.weight)
            try:
                r = resolve_rank(w, conv.bias is not None, spec, None, name=f"rank[{n!r}]" if explicit else "rank")
            except ValueError as err:
                if explicit or isinstance(err, RankError):
                    raise
                rows[n] = f"rank does not fit: {err}"
                continue
            cout, cin, kh, kw = w.shape
            if tucker_params(cout, cin, kh, kw, conv.bias is not None, *r) >= conv_params(cout, cin, kh, kw,
                                                                                          conv.bias is not None):
                rows[n] = "would not save parameters"
                continue
            ranks[n] = r
    else:
        ranks, budget_info = _allocate(out, teacher, calib, by_name, candidates, order, target_params,
                                       target_flops, flops_fn, flops_input_size, ridge, progress, sensitivity)
        for n in candidates:
            if n not in ranks:
                rows[n] = "kept whole by the budget allocation"

    # ---- sequential fit in forward order
    work = [n for n in order if n in ranks or (refit and n not in ranks)]
    report_rows: dict[str, Any] = {}
    bar = progress_bar(total=len(work), desc="data-aware tucker", unit="conv", disable=not progress)
    for stage in _stages(work, schedule):
        stats = calib.collect(out, stage, teacher=teacher)
        replace: list[tuple[list[str], nn.Module]] = []
        for n in stage:
            t0 = time.perf_counter()
            names, conv = by_name[n]
            st = stats[n]
            ysum = max(float(st.yty.sum()), 1e-300)
            e_before = float(st.error(conv.weight, conv.bias))
            shared = f"shared as {', '.join(names[1:])}" if len(names) > 1 else ""
            if n in ranks:
                w = _np(conv.weight)
                fit = data_aware_tucker(w, None if conv.bias is None else _np(conv.bias), _np(st.xtx),
                                        _np(st.xty), _np(st.yty), ranks[n], ridge=ridge, refine=refine)
                seq = build_tucker_conv(conv, fit.core, fit.last, fit.first.T)
                if conv.bias is not None:
                    with torch.no_grad():
                        seq[2].bias.copy_(torch.from_numpy(fit.bias))
                replace.append((names, seq))
                cout, cin, kh, kw = w.shape
                report_rows[n] = report_row(n, conv, status="decomposed", rank_out=ranks[n][0], rank_in=ranks[n][1],
                                      params_after=tucker_params(cout, cin, kh, kw, conv.bias is not None,
                                                                 *ranks[n]),
                                      rel_error=layer_rel_error(conv, seq), calib_error_before=e_before / ysum,
                                      calib_error_after=fit.error / ysum, seconds=time.perf_counter() - t0,
                                      reason="; ".join(x for x in (f"input subspace: {fit.subspace}", shared) if x))
            else:
                has_bias = conv.bias is not None
                w, b = st.solve(refit_ridge, prior=(conv.weight, conv.bias), bias=has_bias)
                e_after = float(st.error(w, b))
                note = "refit toward the teacher"
                if e_after <= e_before:
                    with torch.no_grad():
                        conv.weight.copy_(w.to(conv.weight))
                        if has_bias:
                            conv.bias.copy_(b.to(conv.bias))
                else:
                    e_after, note = e_before, "refit kept the old weights (no gain)"
                why = rows.get(n, "")
                report_rows[n] = report_row(n, conv, status="refit", calib_error_before=e_before / ysum,
                                      calib_error_after=e_after / ysum, seconds=time.perf_counter() - t0,
                                      reason="; ".join(x for x in (note, why, shared) if x))
            bar.update(1)
        for names, seq in replace:
            for m in names:
                replace_module(out, m, seq)
    bar.close()

    final = []
    for names, conv in convs:
        n = names[0]
        final.append(report_rows[n] if n in report_rows else report_row(n, conv, reason=rows.get(n, "skipped")))
    params_after = sum(p.numel() for p in out.parameters())
    spec = ("data-aware " + (f"rank={rank!r}" if rank is not None and not isinstance(rank, Mapping) else
                             "per-layer dict" if rank is not None else
                             f"target_params={target_params}" if target_params is not None else
                             f"target_flops={target_flops:g}"))
    report = TuckerReport(final, params_before, params_after, time.perf_counter() - start, spec)
    if budget_info is not None:
        if budget_info["kind"] == "params":
            budget_info["achieved"] = params_after
        report.budget = budget_info
    return out, report


def _allocate(model: nn.Module, teacher: nn.Module, calib: Any, by_name: dict, candidates: list[str],
              order: list[str], target_params: int | None, target_flops: float | None, flops_fn: FlopsFn | None,
              flops_input_size: tuple[int, int] | None, ridge: float, progress: bool, sensitivity: str
              ) -> tuple[dict[str, tuple[int, int]], dict[str, Any]]:
    """Per-layer ranks meeting the budget, from error-vs-rank curves on the unmodified model's statistics."""
    convs = list(by_name.values())
    if target_params is not None:
        kind, target, arg = "params", float(target_params), "target_params"
        total = float(sum(p.numel() for p in model.parameters()))
        cost_of = {n: (lambda c: (lambda r_out, r_in: float(tucker_params(
            c.out_channels, c.in_channels, *c.kernel_size, c.bias is not None, r_out, r_in))))(by_name[n][1])
            for n in candidates}
        keep = {n: float(sum(p.numel() for p in by_name[n][1].parameters())) for n in candidates}
    else:
        kind, target, arg = "flops", float(target_flops), "target_flops"
        fn = flops_fn or conv_macs
        x0 = calib.batches[0]
        hw = tuple(flops_input_size) if flops_input_size is not None else tuple(x0.shape[-2:])
        sizes = _probe_sizes(model, convs, (1, x0.shape[1], int(hw[0]), int(hw[1])))
        total = float(sum(fn(c, sizes[id(c)]) for _, c in convs if id(c) in sizes))
        cost_of = {n: bilinear_cost(by_name[n][1], sizes[id(by_name[n][1])], fn) for n in candidates}
        keep = {n: float(fn(by_name[n][1], sizes[id(by_name[n][1])])) for n in candidates}
    if target >= total:
        raise ValueError(f"{arg}={target:g} is not below the model's {total:g} ({kind}): nothing to compress")
    if not candidates:
        raise ValueError(f"{arg}: no conv can be decomposed (see include/exclude/min_channels/include_1x1)")
    fixed = total - sum(keep.values())
    todo = [n for n in order if n in candidates]
    sens = _sensitivities(teacher, calib, todo) if sensitivity == "noise" else {}
    choices: list[LayerChoices] = []
    bar = progress_bar(total=len(todo), desc="rank curves", unit="conv", disable=not progress)
    for stage in _stages(todo, "block"):
        stats = calib.collect(model, stage, teacher=teacher)
        for n in stage:
            conv = by_name[n][1]
            st = stats[n]
            e_in, e_out, energy = rank_curves(_np(conv.weight), None if conv.bias is None else _np(conv.bias),
                                              _np(st.xtx), _np(st.xty), _np(st.yty), ridge=max(ridge, 1e-8))
            if sensitivity == "noise":     # predicted output MSE: per-element layer error x its sensitivity
                scale = sens[n] / max(st.count * conv.out_channels, 1)
            else:                          # relative error of the layer
                scale = 1.0 / energy if energy > 0 else 1.0
            choices.append(LayerChoices.grid(n, conv.out_channels, conv.in_channels, keep[n], cost_of[n],
                                             e_in, e_out, scale))
            bar.update(1)
    bar.close()
    picked = allocate(choices, target, fixed, name=arg)
    ranks = {n: r for n, r in picked.items() if r is not None}
    achieved = fixed + sum(cost_of[n](*ranks[n]) if n in ranks else keep[n] for n in candidates)
    return ranks, {"kind": kind, "target": target, "before": total, "achieved": achieved,
                   "estimated_error": {c.name: float(c.error[c.ranks.index(picked[c.name])]) for c in choices}}
