"""Channel slicers for training-form re-parameterization blocks (``reparam.RepBlock``).

A rep block is pruned as **one unit**: removing output channel ``j`` removes filter ``j`` from every
branch that writes the block output (and the per-channel scales/biases that go with it); removing
input channel ``i`` removes it from every branch that reads the block input. Internal expanded widths
are kept, except where the block ties them to its channel count (RRRB's ``ratio * C``). After slicing,
the block is a valid block of the same class, so ``reparam.fuse_all`` still fuses it exactly.

Blocks with an identity path (``RRRB``, ``ERB``, ``ECB(with_idt=True)``) are *coupled*: their input
and output channels are the same channels and are always pruned together.

Register slicers for further block classes with :func:`register_rep_block`; a RepBlock class without a
slicer is left alone by the pruner (and every group touching it is reported as locked).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

import reparam
from reparam import ECB, ERB, RRRB, ConvBN, RepBlock

__all__ = ["RepSlicer", "register_rep_block", "get_slicer", "branch_slicer", "slice_conv", "slice_convbn",
           "slice_param"]


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
    """The registered slicer of a block (exact class match), or None."""
    cls = block_or_cls if isinstance(block_or_cls, type) else type(block_or_cls)
    return _SLICERS.get(cls)


def _check_dense(block: RepBlock) -> None:
    if block.groups != 1:
        raise ValueError(f"{type(block).__name__} with groups={block.groups}: only groups=1 rep blocks can be pruned")


# ---------------------------------------------------------------------------------------------- ECB
def _prune_ecb(block: ECB, out_idxs: list[int] | None, in_idxs: list[int] | None) -> None:
    _check_dense(block)
    out_keep = None if out_idxs is None else _keep(block.out_channels, out_idxs)
    in_keep = None if in_idxs is None else _keep(block.in_channels, in_idxs)
    slice_convbn(block.conv_kxk, out_keep, in_keep)
    slice_convbn(block.expand, None, in_keep)           # expanded width stays
    slice_convbn(block.expand_kxk, out_keep, None)
    for e in block.edges:
        slice_convbn(block.edge_1x1[e], out_keep, in_keep)
        if out_keep is not None:
            slice_param(block.edge_scale, e, out_keep)
            if block.bias:
                slice_param(block.edge_bias, e, out_keep)
    if out_keep is not None:
        block.out_channels = len(out_keep)
    if in_keep is not None:
        block.in_channels = len(in_keep)


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


# ------------------------------------------------------------------------- branch-structured blocks
def _units(block: nn.Module, attrs: Sequence[str]) -> list[nn.Module]:
    out: list[nn.Module] = []
    for a in attrs:
        m = getattr(block, a, None)
        if m is None:
            continue
        out.extend(m if isinstance(m, (nn.ModuleList, list, tuple)) else [m])
    return out


def branch_slicer(full: Sequence[str] = (), in_only: Sequence[str] = (), out_only: Sequence[str] = (),
                  out_modules: Sequence[str] = (), out_params: Sequence[str] = (),
                  then: Callable[[RepBlock, list[int] | None, list[int] | None], None] | None = None,
                  ) -> Callable[[RepBlock, list[int] | None, list[int] | None], None]:
    """A slicer for blocks made of ConvBN branches, by attribute name: ``full`` branches map block input
    to block output (sliced on both sides), ``in_only`` read the input into an internal width,
    ``out_only`` write the output from an internal width, ``out_modules`` are per-output-channel
    BatchNorms (``nn.Identity``/None are skipped), ``out_params`` are ``ParameterDict`` of per-output
    -channel vectors. ``then`` runs afterwards (for subclasses adding branches)."""

    def prune_fn(block: RepBlock, out_idxs: list[int] | None, in_idxs: list[int] | None) -> None:
        _check_dense(block)
        out_keep = None if out_idxs is None else _keep(block.out_channels, out_idxs)
        in_keep = None if in_idxs is None else _keep(block.in_channels, in_idxs)
        for u in _units(block, full):
            slice_convbn(u, out_keep, in_keep)
        for u in _units(block, in_only):
            slice_convbn(u, None, in_keep)
        for u in _units(block, out_only):
            slice_convbn(u, out_keep, None)
        if out_keep is not None:
            for u in _units(block, out_modules):
                if isinstance(u, nn.modules.batchnorm._BatchNorm):
                    _slice_bn(u, out_keep)
            for a in out_params:
                pd = getattr(block, a)
                for key in list(pd.keys()):
                    slice_param(pd, key, out_keep)
        if then is not None:
            then(block, out_idxs, in_idxs)
        if out_keep is not None:
            block.out_channels = len(out_keep)
        if in_keep is not None:
            block.in_channels = len(in_keep)

    return prune_fn


def _has_identity(block: RepBlock) -> bool:
    return getattr(block, "identity", None) is not None or bool(getattr(block, "with_idt", False))


register_rep_block(ECB, _prune_ecb, coupled=lambda b: bool(b.with_idt))
_OPTIONAL = {
    "RepVGGBlock": dict(full=("conv_kxk", "conv_1x1"), out_modules=("identity",)),
    "ACB": dict(full=("square", "hor", "ver")),
    "RepLKConv": dict(full=("large", "small")),
    "MobileOneBlock": dict(full=("conv_kxk", "conv_scale"), out_modules=("identity",)),
    "DBB": dict(full=("conv_kxk", "conv_1x1", "avg_1x1"), in_only=("seq_1x1",), out_only=("seq_kxk",),
                out_modules=("avg_bn",)),
    "RepConv": dict(full=("conv_kxk", "conv_1x1", "avg_1x1"), in_only=("seq_1x1",), out_only=("seq_kxk",),
                    out_params=("scales",)),
}
for _name, _spec in _OPTIONAL.items():
    _cls = getattr(reparam, _name, None)
    if isinstance(_cls, type) and issubclass(_cls, RepBlock):
        register_rep_block(_cls, branch_slicer(**_spec), coupled=_has_identity)
if isinstance(getattr(reparam, "EDBB", None), type):
    def _prune_edbb(block: RepBlock, out_idxs: list[int] | None, in_idxs: list[int] | None) -> None:
        out_keep = None if out_idxs is None else _keep(block.out_channels, out_idxs)
        in_keep = None if in_idxs is None else _keep(block.in_channels, in_idxs)
        slice_convbn(block.conv_1x1, out_keep, in_keep)
        _prune_ecb(block, out_idxs, in_idxs)

    register_rep_block(reparam.EDBB, _prune_edbb, coupled=_has_identity)
register_rep_block(RRRB, _prune_rrrb, coupled=True)
register_rep_block(ERB, _prune_erb, coupled=True)
