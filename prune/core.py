"""``l2_filter_prune``: iterative structured L2 filter pruning of any conv network, SR-structure aware."""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from reparam.utils.progress import progress as progress_bar

from reparam import RepBlock
from reparam.utils.device import model_device

from .graph import (GroupPruneError, SRDependencyGraph, build_graph, channel_atoms, locked_reason, prune_group,
                    verify_groups)
from .importance import L2FilterImportance
from ._tp_compat import reset_pruning_history
from .structure import one_line
from .report import FlopsFn, PruneReport, StepReport, channels_per_layer, count_flops
from .schedule import check_ratio, check_steps, resolve_schedule

__all__ = ["l2_filter_prune", "HISTORY_ATTR", "REPORT_ATTR", "INPUT_SHAPE_ATTR"]

#: Attribute of a pruned model holding its pruning history (list of [root name, is_out, indices]).
HISTORY_ATTR = "pruning_history"
#: Attribute of a pruned model holding the :class:`PruneReport` of the last call.
REPORT_ATTR = "pruning_report"
#: Attribute holding the example input shape the graph was traced with (needed to replay the history).
INPUT_SHAPE_ATTR = "pruning_input_shape"


def _check_inputs(model: Any, example_inputs: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, torch.Tensor):
        raise TypeError(f"example_inputs must be a torch.Tensor (one NCHW batch), got {type(example_inputs).__name__}")


def _check_round_to(round_to: Any) -> int | None:
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int):
        raise TypeError(f"round_to must be None or an int >= 1, got {type(round_to).__name__}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    return round_to


def resolve_ignored(model: nn.Module, ignored_layers: Iterable[Any] | None) -> set[nn.Module]:
    if ignored_layers is None:
        return set()
    if isinstance(ignored_layers, (str, nn.Module)):
        raise TypeError("ignored_layers must be a list of modules or module names")
    named = dict(model.named_modules())
    out: set[nn.Module] = set()
    for item in ignored_layers:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"ignored_layers: no module named {item!r} in the model")
            out.update(named[item].modules())
        elif isinstance(item, nn.Module):
            if not any(item is m for m in named.values()):
                raise ValueError(f"ignored_layers: {type(item).__name__} is not a module of the model "
                                 "(with inplace=False pass names, or modules of the model you pass in)")
            out.update(item.modules())
        else:
            raise TypeError(f"ignored_layers: expected modules or names, got {type(item).__name__}")
    return out


def _target_keep(n0: int, ratio: float, round_to: int | None) -> int:
    """Channels a group of initial size ``n0`` keeps at cumulative ``ratio``: the nearest integer to
    ``n0 * (1 - ratio)`` (halves keep the channel), then rounded down to ``round_to``, at least 1."""
    keep = min(n0, math.floor(n0 * (1.0 - ratio) + 0.5))
    if round_to:
        keep -= keep % round_to
        keep = max(keep, min(round_to, n0))
    return max(keep, 1)


def choose_channels(imp: torch.Tensor, atoms: list[list[int]], n_remove: int) -> list[int]:
    """Lowest-importance atoms (mean importance, ties by index) without exceeding ``n_remove``."""
    scored = sorted(atoms, key=lambda a: (float(imp[a].mean()), a[0]))
    chosen: list[int] = []
    for atom in scored:
        if len(chosen) + len(atom) <= n_remove:
            chosen.extend(atom)
        if len(chosen) == n_remove:
            break
    return sorted(chosen)


def ignored_as_names(original: nn.Module, ignored_layers: Iterable[Any] | None) -> list[Any] | None:
    """Translate ignored modules of the input model into names (they are looked up in the copy)."""
    if ignored_layers is None or isinstance(ignored_layers, (str, nn.Module)):
        return ignored_layers  # type: ignore[return-value]
    names = {id(m): n for n, m in original.named_modules()}
    out = []
    for item in ignored_layers:
        if isinstance(item, nn.Module) and id(item) in names:
            out.append(names[id(item)])
        else:
            out.append(item)
    return out


