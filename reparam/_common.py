"""Helpers shared by the branch blocks: cropping the once-padded input, option checks, and the
parameter surgery behind ``load_kernel`` (no fusion math lives here; that is :mod:`reparam.kernels`)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .utils.validate import check_bool  # noqa: F401 - re-exported for the blocks
from . import kernels as K
from .base import Branch, ChannelVector, ConvBN, RepBlock

__all__ = ["crop", "check_bool", "resolve_identity", "load_exact", "load_declared", "silence", "silence_bn",
           "switch_off", "unit_bn"]


def crop(x: Tensor, ph: int, pw: int) -> Tensor:
    """``x`` with ``ph`` rows removed at top and bottom and ``pw`` columns at left and right.

    A branch with a smaller (or 1 x k / k x 1) kernel runs unpadded on the block's padded input
    cropped by the difference of the "same" paddings, which equals running it on the input padded
    with its own "same" padding, for every padding mode.
    """
    if ph == 0 and pw == 0:
        return x
    return x[..., ph:x.shape[-2] - ph, pw:x.shape[-1] - pw]


def resolve_identity(name: str, value: bool | None, in_channels: int, out_channels: int, stride: int) -> bool:
    """The one meaning of every block's ``use_identity`` option.

    ``None``: an identity branch whenever it exists (``in == out`` and stride 1); ``True``: required
    (``ValueError`` otherwise); ``False``: none. Anything else is a ``TypeError`` naming ``name``.
    """
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None, True or False, got {value!r}")
    possible = in_channels == out_channels and stride == 1
    if value is None:
        return possible
    if value and not possible:
        raise ValueError(
            f"{name}=True needs in_channels == out_channels and stride == 1 "
            f"(got {in_channels}->{out_channels}, stride={stride})"
        )
    return value


def unit_bn(bn: _BatchNorm, beta: Tensor) -> None:
    """Make an eval-mode ``bn`` compute exactly ``y = x + beta``.

    ``running_mean = 0``, ``gamma = 1`` and ``running_var`` set to the float next to ``1 - eps`` for which
    ``running_var + eps == 1`` exactly in the buffer dtype, so folding multiplies by exactly one.
    """
    eps = bn.eps
    var = torch.full_like(bn.running_var, 1.0 - eps)
    for _ in range(16):
        s = var + eps
        if bool((s == 1).all()):
            break
        var = torch.where(s > 1, torch.nextafter(var, var.new_tensor(-math.inf)),
                          torch.where(s < 1, torch.nextafter(var, var.new_tensor(math.inf)), var))
    bn.running_mean.zero_()
    bn.running_var.copy_(var)
    if bn.weight is not None:
        bn.weight.fill_(1.0)
    if bn.bias is not None:
        bn.bias.copy_(beta)
    elif bool((beta != 0).any()):
        raise ValueError("bias: this BatchNorm has no affine bias to carry a non-zero conv bias")


def load_exact(unit: ConvBN, weight: Tensor, bias: Tensor | None) -> None:
    """Set ``unit`` (conv + optional BN) so that in eval mode it computes exactly ``conv(weight, bias)``."""
    bias = K.bias_or_zeros(weight, bias)
    unit.conv.weight.copy_(weight)
    if unit.bn is not None:
        unit_bn(unit.bn, bias)
    elif unit.conv.bias is not None:
        unit.conv.bias.copy_(bias)
    elif bool((bias != 0).any()):
        raise ValueError("bias: the block was built with bias=False and no BatchNorm, cannot load a non-zero bias")


def silence_bn(bn: _BatchNorm) -> None:
    """Make a BN output exactly zero (gamma = beta = 0), whatever its input."""
    if bn.weight is None or bn.bias is None:
        raise ValueError("bn: cannot silence a BatchNorm without affine parameters")
    bn.weight.zero_()
    bn.bias.zero_()


def silence(unit: ConvBN | nn.Module) -> None:
    """Make a branch's output exactly zero: BN gamma = beta = 0, or conv weight = bias = 0 without BN."""
    if isinstance(unit, _BatchNorm):
        silence_bn(unit)
        return
    if not isinstance(unit, ConvBN):
        raise TypeError(f"unit must be a ConvBN or a BatchNorm, got {type(unit).__name__}")
    if unit.bn is not None:
        silence_bn(unit.bn)
    else:
        unit.conv.weight.zero_()
        if unit.conv.bias is not None:
            unit.conv.bias.zero_()


def switch_off(branch: Branch) -> None:
    """Make ``branch`` output exactly zero, whatever its input.

    A BatchNorm in its tail gets ``gamma = beta = 0``; otherwise its last conv is silenced (:func:`silence`)
    and its shift vectors are zeroed (scale vectors are kept, so the branch trains again as soon as the
    conv moves).
    """
    bns = [u for u in branch.tail if isinstance(u, _BatchNorm)]
    if bns:
        silence_bn(bns[-1])
        return
    if branch.is_identity:
        raise ValueError(f"branch {branch.name!r}: a fixed identity path cannot be switched off")
    silence(branch.convs[-1])
    for u in branch.tail:
        if isinstance(u, ChannelVector) and u.neutral == 0.0:
            u.param.zero_()


def load_declared(block: RepBlock, weight: Tensor, bias: Tensor | None) -> None:
    """``load_kernel`` derived from ``block.branches()``: the target (minus every fixed identity path) in the
    ``main`` branch's single conv, its tail vectors set to their neutral value, every other branch off."""
    branches = block.branches()
    main = [b for b in branches if b.main]
    if len(main) != 1 or len(main[0].convs) != 1 or any(isinstance(u, _BatchNorm) for u in main[0].tail):
        raise TypeError(f"{type(block).__name__}.branches() must declare exactly one main branch with one conv "
                        "and no BatchNorm after it")
    fixed = sum(1 for b in branches if b.is_identity and not b.units)
    if fixed:
        weight = K.subtract_identity(weight, block.groups, times=fixed)
    load_exact(main[0].convs[0], weight, bias)
    for u in main[0].tail:
        if isinstance(u, ChannelVector):
            u.param.fill_(u.neutral)
    for b in branches:
        if not b.main and b.units:
            switch_off(b)
