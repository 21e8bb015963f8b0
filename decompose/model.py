"""Model-level Tucker-2 decomposition: :func:`tucker_model` and :func:`recompose_model`."""
from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from reparam.utils.progress import progress as progress_bar

from .ranks import RankError, conv_params, resolve_rank, tucker_params
from .report import LayerReport, TuckerReport
from .tucker import TuckerConv, build_tucker_conv, recompose, tucker_factors
from reparam.convert import Selector, name_selector
from reparam.utils.modules import replace_module

__all__ = ["tucker_model", "recompose_model", "eligible_convs"]

ONE_BY_ONE_REASON = "1x1: low-rank factorisation, not Tucker-2 (pass include_1x1=True to decompose)"




def _inside_tucker(model: nn.Module) -> set[int]:
    return {id(c) for m in model.modules() if isinstance(m, TuckerConv) for c in m}


def eligible_convs(model: nn.Module) -> list[tuple[list[str], nn.Conv2d]]:
    """Every plain ``nn.Conv2d`` of ``model`` (not already inside a :class:`TuckerConv`) with all its names.

    A module reachable under several names (weight sharing) appears once, with every name.
    """
    inside = _inside_tucker(model)
    found: dict[int, tuple[list[str], nn.Conv2d]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m) is nn.Conv2d and name and id(m) not in inside:
            found.setdefault(id(m), ([], m))[0].append(name)
    return list(found.values())


def _fmt2(t: Any) -> str:
    return "x".join(str(v) for v in t) if isinstance(t, tuple) else str(t)


def report_row(name: str, conv: nn.Conv2d, **kw: Any) -> LayerReport:
    p = sum(t.numel() for t in conv.parameters())
    base = dict(name=name, status="skipped", in_channels=conv.in_channels, out_channels=conv.out_channels,
                kernel_size=_fmt2(conv.kernel_size), stride=_fmt2(conv.stride), groups=conv.groups,
                rank_out=None, rank_in=None, params_before=p, params_after=p, rel_error=None, seconds=0.0)
    base.update(kw)
    return LayerReport(**base)


def rank_for(names: list[str], rank: Any) -> tuple[Any, bool]:
    """(rank spec for this layer, whether the user named it explicitly) from a global spec or a dict."""
    if isinstance(rank, Mapping):
        for n in names:
            if n in rank:
                return rank[n], True
        for pattern, spec in rank.items():
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                return spec, True
        return None, False
    return rank, False


