"""``conv=``: building a network's 3x3 convs as re-parameterizable blocks.

A *slot* is every plain ``nn.Conv2d`` of a network with a 3x3 kernel, stride 1, padding 1, no dilation and
no groups -- all 3x3 convs of the deploy form except the stride-2 ``conv2`` inside ESA, which stays plain.
:func:`apply_conv` swaps the selected slots for freshly initialised blocks at the same attribute, so the
block's fused conv (``reparam.fuse_all``) lands on the deploy key names.

Spec forms (``spec`` below):

* ``"conv"`` (or ``None``/``"plain"``): plain convs;
* a block name known to :func:`reparam.get_block` (``"ecb"``, ``"rrrb"``, ...) or a ``RepBlock`` subclass;
* a dict ``{"block": <name or class>, "include": <fnmatch pattern(s)>, **block_options}``: ``include``
  (optional) selects slots by dotted module name (e.g. ``"B*.c?_r"``); the other keys go to the block
  constructor (``Block(in, out, kernel_size=3, bias=True, **block_options)``).

Blocks that need ``in_channels == out_channels`` (RRRB) are only placed on slots with equal widths
(e.g. not on RFDN's ``fea_conv`` 3->50, ``c4`` 50->25 or ``upsampler.0`` 50->48); the other slots stay
plain convs, silently -- this is FMEN's training recipe, where head/squeeze/excitate/tail stay plain.
:func:`conv_slots` lists what each slot became.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Iterable

from torch import nn

import reparam
from reparam import RepBlock
from reparam.utils.modules import named_modules, outermost, replace_module

__all__ = ["normalize_conv", "apply_conv", "conv_slots", "is_slot"]

PLAIN = ("conv", "plain")


def is_slot(m: nn.Module) -> bool:
    """Whether ``m`` is a plain 3x3 / stride 1 / padding 1 conv that ``conv=`` may replace."""
    return (
        type(m) is nn.Conv2d
        and m.kernel_size == (3, 3)
        and m.stride == (1, 1)
        and m.padding == (1, 1)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
    )


def _block_class(block: Any) -> type[RepBlock]:
    try:
        cls = reparam.get_block(block)
    except ValueError as err:
        raise ValueError(f"conv: {err}; or 'conv' for plain convs") from None
    except TypeError as err:
        raise TypeError(f"conv: {err}") from None
    try:  # ERB-like blocks replace a conv-act-conv pair and cannot sit in a single-conv slot
        cls.check_convertible(nn.Conv2d(4, 4, 3, padding=1))
    except TypeError as err:
        raise ValueError(f"conv: block {cls.__name__} cannot stand in for a single 3x3 conv ({err})") from None
    except ValueError:
        pass
    return cls


def _patterns(include: Any) -> list[str] | None:
    if include is None:
        return None
    pats = [include] if isinstance(include, str) else include
    if not isinstance(pats, (list, tuple)) or not all(isinstance(p, str) for p in pats) or not pats:
        raise TypeError("conv: 'include' must be a name pattern or a non-empty list of name patterns")
    return list(pats)


def normalize_conv(spec: Any) -> str | dict[str, Any]:
    """Validate ``spec`` and return its canonical form (``"conv"``, a block name, or a dict with ``block``)."""
    if spec is None:
        return "conv"
    if isinstance(spec, str):
        if spec.lower() in PLAIN:
            return "conv"
        return _block_class(spec).name or spec.lower()
    if isinstance(spec, type):
        cls = _block_class(spec)
        return cls.name if cls.name and reparam.BLOCKS.get(cls.name) is cls else cls  # type: ignore[return-value]
    if isinstance(spec, dict):
        if "block" not in spec:
            raise ValueError(f"conv: a dict spec needs a 'block' key (e.g. {{'block': 'ecb'}}), got keys "
                             f"{sorted(spec)}")
        out = dict(spec)
        block = normalize_conv(out["block"])
        if block == "conv":
            if len(out) > 1:
                raise ValueError(f"conv: block 'conv' (plain) takes no options, got "
                                 f"{sorted(k for k in out if k != 'block')}")
            return "conv"
        out["block"] = block
        if "include" in out:
            out["include"] = _patterns(out["include"])
        return out
    raise TypeError(f"conv must be 'conv', a block name, a RepBlock class or a dict, got {type(spec).__name__}")


def _split(spec: str | dict[str, Any] | type) -> tuple[type[RepBlock] | None, list[str] | None, dict[str, Any]]:
    if spec == "conv":
        return None, None, {}
    if isinstance(spec, dict):
        options = {k: v for k, v in spec.items() if k not in ("block", "include")}
        return _block_class(spec["block"]), spec.get("include"), options
    return _block_class(spec), None, {}


def conv_slots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) of every conv slot of ``model``: plain slot convs and rep blocks (not the convs
    inside a block); a slot used at several places is listed under each name."""
    return [(n, m) for n, m in outermost(model, lambda m: is_slot(m) or isinstance(m, RepBlock)) if n]


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _targets(model: nn.Module, cls: type[RepBlock], include: list[str] | None) -> list[tuple[str, nn.Conv2d]]:
    """The slots of plain ``model`` that ``cls`` fills under ``include`` (raises if ``include`` matches none)."""
    slots = [(n, m) for n, m in named_modules(model) if is_slot(m)]  # every place of a shared conv
    chosen = [(n, m) for n, m in slots if _matches(n, include)]
    if not chosen:
        raise ValueError(f"conv: 'include' {include} matches none of the 3x3 convs: {[n for n, _ in slots]}")
    # e.g. RRRB on a conv that changes the width: stays a plain conv
    return [(n, m) for n, m in chosen if cls.allows_in_ne_out or m.in_channels == m.out_channels]


def _make(cls: type[RepBlock], conv: nn.Conv2d, options: dict[str, Any], pretrained: bool) -> RepBlock:
    try:
        if pretrained:
            return cls.from_conv(conv, **options)
        return cls(conv.in_channels, conv.out_channels, kernel_size=3, bias=conv.bias is not None, **options)
    except TypeError as err:
        raise TypeError(f"conv: bad options {sorted(options)} for {cls.__name__}: {err}") from None
    except ValueError as err:
        raise ValueError(f"conv: {cls.__name__} with options {options}: {err}") from None


def apply_conv(model: nn.Module, spec: str | dict[str, Any] | type, pretrained: bool = False) -> nn.Module:
    """Replace the selected 3x3 slots of a plain ``model`` by blocks (in place); returns it.

    ``pretrained=False``: freshly initialised blocks (what :func:`effsr.models.build` does).
    ``pretrained=True``: each block is ``Block.from_conv(conv)``, computing exactly the conv it replaces
    (used by :func:`effsr.models.load` to put deploy-form weights into a training form).
    """
    cls, include, options = _split(spec)
    if cls is None:
        return model
    made: dict[int, RepBlock] = {}  # a conv used at several places becomes one block used at those places
    for name, conv in _targets(model, cls, include):
        if id(conv) not in made:
            made[id(conv)] = _make(cls, conv, options, pretrained)
        replace_module(model, name, made[id(conv)])
    return model
