"""``fuse_foreign``: put re-parameterizable blocks that come with their own deploy switch into deploy form.

Networks written outside this package often carry their own rep blocks, each with a method that merges its
branches: ``switch_to_deploy()`` (RepVGG, DBB, ACB), ``reparameterize()`` (MobileOne, FastViT),
``fuse()``, ``merge()``, ``rep_params()``, ``update_params()`` (SPAN's ``Conv3XC``) and so on. Such a call
is only worth making when it is exact, so every call is checked:

* modules are visited children first, each instance once; :class:`~reparam.base.RepBlock` (fused by
  :func:`reparam.fuse_all`), torch's own modules and the inside of a RepBlock are not visited;
* a module is a candidate when it has a method of one of the known names (:data:`FOREIGN_METHODS`, first
  match wins) that can be called without arguments; a method that needs arguments, an attribute that is not
  callable, or a submodule of that name is never called (the module is listed as skipped);
* the method runs in eval mode under ``torch.no_grad()``; a module it returns (``fuse()`` returning a conv)
  replaces the block at every place the block sits;
* then the whole model runs on a probe input and its output is compared with the output of the model before
  any call: in float64 (a float64 copy of the model) where the model runs in float64, and always in the
  model's own dtype. A call that raises, or changes the output by more than ``rtol`` relative to the
  output's peak, is undone (the module is restored from a copy taken before the call) and the module is
  reported as left unfused, with the reason. A call that leaves the module exactly as it was is reported as
  left unfused too (the method only returns a kernel, or the block is already in deploy form).

So the returned model computes what the given one computes (to ``rtol``), and the report names every block
that was fused and every one that was not.

>>> import torch
>>> from torch import nn
>>> class Rep(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
...     def forward(self, x):
...         return self.a(x) + self.b(x) if hasattr(self, "b") else self.a(x)
...     def switch_to_deploy(self):
...         self.a.weight.data[:, :, 1:2, 1:2] += self.b.weight.data
...         self.a.bias.data += self.b.bias.data
...         del self.b
>>> net, report = fuse_foreign(nn.Sequential(nn.Conv2d(3, 4, 1), Rep()))
>>> [(m.name, m.method) for m in report.fused]
[('1', 'switch_to_deploy')]
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .base import RepBlock
from .utils.modules import sites

__all__ = ["fuse_foreign", "ForeignReport", "ForeignModule", "FOREIGN_METHODS", "FOREIGN_RTOL"]

#: Method names of deploy switches, in the order they are tried (the first one a module has is called).
FOREIGN_METHODS: tuple[str, ...] = (
    "switch_to_deploy", "reparameterize", "reparametrize", "convert_to_deploy", "fuse_reparam", "fuse",
    "merge", "merge_kernel", "rep_params", "update_params",
)
#: Largest accepted change of the model's output, relative to the output's peak.
FOREIGN_RTOL = 1e-5


@dataclass
class ForeignModule:
    """One visited block: dotted ``name`` (``""`` is the model itself), class name ``cls``, the ``method``
    called (or found), the measured output change ``rel_error`` (``None`` when not measured) and, for a
    block left unfused or skipped, the ``reason``."""

    name: str
    cls: str
    method: str
    rel_error: float | None = None
    reason: str = ""

    def label(self) -> str:
        """``name (Class.method)``, with ``<model>`` for the model itself."""
        return f"{self.name or '<model>'} ({self.cls}.{self.method})"


@dataclass
class ForeignReport:
    """What :func:`fuse_foreign` did: blocks ``fused``, blocks ``unfused`` (with the reason: the call raised,
    changed the output or changed nothing), and modules ``skipped`` (the attribute exists but is not a method
    callable without arguments). ``probe_dtype`` is the dtype the output comparison ran in."""

    fused: list[ForeignModule] = field(default_factory=list)
    unfused: list[ForeignModule] = field(default_factory=list)
    skipped: list[ForeignModule] = field(default_factory=list)
    probe_dtype: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy."""
        return asdict(self)

    def summary(self) -> str:
        """One line: the blocks fused and those left unfused with why (blocks of one class with one reason
        are grouped: the first one's name and how many)."""
        def groups(entries: list[ForeignModule]) -> list[str]:
            seen: dict[tuple[str, str, str], list[ForeignModule]] = {}
            for m in entries:
                reason = m.reason.replace(m.name, "<name>") if m.name else m.reason
                seen.setdefault((m.cls, m.method, reason), []).append(m)
            return [f"{ms[0].label()}{f' and {len(ms) - 1} more' if len(ms) > 1 else ''}"
                    f"{': ' + ms[0].reason if ms[0].reason else ''}" for ms in seen.values()]

        text = f"{len(self.fused)} foreign rep block(s) fused"
        if self.fused:
            text += " (" + "; ".join(groups(self.fused)) + ")"
        if self.unfused:
            text += f", {len(self.unfused)} left unfused (" + "; ".join(groups(self.unfused)) + ")"
        return text