def l2_filter_prune(
    model: nn.Module,
    example_inputs: torch.Tensor,
    ratio: float,
    steps: int = 1,
    schedule: str | Callable[[float, int], Sequence[float]] = "agp",
    finetune: Callable[[nn.Module, int], Any] | None = None,
    ignored_layers: Iterable[nn.Module | str] | None = None,
    round_to: int | None = None,
    inplace: bool = False,
    *,
    importance: Callable[[Any], torch.Tensor | None] | None = None,
    flops_input_size: Sequence[int] | None = (3, 256, 256),
    flops_fn: FlopsFn | None = None,
    progress: bool = True,
) -> nn.Module:
    """Structured L2 filter pruning: remove ``ratio`` of the prunable filters in ``steps`` rounds.

    Args:
        model: any conv network (RepBlocks in training form are pruned as units, all branches together).
        example_inputs: one input batch for tracing (e.g. ``torch.rand(1, 3, 32, 32)``). For ESA
            networks use at least 16x16 pixels (strided conv + 7x7 max-pool).
        ratio: fraction in [0, 1) of each prunable group's filters removed by the end (so of all
            prunable filters, up to rounding). A *group* is a set of channels DepGraph couples (e.g.
            every conv on a residual trunk shares one group); groups that would change the network's
            input/output channels are never pruned.
        steps, schedule: number of rounds and the cumulative ratio after each: ``"agp"`` (cubic,
            Zhu & Gupta), ``"linear"``, or ``callable(ratio, steps) -> ratios``.
        finetune: ``finetune(model, step)`` is called after each step (1-based). Pruning replaces
            parameters, so build the optimizer inside it (:func:`prune.fresh_optimizer`; a ready-made SR
            callback is ``effsr.train.sr_finetune``).
            Its return value is stored in the step report.
        ignored_layers: modules (or their names) whose output channels are never pruned.
        round_to: keep channel counts of each group a multiple of this (as torch-pruning's ``round_to``).
        inplace: prune ``model`` itself instead of a deep copy.
        importance: a torch-pruning importance (``group -> per-channel scores``, lowest pruned first);
            default :class:`prune.L2FilterImportance` (per-filter L2 norm).
        flops_input_size: image size for the FLOPs in the report (challenge convention: 3x256x256);
            None skips counting FLOPs.
        flops_fn: ``flops_fn(model, input_size) -> int`` counts them (default: the module MAC counter of
            :mod:`reparam.utils.flops`, the NTIRE counter's convention; ``effsr`` passes its own).
        progress: report progress over steps (:func:`reparam.utils.progress.progress`).

    Returns:
        The pruned model, with ``.pruning_history`` (replayable by :func:`prune.load`) and
        ``.pruning_report`` (:class:`prune.PruneReport`) attributes.
    """
    _check_inputs(model, example_inputs)
    ratio = check_ratio(ratio)
    steps = check_steps(steps)
    ratios = resolve_schedule(schedule, ratio, steps)
    round_to = _check_round_to(round_to)
    if finetune is not None and not callable(finetune):
        raise TypeError(f"finetune must be a callable (model, step) or None, got {type(finetune).__name__}")
    if importance is None:
        importance = L2FilterImportance()
    elif not callable(importance):
        raise TypeError(f"importance must be a torch-pruning importance (callable on a group), got "
                        f"{type(importance).__name__}")
    if not isinstance(progress, bool):
        raise TypeError("progress must be a bool")
    if not isinstance(inplace, bool):
        raise TypeError("inplace must be a bool")

    if not inplace:
        ignored_layers = ignored_as_names(model, ignored_layers)
        model = copy.deepcopy(model)
    ignored = resolve_ignored(model, ignored_layers)
    device = model_device(model)
    example = example_inputs.detach().to(device)

    dg = build_graph(model, example)
    history = list(getattr(model, HISTORY_ATTR, []) or [])
    reset_pruning_history(dg)

    flops, source = count_flops(model, flops_input_size, flops_fn)
    if flops_input_size is not None:
        flops_input_size = tuple(flops_input_size)
    report = PruneReport(ratio=ratio, steps=steps, schedule=ratios, flops_input_size=flops_input_size,
                         flops_source=source, importance=type(importance).__name__)
    initial: dict[str, int] = {}

    def record(step: int, target: float, ft: Any = None) -> StepReport:
        prunable = sum(initial.values())
        current = channels_per_layer(model)
        removed = sum(initial[n] - current.get(n, initial[n]) for n in initial)
        fl, _ = count_flops(model, flops_input_size, flops_fn) if step else (flops, source)
        s = StepReport(step=step, target_ratio=target, params=sum(p.numel() for p in model.parameters()),
                       flops=fl, removed_filters=removed, prunable_filters=prunable, channels=current,
                       finetune=ft)
        report.history.append(s)
        return s

    bar = progress_bar(total=steps, desc="l2 prune", unit="round", disable=not progress, leave=False)
    try:
        for step, r_t in enumerate(ratios, start=1):
            plan = _plan_step(dg, importance, ignored, initial, report, r_t, round_to)
            if step == 1:
                report.groups = dict(initial)
                record(0, 0.0)
            for root, fn, idxs in plan:
                name = dg.module_name(root)
                try:
                    group = dg.get_pruning_group(root, fn, idxs)
                except Exception as e:  # noqa: BLE001 - tp cannot map these channels: keep the group
                    report.locked[name] = f"{name}: torch-pruning cannot build its group ({one_line(e)})"
                    continue
                if not dg.check_pruning_group(group):
                    report.locked[name] = "removing these channels would empty a layer"
                    continue
                try:
                    prune_group(dg, group)
                except GroupPruneError as e:
                    report.locked[name] = str(e)
            ft = finetune(model, step) if finetune is not None else None
            s = record(step, r_t, ft)
            bar.update(1)
            bar.set_postfix(params=f"{s.params:,}", removed=f"{s.removed_fraction:.1%}")
    finally:
        bar.close()

    history.extend([[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in dg.pruning_history()])
    setattr(model, HISTORY_ATTR, history)
    setattr(model, INPUT_SHAPE_ATTR, list(example.shape))
    setattr(model, REPORT_ATTR, report)
    return model



#: Module types whose output channels root a prunable group.
GROUP_ROOTS = (nn.Conv2d, nn.Linear, RepBlock)


def scored_groups(dg: Any, importance: Callable[[Any], Any], ignored: Any, locked: dict[str, str]
                  ) -> Iterator[tuple[str, Any, torch.Tensor]]:
    """``(name, group, importance)`` of every group of ``dg`` that can be pruned and scored (importance as a
    float CPU tensor); a locked or unscorable group is recorded in ``locked[name]`` with its reason instead.

    Locked: groups :func:`prune.graph.locked_reason` names, groups torch-pruning cannot build, and groups
    whose pruning is not the network with their channels zeroed (:func:`prune.graph.verify_groups`)."""
    free = []
    for group in dg.get_all_groups(ignored_layers=[], root_module_types=GROUP_ROOTS):
        name = dg.module_name(group[0].dep.target.module)
        why = locked_reason(dg, group, ignored)
        if why is not None:
            locked.setdefault(name, why)
            continue
        free.append((name, group))
    for name, why in getattr(dg, "group_errors", {}).items():
        locked.setdefault(name, why)
    failed = verify_groups(dg, free) if isinstance(dg, SRDependencyGraph) else {}
    for name, group in free:
        if name in failed:
            locked.setdefault(name, f"{name}: {failed[name]}")
            continue
        imp = importance(group)
        if imp is None:
            locked.setdefault(name, f"{type(importance).__name__} cannot score any layer of this group")
            continue
        yield name, group, imp.detach().float().cpu()

def _plan_step(dg: SRDependencyGraph, importance: Callable[[Any], Any], ignored: set[nn.Module],
               initial: dict[str, int], report: PruneReport, r_t: float,
               round_to: int | None) -> list[tuple[nn.Module, Callable[..., Any], list[int]]]:
    """Score every group (before pruning any) and choose the channels to remove in this step."""
    plan = []
    for name, group, imp in scored_groups(dg, importance, ignored, report.locked):
        root, fn = group[0].dep.target.module, group[0].dep.handler
        n_cur = len(imp)
        n0 = initial.setdefault(name, n_cur)
        n_remove = n_cur - _target_keep(n0, r_t, round_to)
        if n_remove <= 0:
            continue
        idxs = choose_channels(imp, channel_atoms(group), n_remove)
        if idxs:
            plan.append((root, fn, idxs))
    return plan