def tucker_model(
    model: nn.Module,
    rank: Any = None,
    *,
    energy: float | None = None,
    include: Selector = None,
    exclude: Selector = None,
    min_channels: int = 16,
    include_1x1: bool = False,
    inplace: bool = False,
    progress: bool = True,
    n_iter_max: int = 100,
    tol: float = 1e-7,
) -> tuple[nn.Module, TuckerReport]:
    """Tucker-2 decompose the selected ``nn.Conv2d`` layers of ``model``; returns ``(new_model, report)``.

    ``rank`` is one spec for every layer (see :func:`decompose.tucker_conv`: ``(r_out, r_in)``, int, float
    fraction of each conv's parameters, ``"vbmf"``) or a dict ``{layer_name_or_pattern: spec}`` (layers not in
    it are skipped); alternatively ``energy=``. ``include``/``exclude`` select layers by dotted name (fnmatch
    patterns) or a callable ``(name, module) -> bool``.

    Skipped, with the reason in the report: grouped/depthwise convs; 1x1 convs unless ``include_1x1``; convs with
    fewer than ``min_channels`` input or output channels; convs whose decomposition would not save parameters;
    convs a global ``(r_out, r_in)`` does not fit. A dict rank that does not fit the layer it names raises
    ``ValueError``. ``model`` is deep-copied unless ``inplace=True``; decomposed layers keep their device/dtype.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Conv2d):
        raise TypeError("model is a single nn.Conv2d: use decompose.tucker_conv(conv, rank)")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be a positive int, got {min_channels!r}")
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank= or energy=")
    if isinstance(rank, Mapping) and not all(isinstance(k, str) for k in rank):
        raise RankError("rank: dict keys must be layer names or patterns (str)")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0.0 < float(energy) <= 1.0):
        raise ValueError(f"energy must be a float in (0, 1], got {energy!r}")
    # validate a global spec's type once, up front (per-layer range problems are reported per layer)
    if rank is not None and not isinstance(rank, Mapping):
        check_spec_type(rank)
    select = name_selector(include, "include", True)
    reject = name_selector(exclude, "exclude", False)
    spec_text = f"energy={energy}" if energy is not None else (
        "per-layer dict" if isinstance(rank, Mapping) else f"rank={rank!r}")

    start = time.perf_counter()
    params_before = sum(p.numel() for p in model.parameters())
    out = model if inplace else copy.deepcopy(model)
    convs = eligible_convs(out)
    rows: list[LayerReport] = []
    replacements: list[tuple[list[str], nn.Module]] = []
    bar = progress_bar(convs, desc="tucker", unit="conv", disable=not progress)
    for names, conv in bar:
        name = names[0]
        shared = f" (shared as {', '.join(names[1:])})" if len(names) > 1 else ""
        bar.set_postfix_str(name, refresh=False)
        t0 = time.perf_counter()
        if not any(select(n, conv) for n in names):
            rows.append(report_row(name, conv, reason="not included" + shared))
            continue
        if any(reject(n, conv) for n in names):
            rows.append(report_row(name, conv, reason="excluded" + shared))
            continue
        if conv.groups != 1:
            rows.append(report_row(name, conv, reason=f"grouped/depthwise conv (groups={conv.groups})" + shared))
            continue
        if conv.kernel_size == (1, 1) and not include_1x1:
            rows.append(report_row(name, conv, reason=ONE_BY_ONE_REASON + shared))
            continue
        if min(conv.in_channels, conv.out_channels) < min_channels:
            rows.append(report_row(name, conv, reason=f"fewer than min_channels={min_channels} channels" + shared))
            continue
        spec, explicit = rank_for(names, rank) if rank is not None else (None, False)
        if rank is not None and spec is None:
            rows.append(report_row(name, conv, reason="no rank given for this layer" + shared))
            continue
        weight = conv.weight.detach().to("cpu", torch.float64).numpy()
        bias = conv.bias is not None
        try:
            r_out, r_in = resolve_rank(weight, bias, spec, energy, name=f"rank[{name!r}]" if explicit else "rank")
        except ValueError as err:
            if explicit or isinstance(err, RankError):
                raise
            rows.append(report_row(name, conv, reason=f"rank does not fit: {err}" + shared))
            continue
        cout, cin, kh, kw = weight.shape
        before = conv_params(cout, cin, kh, kw, bias)
        after = tucker_params(cout, cin, kh, kw, bias, r_out, r_in)
        if after >= before:
            rows.append(report_row(name, conv, rank_out=r_out, rank_in=r_in,
                             reason=f"would not save parameters ({after} >= {before})" + shared))
            continue
        core, u_out, u_in = tucker_factors(weight, (r_out, r_in), n_iter_max=n_iter_max, tol=tol)
        seq = build_tucker_conv(conv, core, u_out, u_in)
        err = layer_rel_error(conv, seq)
        replacements.append((names, seq))
        rows.append(report_row(name, conv, status="decomposed", rank_out=r_out, rank_in=r_in, params_after=after,
                         rel_error=err, seconds=time.perf_counter() - t0, reason=shared.strip()))
    bar.close()
    for names, seq in replacements:
        for n in names:
            replace_module(out, n, seq)
    params_after = sum(p.numel() for p in out.parameters())
    report = TuckerReport(rows, params_before, params_after, time.perf_counter() - start, spec_text)
    return out, report


def check_spec_type(rank: Any) -> None:
    """Raise for a global rank spec of the wrong type or out-of-range value that no layer could accept."""
    if isinstance(rank, str):
        if rank.lower() != "vbmf":
            raise RankError(f"rank: the only string rank is 'vbmf', got {rank!r}")
        return
    if isinstance(rank, bool):
        raise RankError(f"rank must not be a bool, got {rank!r}")
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"rank: a float rank is the fraction of parameters to keep, in (0, 1]; got {rank!r}")
        return
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        return
    if isinstance(rank, (tuple, list)) and len(rank) == 2:
        for r in rank:
            if isinstance(r, bool) or not isinstance(r, int):
                raise RankError(f"rank: (r_out, r_in) must be ints, got {rank!r}")
            if r < 1:
                raise ValueError(f"rank: (r_out, r_in) must be >= 1, got {rank!r}")
        return
    raise RankError(f"rank must be (r_out, r_in), an int, a float in (0, 1], 'vbmf' or a dict, got {rank!r}")


def layer_rel_error(conv: nn.Conv2d, seq: TuckerConv) -> float:
    w = conv.weight.detach().to("cpu", torch.float64)
    approx = recompose(seq).weight.detach().to("cpu", torch.float64)
    norm = float(torch.linalg.vector_norm(w))
    return float(torch.linalg.vector_norm(w - approx)) / norm if norm > 0 else float(torch.linalg.vector_norm(approx))


def recompose_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every :class:`TuckerConv` fused back into one ``nn.Conv2d`` (see :func:`recompose`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    out = model if inplace else copy.deepcopy(model)
    found: dict[int, tuple[list[str], TuckerConv]] = {}
    for name, m in out.named_modules(remove_duplicate=False):
        if isinstance(m, TuckerConv) and name:
            found.setdefault(id(m), ([], m))[0].append(name)
    for names, seq in found.values():
        conv = recompose(seq)
        for n in names:
            replace_module(out, n, conv)
    return out
