"""Exact merges of consecutive convolutions, so that Tucker-2 adds as few layers as possible.

A Tucker-2 conv is three layers (1x1, kxk core, 1x1). Where the network runs a conv directly into the first
factor, or the last factor directly into a 1x1 conv, the two are one linear map and can be one conv.
:func:`merge_factors` finds such pairs in any model with ``torch.fx`` and merges the ones where that is exact and
saves work; the kernel algebra is :func:`reparam.kernels.compose_1x1_then_conv` /
:func:`reparam.kernels.compose_conv_then_1x1`.

Every decision depends on the model's *structure* only (module types, shapes, conv settings, whether a bias
exists; never on weight values), so replaying the pass on a freshly built copy with other weights gives the same
module names and shapes and the merged model's ``state_dict`` loads into it.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from reparam import RepBlock
from reparam import kernels as K
from reparam.convert import Selector, name_selector
from reparam.utils.modules import replace_module

__all__ = ["merge_factors", "MergeRow", "MergeReport"]

ONE_TO_CONV = "1x1 -> conv"
CONV_TO_ONE = "conv -> 1x1"


@dataclass
class MergeRow:
    """One pair of consecutive convs: merged, or kept with the reason."""

    first: str                        #: dotted name of the first conv (after earlier merges: the merged conv there)
    second: str                       #: dotted name of the second conv
    status: str                       #: "merged" or "kept"
    kind: str                         #: "1x1 -> conv", "conv -> 1x1" or "" (kept before a rule applied)
    first_shape: str                  #: "32->16 1x1", "16->24 3x3/s2"
    second_shape: str
    merged_shape: str | None          #: the merged conv (None when no merge was exact)
    macs_before: int | None           #: MACs per output pixel of the pair, both convs
    macs_after: int | None            #: MACs per output pixel of the merged conv
    reason: str = ""                  #: why the pair was kept (empty when merged)

    @property
    def macs_saved(self) -> int | None:
        """MACs saved per output pixel (negative: the merge would add work)."""
        if self.macs_before is None or self.macs_after is None:
            return None
        return self.macs_before - self.macs_after


class MergeReport(list):
    """A list of :class:`MergeRow` plus ``notes`` (lines about the whole model, e.g. a failed trace)."""

    def __init__(self, rows: list[MergeRow] = (), notes: list[str] = ()) -> None:
        super().__init__(rows)
        self.notes = list(notes)

    @property
    def merged(self) -> list[MergeRow]:
        return [r for r in self if r.status == "merged"]

    @property
    def kept(self) -> list[MergeRow]:
        return [r for r in self if r.status != "merged"]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [{**asdict(r), "macs_saved": r.macs_saved} for r in self]

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        from reparam.utils.io import write_json

        return write_json(path, {"rows": self.as_dicts(), "notes": self.notes})

    def table(self) -> str:
        head = ("first", "second", "status", "kind", "before", "after", "MACs/px saved", "reason")
        rows = [head] + [(r.first, r.second, r.status, r.kind, r.first_shape + " + " + r.second_shape,
                          r.merged_shape or "-", "-" if r.macs_saved is None else str(r.macs_saved), r.reason)
                         for r in self]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
        lines.append(f"{len(self.merged)} merged, {len(self.kept)} kept")
        return "\n".join([*lines, *self.notes])

    def __str__(self) -> str:
        return self.table()

    __repr__ = list.__repr__


class _Tracer(torch.fx.Tracer):
    """The default fx tracer, except that some modules stay one opaque call: a reparam ``RepBlock`` (its own
    fusion code names its branches, so no conv inside it may be replaced) and the modules in ``opaque`` (ids of
    modules fx could not trace into). The first (innermost) module whose tracing fails is kept in ``failed``."""

    def __init__(self, opaque: set[int]) -> None:
        super().__init__()
        self.opaque = opaque
        self.failed: nn.Module | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, RepBlock) or id(m) in self.opaque or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = m
            raise


def _trace(model: nn.Module) -> tuple[torch.fx.Graph | None, set[int], list[str]]:
    """``(graph, ids of the modules traced as one call, notes)``; the graph is None when even that fails.

    When tracing fails inside a submodule (e.g. shape-dependent control flow), that submodule becomes one opaque
    call and the trace is tried again, so the rest of the model is still analysed."""
    opaque: set[int] = set()
    notes: list[str] = []
    names = {id(m): n for n, m in model.named_modules()}
    while True:
        tracer = _Tracer(opaque)
        try:
            return tracer.trace(model), opaque, notes
        except Exception as err:  # noqa: BLE001 - any tracing failure: make the failing part opaque or give up
            what = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"
            bad = tracer.failed
            if bad is None or bad is model or id(bad) in opaque or id(bad) not in names:
                notes.append(f"not merged: torch.fx could not trace {type(model).__name__} ({what}); "
                             "the model is unchanged")
                return None, opaque, notes
            opaque.add(id(bad))
            notes.append(f"{names[id(bad)]} ({type(bad).__name__}) is traced as one call, its convs are not "
                         f"merged: torch.fx could not trace into it ({what})")


def _shape(conv: nn.Conv2d) -> str:
    kh, kw = conv.kernel_size
    text = f"{conv.in_channels}->{conv.out_channels} {kh}x{kw}"
    if conv.stride != (1, 1):
        text += "/s" + ("x".join(map(str, conv.stride)) if conv.stride[0] != conv.stride[1] else str(conv.stride[0]))
    if conv.groups != 1:
        text += f" g{conv.groups}"
    return text


def _macs(conv: nn.Conv2d) -> int:
    """MACs per output pixel of ``conv``."""
    kh, kw = conv.kernel_size
    return conv.out_channels * (conv.in_channels // conv.groups) * kh * kw


def _merged_conv(a: nn.Conv2d, b: nn.Conv2d, kind: str) -> nn.Conv2d:
    """An empty ``nn.Conv2d`` with the geometry of the merge of ``a`` then ``b`` (``a``'s dtype/device)."""
    geo = b if kind == ONE_TO_CONV else a
    return nn.Conv2d(a.in_channels, b.out_channels, geo.kernel_size, stride=geo.stride, padding=geo.padding,
                     dilation=geo.dilation, bias=a.bias is not None or b.bias is not None,
                     padding_mode=geo.padding_mode, device=a.weight.device, dtype=a.weight.dtype)


def _exact_kind(a: nn.Conv2d, b: nn.Conv2d) -> tuple[str | None, str]:
    """``(kind, "")`` of the exact merge of ``a`` then ``b`` by structure alone, or ``(None, reason)``."""
    reasons = []
    if a.kernel_size == (1, 1):
        if a.bias is not None and b.padding_mode == "zeros" and K.pads_input(b.padding, b.kernel_size):
            reasons.append("1x1 -> conv: the first conv has a bias and the second zero-pads its output "
                           "(not one conv at the border)")
        else:
            try:
                _check(a, b, ONE_TO_CONV)
                return ONE_TO_CONV, ""
            except ValueError as err:
                reasons.append(f"1x1 -> conv: {err}")
    if b.kernel_size == (1, 1):
        try:
            _check(a, b, CONV_TO_ONE)
            return CONV_TO_ONE, ""
        except ValueError as err:
            reasons.append(f"conv -> 1x1: {err}")
    if not reasons:
        reasons.append("neither conv is 1x1")
    return None, "; ".join(reasons)


def _compose(a: nn.Conv2d, b: nn.Conv2d, kind: str, first: tuple, second: tuple) -> K.Kernel:
    """The kernel algebra for ``kind`` with ``a``'s and ``b``'s settings, on the ``(weight, bias)`` pairs given."""
    if kind == ONE_TO_CONV:
        return K.compose_1x1_then_conv(first, second, first_stride=a.stride, first_padding=a.padding,
                                       first_groups=a.groups, second_groups=b.groups, second_padding=b.padding,
                                       second_padding_mode=b.padding_mode)
    return K.compose_conv_then_1x1(first, second, first_groups=a.groups, second_stride=b.stride,
                                   second_padding=b.padding, second_groups=b.groups)


def _check(a: nn.Conv2d, b: nn.Conv2d, kind: str) -> None:
    """The kernel algebra's checks of the settings, on bias-free meta stand-ins: no arithmetic, and nothing that
    depends on weight values (whether a bias may exist is decided by :func:`_exact_kind` from structure)."""
    _compose(a, b, kind, (torch.empty(a.weight.shape, device="meta"), None),
             (torch.empty(b.weight.shape, device="meta"), None))


def _merge(a: nn.Conv2d, b: nn.Conv2d, kind: str) -> nn.Conv2d:
    """The one conv equal to ``b(a(x))`` (computed in float64 on the CPU, cast to ``a``'s dtype)."""

    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to("cpu", torch.float64)

    weight, bias = _compose(a, b, kind, (f64(a.weight), f64(a.bias)), (f64(b.weight), f64(b.bias)))
    out = _merged_conv(a, b, kind)
    with torch.no_grad():
        out.weight.copy_(weight)
        if out.bias is not None:
            out.bias.copy_(bias)
    out.train(a.training)
    return out


def _describe(model: nn.Module, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(model.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f".{node.target}()" if node.op == "call_method" else node.op


def merge_factors(model: nn.Module, inplace: bool = False, *, include: Selector = None,
                  exclude: Selector = None) -> tuple[nn.Module, MergeReport]:
    """Merge pairs of consecutive convs of ``model`` into one conv where that is exact and saves work.

    A *pair* is two plain ``nn.Conv2d`` calls A then B found by ``torch.fx`` symbolic tracing, B taking A's output
    as its only input, that output used by nothing else, and nothing (no activation, no add) in between. A pair
    is merged when

    * it is exact (:func:`reparam.kernels.compose_1x1_then_conv`, :func:`reparam.kernels.compose_conv_then_1x1`):
      A is a plain channel mix (1x1, stride 1, no padding, groups 1) and B is ungrouped, and A has no bias or B
      does not zero-pad (a bias is judged by its existence, not its value, so the decision replays on other
      weights); or B is a plain channel mix and A is ungrouped;
    * it saves work: the merged conv's MACs per output pixel are at most A's (times B's stride, the pixels A
      computes per output pixel) plus B's;
    * A and B are each called once and registered under one name, have no hooks, their parameters are not read
      elsewhere in the forward, and ``include``/``exclude`` (dotted-name fnmatch patterns or a callable
      ``(name, module) -> bool``, as in :func:`decompose.tucker_model`) select both.

    **Naming rule**: the merged conv takes A's dotted name and B's place holds an ``nn.Identity`` (the model's own
    ``forward`` is kept, so its class, attributes and methods stay). A chain A -> B -> C that merges twice ends as
    one conv at A's name and identities at B and C. Pairs are visited in the traced execution order.

    Returns ``(model, report)``; ``model`` is deep-copied unless ``inplace=True``. ``reparam`` RepBlocks, and
    submodules ``torch.fx`` cannot trace into (e.g. shape-dependent control flow; a note in ``report.notes``), are
    traced as one call: their convs are never merged, even where the forward also calls them from outside. When
    the model's own ``forward`` cannot be traced, the model is returned unchanged with a note. The merged convs
    keep A's dtype, device and train/eval flag; their weights are computed in float64.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    select = name_selector(include, "include", True)
    reject = name_selector(exclude, "exclude", False)
    out = model if inplace else copy.deepcopy(model)
    graph, opaque, notes = _trace(out)
    report = MergeReport(notes=notes)
    if graph is None:
        return out, report

    names: dict[int, list[str]] = {}
    for name, m in out.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(id(m), []).append(name)
    calls: dict[int, int] = {}
    read_directly: set[str] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            m = out.get_submodule(node.target)
            calls[id(m)] = calls.get(id(m), 0) + 1
        elif node.op == "get_attr":
            read_directly.add(str(node.target))

    # node -> dotted name of the conv whose output it is (a merged node points at the merged conv's name)
    conv_of: dict[torch.fx.Node, str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and type(out.get_submodule(node.target)) is nn.Conv2d:
            conv_of[node] = node.target

    def inside_opaque(name: str) -> str:
        parts = name.split(".")
        for i in range(1, len(parts)):
            outer = out.get_submodule(".".join(parts[:i]))
            if isinstance(outer, RepBlock) or id(outer) in opaque:
                return ".".join(parts[:i])
        return ""

    def blocker(name: str, m: nn.Module) -> str:
        if inside_opaque(name):
            return f"{name} lives inside {inside_opaque(name)}, which is traced as one call"
        if len(names.get(id(m), [])) > 1:
            return f"{name} is registered under several names ({', '.join(names[id(m)])})"
        if calls.get(id(m), 0) != 1:
            return f"{name} is called {calls.get(id(m), 0)} times"
        if m._forward_hooks or m._forward_pre_hooks:  # noqa: SLF001
            return f"{name} has forward hooks"
        if any(t.startswith(name + ".") for t in read_directly):
            return f"the forward reads {name}'s parameters directly"
        if not (select(name, m) and not reject(name, m)):
            return f"{name} is not selected (include/exclude)"
        return ""

    for node in list(graph.nodes):
        if node not in conv_of or node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
            continue
        b_name = node.target
        b = out.get_submodule(b_name)
        prev = node.args[0]
        if prev not in conv_of:
            # report an op sitting between two convs (the merge would not be exact through it)
            inner = prev.args[0] if prev.op != "placeholder" and prev.args else None
            if isinstance(inner, torch.fx.Node) and inner in conv_of:
                a = out.get_submodule(conv_of[inner])
                report.append(MergeRow(conv_of[inner], b_name, "kept", "", _shape(a), _shape(b), None, None, None,
                                       f"{_describe(out, prev)} lies between them"))
            continue
        a_name = conv_of[prev]
        a = out.get_submodule(a_name)
        row = dict(first=a_name, second=b_name, first_shape=_shape(a), second_shape=_shape(b))

        def keep(reason: str, kind: str = "", **kw: Any) -> None:
            report.append(MergeRow(status="kept", kind=kind, reason=reason, **{
                "merged_shape": None, "macs_before": None, "macs_after": None, **row, **kw}))

        reason = blocker(a_name, a) or blocker(b_name, b)
        if reason:
            keep(reason)
            continue
        if len(prev.users) != 1:
            keep(f"the output of {a_name} has {len(prev.users)} users")
            continue
        if a.weight.dtype != b.weight.dtype or a.weight.device != b.weight.device:
            keep("the two convs differ in dtype or device")
            continue
        kind, reason = _exact_kind(a, b)
        if kind is None:
            keep("not exact: " + reason)
            continue
        before = _macs(a) * b.stride[0] * b.stride[1] + _macs(b)
        merged_geo = a if kind == CONV_TO_ONE else b
        after = a.in_channels * b.out_channels * merged_geo.kernel_size[0] * merged_geo.kernel_size[1]
        if after > before:
            keep(f"would add work: {after} > {before} MACs per output pixel", kind, macs_before=before,
                 macs_after=after)
            continue
        merged = _merge(a, b, kind)
        replace_module(out, a_name, merged)
        replace_module(out, b_name, nn.Identity())
        names[id(merged)] = [a_name]
        calls[id(merged)] = 1
        conv_of[node] = a_name
        report.append(MergeRow(status="merged", kind=kind, merged_shape=_shape(merged), macs_before=before,
                               macs_after=after, **row))
    return out, report
