"""Model-level walkers: ``fuse_all``, ``set_mode``, ``repify`` and the block registry."""
from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Any, Callable, Iterable

from torch import nn

from .base import RepBlock

__all__ = ["BLOCKS", "get_block", "fuse_all", "set_mode", "repify", "rep_blocks", "name_selector", "Selector"]

#: Registry of block types by name (filled by ``reparam/__init__``).
BLOCKS: dict[str, type[RepBlock]] = {}


def register(cls: type[RepBlock]) -> type[RepBlock]:
    BLOCKS[cls.name] = cls
    return cls


def get_block(block: str | type[RepBlock]) -> type[RepBlock]:
    """A block class from its registry name (``"ecb"``, ``"rrrb"``, ...) or the class itself."""
    if isinstance(block, type) and issubclass(block, RepBlock):
        return block
    if isinstance(block, str):
        key = block.lower()
        if key in BLOCKS:
            return BLOCKS[key]
        raise ValueError(f"block: unknown block {block!r}; choose from {sorted(BLOCKS)}")
    raise TypeError(f"block must be a RepBlock subclass or a name, got {type(block).__name__}")


def rep_blocks(model: nn.Module) -> Iterable[tuple[str, RepBlock]]:
    """The outermost RepBlocks of ``model`` with their dotted names."""
    def walk(m: nn.Module, prefix: str):
        for name, child in m.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, RepBlock):
                yield full, child
            else:
                yield from walk(child, full)
    if isinstance(model, RepBlock):
        yield "", model
    else:
        yield from walk(model, "")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)  # works for Sequential/ModuleList/ModuleDict children too


def fuse_all(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every RepBlock replaced by its ``fuse()`` (plain convs).

    Returns a new model unless ``inplace=True``; idempotent (a fused model has no RepBlocks left).
    Fusion folds BatchNorm with its running statistics, i.e. it equals the *eval-mode* block: a warning
    is raised when BN blocks are fused while the model is in training mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    blocks = list(rep_blocks(model))
    if model.training and any(b.has_batchnorm() for _, b in blocks):
        warnings.warn(
            "fuse_all: fusing BatchNorm blocks while the model is in training mode; the fused convs use the BN "
            "running statistics, i.e. they equal the model in eval mode (call model.eval() first to silence this)",
            stacklevel=2,
        )
    if isinstance(model, RepBlock):
        return model.fuse()
    out = model if inplace else copy.deepcopy(model)
    for name, _ in blocks:
        _replace(out, name, out.get_submodule(name).fuse())
    return out


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set ``mode`` (``"branches"`` or ``"online"``) on every RepBlock of ``model`` (in place); returns it."""
    for m in model.modules():
        if isinstance(m, RepBlock):
            m.set_mode(mode)
    return model


Selector = None | str | Iterable[str] | Callable[[str, nn.Module], bool]


def name_selector(spec: Selector, arg: str = "include", default: bool = True) -> Callable[[str, nn.Module], bool]:
    """A ``(name, module) -> bool`` predicate from fnmatch name patterns, a callable, or None (``default``)."""
    if spec is None:
        return lambda name, m: default
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{arg} must be None, a name pattern, a list of name patterns, or a callable(name, module)")
    return lambda name, m: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def repify(
    model: nn.Module,
    block: str | type[RepBlock],
    include: None | str | Iterable[str] | Callable[[str, nn.Module], bool] = None,
    inplace: bool = False,
    **options: Any,
) -> nn.Module:
    """Replace plain ``nn.Conv2d`` layers that ``block`` can represent by blocks computing the same function.

    A pretrained plain network can then be fine-tuned over-parameterized and fused back with
    :func:`fuse_all`. ``include`` selects convs by dotted name (fnmatch patterns) or a callable; convs
    the block cannot represent are left alone when ``include`` is None, and raise ``ValueError``
    (naming the layer) when ``include`` named them explicitly. ``options`` go to the block constructor.
    Returns a new model unless ``inplace=True``.
    """
    cls = get_block(block)
    select = name_selector(include, "include")
    explicit = include is not None
    out = model if inplace else copy.deepcopy(model)
    targets = [(n, m) for n, m in out.named_modules() if type(m) is nn.Conv2d and n and select(n, m)]
    for name, conv in targets:
        try:
            new = cls.from_conv(conv, **options)
        except (ValueError, TypeError) as err:
            if explicit:
                raise ValueError(f"include: layer {name!r} cannot become {cls.__name__}: {err}") from err
            continue
        _replace(out, name, new)
    return out