def _zero_arg_method(module: nn.Module, name: str) -> tuple[Callable[[], Any] | None, str]:
    """``(bound method, "")`` when ``module.name`` is a method callable without arguments, else
    ``(None, why)`` (``why`` is ``""`` when there is no such attribute at all)."""
    try:
        static = inspect.getattr_static(module, name)
    except AttributeError:
        if name in module._modules or name in module._parameters or name in module._buffers:  # noqa: SLF001
            return None, f"{name} is a submodule, parameter or buffer, not a method"
        return None, ""
    if isinstance(static, nn.Module):
        return None, f"{name} is a submodule, not a method"
    value = getattr(module, name)
    if not callable(value) or isinstance(value, (nn.Module, torch.Tensor)):
        return None, f"{name} is a {type(value).__name__}, not a method"
    try:
        sig = inspect.signature(value)
    except (TypeError, ValueError):
        return None, f"{name}() has no inspectable signature"
    required = [p.name for p in sig.parameters.values()
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        return None, f"{name}() needs arguments ({', '.join(required)})"
    return value, ""


def _visit_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module once (its first dotted name), children before parents; RepBlocks and torch's own module
    classes are left out, and nothing inside a RepBlock is visited."""
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def walk(name: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, RepBlock):
            return
        for attr, child in module._modules.items():  # noqa: SLF001 - named_children() drops repeats
            if child is not None:
                walk(f"{name}.{attr}" if name else attr, child)
        if type(module).__module__.split(".")[0] != "torch":
            order.append((name, module))

    walk("", model)
    return order


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _rel_error(out: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """``max |out - ref| / max |ref|`` over all output tensors (``inf`` on a structure or shape change)."""
    if len(out) != len(ref) or any(o.shape != r.shape for o, r in zip(out, ref)):
        return float("inf")
    if not ref:
        return 0.0
    peak = max(float(r.detach().double().abs().max()) if r.numel() else 0.0 for r in ref)
    diff = 0.0
    for o, r in zip(out, ref):
        if o.numel():
            d = (o.detach().double() - r.detach().double()).abs()
            if not bool(torch.isfinite(d).all()):
                return float("inf")
            diff = max(diff, float(d.max()))
    return diff / (peak if peak > 0 else 1.0)


def _float_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _default_example(model: nn.Module) -> torch.Tensor:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            return torch.rand(1, m.in_channels, 32, 32, generator=torch.Generator().manual_seed(0),
                              dtype=torch.float32).to(device=w.device, dtype=w.dtype)
    raise ValueError("example: the model has no Conv2d to infer a probe input from; "
                     "pass example=<input tensor>")


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    """Same module tree (types), same state_dict (keys and values) and same plain attributes."""
    mods_a, mods_b = list(a.named_modules()), list(b.named_modules())
    if [(n, type(m)) for n, m in mods_a] != [(n, type(m)) for n, m in mods_b]:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape or sa[k].dtype != sb[k].dtype
                                     or not torch.equal(sa[k], sb[k]) for k in sa):
        return False
    plain = (bool, int, float, str, type(None))
    for (_, ma), (_, mb) in zip(mods_a, mods_b):
        da = {k: v for k, v in vars(ma).items() if isinstance(v, plain)}
        db = {k: v for k, v in vars(mb).items() if isinstance(v, plain)}
        if da != db:
            return False
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160]}" if text else type(err).__name__


class _Probe:
    """The model's output on the probe input, before any call: in float64 (on a float64 copy) when the model
    runs in float64, and in the model's own dtype."""

    def __init__(self, model: nn.Module, example: torch.Tensor, rtol: float) -> None:
        self.example, self.rtol = example, rtol
        self.ref = self._run(model)
        self.ref64: list[torch.Tensor] | None = None
        if example.is_floating_point() and example.dtype != torch.float64:
            try:
                self.ref64 = self._run64(model)
            except Exception:  # noqa: BLE001 - a model that cannot run in float64 is checked in its dtype
                self.ref64 = None
        self.dtype = "float64" if self.ref64 is not None else str(example.dtype).replace("torch.", "")

    @torch.no_grad()
    def _run(self, model: nn.Module) -> list[torch.Tensor]:
        return [t.detach().clone() for t in _tensors(model(self.example))]

    @torch.no_grad()
    def _run64(self, model: nn.Module) -> list[torch.Tensor]:
        return _tensors(copy.deepcopy(model).double()(self.example.double()))

    def error(self, model: nn.Module) -> float:
        """The largest relative change of the output (own dtype, and the float64 copy where it still runs in
        float64); raises what the model raises in its own dtype."""
        errors = [_rel_error(self._run(model), self.ref)]
        if self.ref64 is not None:
            try:
                errors.append(_rel_error(self._run64(model), self.ref64))
            except Exception:  # noqa: BLE001 - e.g. a call left float32 tensors in plain attributes
                pass
        return max(errors)


def _place(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every place ``old`` sits in ``model``."""
    for _, parent, attr, child in list(sites(model)):
        if child is old:
            setattr(parent, attr, new)


def fuse_foreign(model: nn.Module, inplace: bool = False, *, example: torch.Tensor | None = None,
                 methods: Sequence[str] = FOREIGN_METHODS, rtol: float = FOREIGN_RTOL
                 ) -> tuple[nn.Module, ForeignReport]:
    """Call the deploy switch of every foreign rep block of ``model``, keeping only exact calls.

    Returns ``(model, report)``: a new model unless ``inplace=True`` (then ``model`` itself, changed), and a
    :class:`ForeignReport` naming the blocks fused and those left unfused with the reason. ``example`` is the
    probe input the outputs are compared on (default: a 1 x C x 32 x 32 tensor in ``[0, 1)`` for the first
    Conv2d's C input channels); ``methods`` the method names tried, in order; ``rtol`` the largest accepted
    change of the output relative to its peak. Modules keep their train/eval flags.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if example is not None and not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a torch.Tensor, got {type(example).__name__}")
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not all(
            isinstance(m, str) and m.isidentifier() for m in methods):
        raise TypeError(f"methods must be a sequence of method names, got {methods!r}")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0:
        raise ValueError(f"rtol must be a number >= 0, got {rtol!r}")
    out = model if inplace else copy.deepcopy(model)
    report = ForeignReport()
    candidates: list[tuple[str, nn.Module, str, Callable[[], Any]]] = []
    for name, module in _visit_order(out):
        for method in methods:
            fn, why = _zero_arg_method(module, method)
            if fn is not None:
                candidates.append((name, module, method, fn))
                break
            if why:
                report.skipped.append(ForeignModule(name, type(module).__name__, method, reason=why))
    if not candidates:
        return out, report
    modes = {name: m.training for name, m in out.named_modules(remove_duplicate=False)}
    out.eval()
    try:
        if example is None:
            example = _default_example(out)
        try:
            probe = _Probe(out, example, float(rtol))
        except Exception as err:  # noqa: BLE001 - the user's forward may raise anything
            raise ValueError(f"example: the model cannot run on the probe input {tuple(example.shape)} "
                             f"({_first_line(err)})") from err
        report.probe_dtype = probe.dtype
        for name, module, method, fn in candidates:
            entry = ForeignModule(name, type(module).__name__, method)
            if not any(m is module for m in out.modules()):
                entry.reason = "no longer part of the model (removed by an earlier call)"
                report.unfused.append(entry)
                continue
            saved = copy.deepcopy(module)
            replaced: nn.Module | None = None
            try:
                with torch.no_grad():
                    returned = fn()
                if isinstance(returned, nn.Module) and returned is not module and module is not out:
                    replaced = returned
                    _place(out, module, returned)
                entry.rel_error = probe.error(out)
            except Exception as err:  # noqa: BLE001 - a foreign method may raise anything
                entry.reason = f"{method}() raised {_first_line(err)}"
            else:
                if not entry.rel_error <= rtol:
                    entry.reason = (f"{method}() changed the model's output by {entry.rel_error:.3g} "
                                    f"relative (> {rtol:g})")
                elif replaced is None and _state_equal(module, saved):
                    entry.reason = f"{method}() left the module unchanged"
            if entry.reason:
                if replaced is not None:
                    _place(out, replaced, module)
                module.__dict__.clear()
                module.__dict__.update(saved.__dict__)
                report.unfused.append(entry)
            else:
                report.fused.append(entry)
    finally:  # every module back to its own flag; modules a call created follow the model's
        for name, m in out.named_modules(remove_duplicate=False):
            m.training = modes.get(name, modes[""])
    return out, report
