"""Closed-form reconstruction of a pruned network toward its teacher (layer by layer, forward order).

After channels are removed, every affected conv is re-solved by ridge least squares
(:meth:`prune.calibration.ConvStats.solve`) so that its output **on the student's own, already
compressed inputs** matches the teacher's output at the same layer (restricted to the filters the
student kept). Layers are solved in execution order and each solve is written back before the next
layer's statistics are collected, so later layers see the corrected activations and errors do not
accumulate. Which channels each layer kept is read from the pruning history (replayed on a copy of the
teacher), never guessed. Works through residual adds, concatenation, gating multiplies and
PixelShuffle (the targets are per-conv outputs, whatever combines them), and through
``reparam.RepBlock`` units in training form: the fused kernel is solved (prior
``block.fused_kernel()``) and written back with ``block.load_kernel``.

Bias compensation (closed form, also without a solve): for a conv whose input channels were removed,
``W_removed . E[x_removed]`` (the teacher's weights on the removed inputs times their mean on the
calibration set) is added to its bias. It is the prior of the ridge solve.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn
from reparam.utils.modules import eval_mode
from reparam.utils.progress import progress as progress_bar

from .calibration import (Calibration, ConvStats, conv_geometry, conv_has_bias, conv_kernel, conv_units,
                          write_conv_kernel)
from .core import HISTORY_ATTR, INPUT_SHAPE_ATTR
from .graph import build_graph

__all__ = ["reconstruct", "kept_channels", "conv_units", "ReconstructionReport", "LayerFit", "RECON_ATTR"]

#: Attribute of a reconstructed model holding its :class:`ReconstructionReport`.
RECON_ATTR = "reconstruction_report"


@dataclass
class LayerFit:
    """One solved layer: calibration residual ``||XW+b-Y||^2 / ||Y||^2`` before/after the solve."""

    name: str
    rows: int
    in_kept: int
    in_total: int
    out_kept: int
    out_total: int
    error_before: float
    error_after: float
    solved: bool
    seconds: float


@dataclass
class ReconstructionReport:
    layers: list[LayerFit] = field(default_factory=list)
    compensated: list[str] = field(default_factory=list)
    residual: list[str] = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0
    ridge: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"reconstruction: {len(self.layers)} layers in {self.passes} passes, {self.seconds:.1f} s "
                 f"(ridge {self.ridge:g}); bias compensation on {len(self.compensated)} layers"]
        for f in self.layers:
            lines.append(f"  {f.name:<28} in {f.in_kept:>4}/{f.in_total:<4} out {f.out_kept:>4}/{f.out_total:<4}"
                         f" rel.err {f.error_before:.4g} -> {f.error_after:.4g}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- structure
def kept_channels(teacher: nn.Module, history: Sequence[Sequence[Any]], example_inputs: Tensor
                  ) -> dict[str, tuple[list[int], list[int]]]:
    """``{conv name: (kept output channels, kept input channels)}`` (indices into the teacher's conv)
    obtained by replaying the pruning ``history`` on a copy of ``teacher``."""
    model = copy.deepcopy(teacher)
    units = conv_units(model)
    keep = {n: (list(range(m.out_channels)), list(range(m.in_channels))) for n, m in units.items()}
    if not history:
        return keep
    name_of = {id(m): n for n, m in units.items()}
    dg = build_graph(model, example_inputs)
    mods = dict(model.named_modules())
    for entry in history:
        root_name, is_out, idxs = entry
        if root_name not in mods:
            raise ValueError(f"history: no module {root_name!r} in the teacher")
        root = mods[root_name]
        pruner = dg.get_pruner_of_module(root)
        fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
        group = dg.get_pruning_group(root, fn, list(idxs))
        for item in group:
            layer, handler = item.dep.target.module, item.dep.handler
            n = name_of.get(id(layer))
            if n is None:
                continue
            rm = {int(i) for i in item.idxs}
            out_k, in_k = keep[n]
            if dg.is_out_channel_pruning_fn(handler):
                out_k = [c for j, c in enumerate(out_k) if j not in rm]
            if dg.is_in_channel_pruning_fn(handler):
                in_k = [c for j, c in enumerate(in_k) if j not in rm]
            keep[n] = (out_k, in_k)
        group.prune(record_history=False)
    for n, m in units.items():
        if (len(keep[n][0]), len(keep[n][1])) != (m.out_channels, m.in_channels):
            raise RuntimeError(f"history replay: {n} has {m.out_channels}x{m.in_channels} channels after "
                               f"replay, bookkeeping says {len(keep[n][0])}x{len(keep[n][1])}")
    return keep


def _check_ridge(ridge: Any) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 or ridge == float("inf"):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    return float(ridge)


# ---------------------------------------------------------------------------------- main entry
def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    calibration: Calibration,
    *,
    layers: str | Iterable[str] | None = None,
    ridge: float = 1e-3,
    order: str = "forward",
    history: Sequence[Sequence[Any]] | None = None,
    bias_compensation: bool = True,
    solve: bool = True,
    residual: bool = False,
    example_inputs: Tensor | None = None,
    progress: bool = True,
) -> ReconstructionReport:
    """Refit the pruned ``student`` (in place) to ``teacher``'s per-layer outputs on ``calibration``.

    Args:
        student: a pruned copy of ``teacher`` (same module names; ``.pruning_history`` from
            :func:`prune.l2_filter_prune` or :func:`prune.prune_to_budget`), or an unpruned copy.
        teacher: the original network (not modified).
        calibration: a :class:`prune.calibration.Calibration` of inputs in the networks' range.
        layers: which conv units are re-solved: ``None``/``"pruned"`` (default) the convs whose
            input channels were removed; ``"all"`` every conv unit; or an iterable of names.
        ridge: scale-free ridge toward the prior (the student's current, bias-compensated weights).
        order: ``"forward"`` (execution order, each solve feeding the next) -- the only order.
        history: pruning history (default ``student.pruning_history``; empty: nothing removed).
        bias_compensation: add ``W_removed . E[x_removed]`` to the bias of convs with removed inputs.
        solve: False: only bias compensation (no least squares).
        residual: for convs whose output is added to their own input (``conv(x) + x``, found in the
            autograd graph), fit the *sum* to the teacher's: target ``Y_t + x_t - x_s``, which also
            corrects the drift the student's input has accumulated upstream.
        example_inputs: tracing input for the history replay (default zeros of the recorded shape).
        progress: report progress over the layers (:func:`reparam.utils.progress.progress`).

    Returns:
        A :class:`ReconstructionReport` (also stored as ``student.reconstruction_report``).
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("student and teacher must be torch.nn.Module instances")
    if student is teacher:
        raise ValueError("student: must be a copy of teacher, not the teacher itself")
    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a prune.calibration.Calibration, got {type(calibration).__name__}")
    ridge = _check_ridge(ridge)
    if order != "forward":
        raise ValueError(f"order must be 'forward', got {order!r}")
    for flag, v in (("bias_compensation", bias_compensation), ("solve", solve), ("progress", progress),
                    ("residual", residual)):
        if not isinstance(v, bool):
            raise TypeError(f"{flag} must be a bool")
    t0 = time.perf_counter()
    s_units, t_units = conv_units(student), conv_units(teacher)
    missing = [n for n in s_units if n not in t_units]
    if missing:
        raise ValueError(f"student: conv units {missing[:4]} are not in the teacher (is it a pruned copy?)")
    if history is None:
        history = getattr(student, HISTORY_ATTR, None) or []
    if history:
        if example_inputs is None:
            shape = getattr(student, INPUT_SHAPE_ATTR, None)
            if not shape:
                raise ValueError("example_inputs: the student records no tracing input shape; pass example_inputs")
            p = next(teacher.parameters())
            example_inputs = torch.zeros(shape, dtype=p.dtype, device=p.device)
        keep = kept_channels(teacher, history, example_inputs)
    else:
        keep = {n: (list(range(m.out_channels)), list(range(m.in_channels))) for n, m in t_units.items()}
    for n, m in s_units.items():
        ok, ik = keep[n]
        if (len(ok), len(ik)) != (m.out_channels, m.in_channels):
            raise ValueError(f"history: {n} has {m.out_channels}x{m.in_channels} channels in the student but "
                             f"the history gives {len(ok)}x{len(ik)} (wrong history or teacher?)")
    in_pruned = [n for n in s_units if len(keep[n][1]) < t_units[n].in_channels]
    if layers is None or layers == "pruned":
        chosen = set(in_pruned)
    elif layers == "all":
        chosen = set(s_units)
    elif isinstance(layers, str):
        raise ValueError(f"layers must be 'pruned', 'all' or an iterable of conv names, got {layers!r}")
    else:
        chosen = set(layers)
        bad = sorted(chosen - set(s_units))
        if bad:
            raise ValueError(f"layers: {bad[:4]} are not conv units of the student")

    report = ReconstructionReport(ridge=ridge)
    # -------- bias compensation (closed form, from the teacher's input means)
    if bias_compensation and in_pruned:
        comp = [n for n in in_pruned if conv_geometry(t_units[n]).groups == 1 and conv_has_bias(s_units[n])]
        if comp:
            means = calibration.input_means(teacher, comp)
            for n in comp:
                tw, _ = conv_kernel(t_units[n])
                ok, ik = keep[n]
                removed = sorted(set(range(t_units[n].in_channels)) - set(ik))
                k = tw.shape[2] * tw.shape[3]
                mu = means[n][0].view(-1, k)                              # [C_in, k*k]
                w_rm = tw[ok][:, removed].to(torch.float64).flatten(2)    # [O, R, k*k]
                delta = (w_rm * mu[removed].unsqueeze(0)).sum((1, 2))
                w, b = conv_kernel(s_units[n])
                write_conv_kernel(s_units[n], w, b + delta.to(b))
                report.compensated.append(n)

    # -------- forward-order solves, block by block, several convs reading the same tensor per pass
    todo = [n for n in _order(student, calibration, s_units) if n in chosen] if solve else []
    groups, blockable = _schedule(student, calibration, todo)
    res_layers = _residual_layers(student, calibration, todo) if residual else set()
    res_index = {n: keep[n][1] for n in res_layers if keep[n][0] == keep[n][1]}
    report.residual = sorted(res_index)
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    bar = progress_bar(total=len(todo), desc="reconstruct", unit="layer", disable=not progress, leave=False)
    cache: tuple[str, Calibration, list[Tensor]] | None = None
    try:
        for names in groups:
            ts = time.perf_counter()
            out_index = {n: keep[n][0] for n in names if len(keep[n][0]) < t_units[n].out_channels}
            blk = _block_of(names[0])
            if blk is not None and blk in blockable and all(_block_of(n) == blk for n in names):
                if cache is None or cache[0] != blk:      # one forward to the block's input, per block
                    cache = (blk, calibration.derived(calibration.module_inputs(student, blk)),
                             calibration.module_inputs(teacher, blk))
                rel = {n: n[len(blk) + 1:] if n != blk else "" for n in names}
                st = cache[1].collect(s_mods[blk], [rel[n] for n in names], teacher=t_mods[blk],
                                      out_index={rel[n]: v for n, v in out_index.items()}, teacher_inputs=cache[2],
                                      residual={rel[n]: v for n, v in res_index.items() if n in rel})
                stats = {n: st[rel[n]] for n in names}
            else:
                cache = None
                stats = calibration.collect(student, names, teacher=teacher, out_index=out_index,
                                            residual={n: v for n, v in res_index.items() if n in names})
            report.passes += 1
            dt = (time.perf_counter() - ts) / len(names)
            for n in names:
                report.layers.append(_solve_one(n, s_units[n], t_units[n], stats[n], keep[n], ridge, dt))
                bar.update(1)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    setattr(student, RECON_ATTR, report)
    return report


def _solve_one(n: str, m: nn.Module, t: nn.Module, st: ConvStats, keep: tuple[list[int], list[int]],
               ridge: float, dt: float) -> LayerFit:
    ts = time.perf_counter()
    w0, b0 = conv_kernel(m)
    has_b = conv_has_bias(m)
    before = st.relative_error(w0, b0)
    w, b = st.solve(ridge, prior=(w0, b0), bias=has_b)
    after = st.relative_error(w, b)
    solved = after <= before
    if solved:
        write_conv_kernel(m, w, b)
    else:          # numerically worse (ill-conditioned statistics): keep the prior
        after = before
    return LayerFit(n, st.count, len(keep[1]), t.in_channels, len(keep[0]), t.out_channels, before, after,
                    solved, dt + time.perf_counter() - ts)


def _order(model: nn.Module, calibration: Calibration, units: dict[str, nn.Module]) -> list[str]:
    order = calibration.execution_order(model, list(units))
    return order + [n for n in units if n not in order]


def _residual_layers(model: nn.Module, calibration: Calibration, names: list[str]) -> set[str]:
    """Layers whose output is summed with their own input (an ``Add`` node of the autograd graph whose
    operands are exactly the layer's output and input)."""
    if not names:
        return set()
    mods = dict(model.named_modules())
    io: dict[str, tuple[Any, Any]] = {}

    def hook(n: str):
        def h(_m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
            o = out[0] if isinstance(out, (tuple, list)) else out
            io.setdefault(n, (inp[0].grad_fn, o.grad_fn))
        return h

    p = next(model.parameters())
    x = calibration.batches[0][:1].to(device=p.device, dtype=p.dtype).clone().requires_grad_(True)
    with eval_mode(model, hooks=[mods[n].register_forward_hook(hook(n)) for n in names]), torch.enable_grad():
        out = model(x)
    adds: list[set[int]] = []
    seen: set[int] = set()
    stack = [o.grad_fn for o in (out if isinstance(out, (tuple, list)) else [out]) if o.grad_fn is not None]
    while stack:
        f = stack.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        nxt = [g for g, _ in f.next_functions if g is not None]
        if type(f).__name__.startswith("AddBackward"):
            adds.append({id(g) for g in nxt})
        stack.extend(nxt)
    res = set()
    for n, (fin, fout) in io.items():
        if fin is not None and fout is not None and any({id(fin), id(fout)} == a for a in adds):
            res.add(n)
    return res


def _block_of(name: str) -> str | None:
    """The top-level child of the model that contains layer ``name`` (its first name component)."""
    return name.split(".", 1)[0] if name else None


def _schedule(model: nn.Module, calibration: Calibration, todo: list[str]) -> tuple[list[list[str]], set[str]]:
    """Split ``todo`` (in execution order) into passes: consecutive layers reading the very same
    input tensor are solved together (none of them can change another's input). Also the top-level
    children that can be run on their own (called once, with one tensor argument): their layers are
    solved on the block's cached input, so a pass costs one block, not a forward to the layer."""
    if not todo:
        return [], set()
    mods = dict(model.named_modules())
    seen: dict[str, Tensor] = {}
    calls: dict[str, list[bool]] = {}

    def pre(n: str):
        def hook(_m: nn.Module, inp: tuple[Any, ...]) -> None:
            seen.setdefault(n, inp[0])
        return hook

    def top(n: str):
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.setdefault(n, []).append(len(args) == 1 and not kwargs and isinstance(args[0], Tensor))
        return hook

    handles = [mods[n].register_forward_pre_hook(pre(n)) for n in todo]
    handles += [child.register_forward_pre_hook(top(n), with_kwargs=True) for n, child in model.named_children()]
    with eval_mode(model, hooks=handles):
        calibration._run(model, calibration.batches[0][:1])
    groups: list[list[str]] = []
    for n in todo:
        if (groups and n in seen and groups[-1][0] in seen and seen[n] is seen[groups[-1][0]]
                and _block_of(n) == _block_of(groups[-1][0])):
            groups[-1].append(n)
        else:
            groups.append([n])
    seen.clear()
    blockable = {n for n, c in calls.items() if c == [True]}
    return groups, blockable
