"""Model-level walkers: ``fuse_all``, ``set_mode``, ``repify`` and the block registry."""
from __future__ import annotations

import copy
import fnmatch
import warnings
from typing import Any, Callable, Iterable

from torch import nn

from .base import FuseModeWarning, RepBlock
from .utils.modules import outermost
from .utils.modules import sites as module_sites

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


def _not_block(m: nn.Module) -> bool:
    return not isinstance(m, RepBlock)  # a block's internals are the block's business


def rep_blocks(model: nn.Module, remove_duplicate: bool = True) -> Iterable[tuple[str, RepBlock]]:
    """The outermost RepBlocks of ``model`` with their dotted names.

    A block registered at several places is listed once (at its first name) unless ``remove_duplicate=False``.
    """
    return outermost(model, lambda m: isinstance(m, RepBlock), duplicates=not remove_duplicate)


def fuse_all(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every RepBlock replaced by its ``fuse()`` (plain convs).

    Returns a new model unless ``inplace=True``; idempotent (a fused model has no RepBlocks left). A block
    registered at several places (weight sharing) is fused once and the one fused conv is put at every
    place, so the result shares it just as the model shared the block. Fusion folds BatchNorm with its
    running statistics, i.e. it equals the *eval-mode* block: one :class:`~reparam.base.FuseModeWarning`
    is raised when BN blocks in training mode are fused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, RepBlock):
        return model.fuse()
    out = model if inplace else copy.deepcopy(model)
    sites = [(parent, attr, child) for _, parent, attr, child in module_sites(out, descend=_not_block)
             if isinstance(child, RepBlock)]
    if any(b.training and b.has_batchnorm() for _, _, b in sites):
        warnings.warn(
            "fuse_all: fusing BatchNorm blocks while the model is in training mode; the fused convs use the BN "
            "running statistics, i.e. they equal the model in eval mode (call model.eval() first to silence this)",
            FuseModeWarning, stacklevel=2,
        )
    fused: dict[int, nn.Module] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FuseModeWarning)  # warned once above
        for parent, attr, block in sites:
            if id(block) not in fused:
                fused[id(block)] = block.fuse()
            setattr(parent, attr, fused[id(block)])  # works for Sequential/ModuleList/ModuleDict children too
    return out


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set ``mode`` (``"branches"`` or ``"online"``) on every RepBlock of ``model`` (in place); returns it.

    Every block is checked first: if one cannot take ``mode`` (e.g. ``"online"`` with BatchNorm), a
    ``ValueError`` naming it is raised and no block is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, RepBlock)]
    for name, m in blocks:
        try:
            m.check_mode(mode)
        except ValueError as err:
            raise ValueError(f"{name or type(m).__name__}: {err} (no block was changed)") from None
    for _, m in blocks:
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
    A conv registered at several places (weight sharing) becomes one block registered at all of them
    (it is selected when any of its names is); RepBlocks already in ``model`` are left as they are.
    Returns a new model unless ``inplace=True``.
    """
    cls = get_block(block)
    select = name_selector(include, "include")
    explicit = include is not None
    out = model if inplace else copy.deepcopy(model)
    places: dict[int, tuple[nn.Conv2d, list[tuple[str, nn.Module, str]]]] = {}
    for name, parent, attr, child in module_sites(out, descend=_not_block):
        if type(child) is nn.Conv2d:
            places.setdefault(id(child), (child, []))[1].append((name, parent, attr))
    for conv, where in places.values():
        names = [n for n, _, _ in where]
        if not any(select(n, conv) for n in names):
            continue
        try:
            new = cls.from_conv(conv, **options)
        except (ValueError, TypeError) as err:
            if explicit:
                raise ValueError(f"include: layer {names[0]!r} cannot become {cls.__name__}: {err}") from err
            continue
        for _, parent, attr in where:  # a conv used at several places becomes one block used there
            setattr(parent, attr, new)
    return out
