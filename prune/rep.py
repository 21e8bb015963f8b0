"""Channel slicers for training-form re-parameterization blocks (``reparam.RepBlock``).

A rep block is pruned as **one unit**: removing output channel ``j`` removes filter ``j`` from every
branch that writes the block output (and the per-channel scales/biases that go with it); removing
input channel ``i`` removes it from every branch that reads the block input. Internal expanded widths
are kept, except where the block ties them to its channel count (RRRB's ``ratio * C``). After slicing,
the block is a valid block of the same class, so ``reparam.fuse_all`` still fuses it exactly.

Blocks with an identity path (``RRRB``, ``ERB``, ``ECB(use_identity=True)``, ...) are *coupled*: their
input and output channels are the same channels and are always pruned together.

Every block that declares its branches (``RepBlock.branches()``: ECB, EDBB, DBB, ACB, RepVGG, MobileOne,
RepConv, RepLK, and user blocks that do the same) is sliced by :func:`branch_slicer`, derived from that
declaration -- no branch is named here. RRRB/ERB (nested residuals tying the expanded width to ``C``)
have their own slicers. Register slicers for further block classes with :func:`register_rep_block`; a
RepBlock class with neither is left alone by the pruner (and every group touching it is reported as locked).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from reparam import ERB, RRRB, ChannelVector, ConvBN, RepBlock

__all__ = ["RepSlicer", "register_rep_block", "get_slicer", "branch_slicer", "declares_branches", "slice_conv",
           "slice_convbn", "slice_param"]


def _keep(n: int, drop: Sequence[int]) -> list[int]:
    d = set(int(i) for i in drop)
    return [i for i in range(n) if i not in d]


def slice_conv(conv: nn.Conv2d, out_keep: list[int] | None = None, in_keep: list[int] | None = None) -> None:
    """Keep only ``out_keep`` filters / ``in_keep`` input channels of a dense (groups=1) conv, in place."""
    if conv.groups != 1:
        raise ValueError(f"slice_conv: grouped convs (groups={conv.groups}) inside rep blocks cannot be sliced")
    w = conv.weight.data
    if out_keep is not None:
        w = w[out_keep]
        conv.out_channels = len(out_keep)
        if conv.bias is not None:
            conv.bias = nn.Parameter(conv.bias.data[out_keep].clone(), requires_grad=conv.bias.requires_grad)
    if in_keep is not None:
        w = w[:, in_keep]
        conv.in_channels = len(in_keep)
    conv.weight = nn.Parameter(w.clone(), requires_grad=conv.weight.requires_grad)


def _slice_bn(bn: nn.modules.batchnorm._BatchNorm, keep: list[int]) -> None:
    bn.num_features = len(keep)
    if bn.affine:
        bn.weight = nn.Parameter(bn.weight.data[keep].clone(), requires_grad=bn.weight.requires_grad)
        bn.bias = nn.Parameter(bn.bias.data[keep].clone(), requires_grad=bn.bias.requires_grad)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()


def slice_convbn(branch: ConvBN, out_keep: list[int] | None = None, in_keep: list[int] | None = None) -> None:
    """Slice a ``reparam.ConvBN`` branch (its conv and, for outputs, its BatchNorm), in place."""
    slice_conv(branch.conv, out_keep, in_keep)
    if out_keep is not None and branch.bn is not None:
        _slice_bn(branch.bn, out_keep)


def slice_param(container: nn.ParameterDict, key: str, keep: list[int]) -> None:
    """Replace ``container[key]`` by its rows ``keep`` (a new ``nn.Parameter``)."""
    p = container[key]
    container[key] = nn.Parameter(p.data[keep].clone(), requires_grad=p.requires_grad)


@dataclass(frozen=True)
class RepSlicer:
    """How to prune one RepBlock class.

    ``prune(block, out_idxs, in_idxs)`` removes the given output / input channel indices (either may be
    None) in place and updates ``block.in_channels`` / ``block.out_channels``.
    ``coupled(block)`` is True when input and output channels must be pruned together (identity path);
    the pruner then always calls ``prune`` with ``out_idxs == in_idxs``.
    """

    prune: Callable[[RepBlock, list[int] | None, list[int] | None], None]
    coupled: Callable[[RepBlock], bool]


_SLICERS: dict[type, RepSlicer] = {}


def register_rep_block(cls: type[RepBlock], prune: Callable[[RepBlock, list[int] | None, list[int] | None], None],
                       coupled: Callable[[RepBlock], bool] | bool = False) -> None:
    """Teach the pruner how to slice the RepBlock class ``cls`` (exact class, not its subclasses)."""
    if not (isinstance(cls, type) and issubclass(cls, RepBlock)):
        raise TypeError(f"cls must be a reparam.RepBlock subclass, got {cls!r}")
    if not callable(prune):
        raise TypeError("prune must be callable (block, out_idxs, in_idxs) -> None")
    if isinstance(coupled, bool):
        flag = coupled
        coupled = lambda block: flag  # noqa: E731
    if not callable(coupled):
        raise TypeError("coupled must be a bool or a callable (block) -> bool")
    _SLICERS[cls] = RepSlicer(prune=prune, coupled=coupled)


def get_slicer(block_or_cls: RepBlock | type) -> RepSlicer | None:
    """The slicer of a block: the one registered for its exact class, else the one derived from its own
    branch declaration (:func:`branch_slicer`), else None (the pruner leaves the block alone)."""
    cls = block_or_cls if isinstance(block_or_cls, type) else type(block_or_cls)
    if cls in _SLICERS:
        return _SLICERS[cls]
    return _DECLARED if declares_branches(cls) else None


def _check_dense(block: RepBlock) -> None:
    if block.groups != 1:
        raise ValueError(f"{type(block).__name__} with groups={block.groups}: only groups=1 rep blocks can be pruned")


# --------------------------------------------------------------------------------------- RRRB / ERB
def _prune_rrrb(block: RRRB, out_idxs: list[int] | None, in_idxs: list[int] | None) -> None:
    """RRRB is coupled (outer residual). Its expanded width is ``ratio * C`` by construction (its fused
    kernel adds a ``ratio * C`` identity), so removing ``n`` channels also removes ``ratio * n``
    expanded channels: those with the smallest ``||expand filter|| * ||reduce column||``."""
    _check_dense(block)
    idxs = out_idxs if out_idxs is not None else in_idxs
    if idxs is None:
        return
    if out_idxs is not None and in_idxs is not None and sorted(out_idxs) != sorted(in_idxs):
        raise ValueError("RRRB: input and output channels are coupled and must be pruned with the same indices")
    keep = _keep(block.in_channels, idxs)
    n_drop = block.in_channels - len(keep)
    rc = block.expand.conv.out_channels
    with torch.no_grad():
        score = (block.expand.conv.weight.flatten(1).norm(dim=1)
                 * block.reduce.conv.weight.transpose(0, 1).flatten(1).norm(dim=1))
        drop_mid = torch.argsort(score, stable=True)[: n_drop * block.ratio].tolist()
    mid_keep = _keep(rc, drop_mid)
    slice_convbn(block.expand, mid_keep, keep)
    slice_convbn(block.fea, mid_keep, mid_keep)
    slice_convbn(block.reduce, keep, mid_keep)
    block.in_channels = block.out_channels = len(keep)


def _prune_erb(block: ERB, out_idxs: list[int] | None, in_idxs: list[int] | None) -> None:
    idxs = out_idxs if out_idxs is not None else in_idxs
    if idxs is None:
        return
    _prune_rrrb(block.rrrb1, idxs, idxs)
    _prune_rrrb(block.rrrb2, idxs, idxs)
    block.in_channels = block.out_channels = block.rrrb1.out_channels


# ------------------------------------------------------------------------- blocks declaring branches
def _declared_params(block: RepBlock) -> set[int]:
    return {id(p) for br in block.branches() for p in br.parameters()}


def branch_slicer(block: RepBlock, out_idxs: list[int] | None, in_idxs: list[int] | None) -> None:
    """The slicer of every block that declares its branches (``RepBlock.branches()``), derived from that
    declaration: along each branch the first conv loses the pruned input channels, the last conv the
    pruned output channels, and the branch's per-output-channel tail (BatchNorm, scale/shift vectors) the
    pruned outputs. Internal widths (an expand or 1x1 -> k x k branch's middle) are kept.

    Raises ``ValueError`` if the declaration misses a parameter of the block (it would go stale)."""
    _check_dense(block)
    missing = [n for n, p in block.named_parameters() if id(p) not in _declared_params(block)]
    if missing:
        raise ValueError(f"{type(block).__name__}.branches() does not declare {missing}: cannot slice it")
    out_keep = None if out_idxs is None else _keep(block.out_channels, out_idxs)
    in_keep = None if in_idxs is None else _keep(block.in_channels, in_idxs)
    for br in block.branches():
        convs = br.convs
        for i, unit in enumerate(convs):
            slice_convbn(unit, out_keep if i == len(convs) - 1 else None, in_keep if i == 0 else None)
        if out_keep is None:
            continue
        for unit in br.tail:
            if isinstance(unit, ChannelVector):
                slice_param(unit.container, unit.key, out_keep)
            elif isinstance(unit, nn.modules.batchnorm._BatchNorm):
                _slice_bn(unit, out_keep)
    if out_keep is not None:
        block.out_channels = len(out_keep)
    if in_keep is not None:
        block.in_channels = len(in_keep)


def _has_identity_path(block: RepBlock) -> bool:
    return any(br.is_identity for br in block.branches())


def declares_branches(cls: type) -> bool:
    """Whether ``cls`` itself (not only a base class) declares its branches: a subclass that adds modules
    without re-declaring would be sliced incompletely, so it is left to an explicit registration."""
    return isinstance(cls, type) and issubclass(cls, RepBlock) and "branches" in vars(cls)


_DECLARED = RepSlicer(prune=branch_slicer, coupled=_has_identity_path)

register_rep_block(RRRB, _prune_rrrb, coupled=True)
register_rep_block(ERB, _prune_erb, coupled=True)
