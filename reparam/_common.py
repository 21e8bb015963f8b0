"""Helpers shared by the branch blocks: cropping the once-padded input, option checks, and the
parameter surgery behind ``load_kernel`` (no fusion math lives here; that is :mod:`reparam.kernels`)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import kernels as K
from .base import ConvBN

__all__ = ["crop", "check_bool", "resolve_identity", "load_exact", "silence", "silence_bn", "unit_bn"]


def crop(x: Tensor, ph: int, pw: int) -> Tensor:
    """``x`` with ``ph`` rows removed at top and bottom and ``pw`` columns at left and right.

    A branch with a smaller (or 1 x k / k x 1) kernel runs unpadded on the block's padded input
    cropped by the difference of the "same" paddings, which equals running it on the input padded
    with its own "same" padding, for every padding mode.
    """
    if ph == 0 and pw == 0:
        return x
    return x[..., ph:x.shape[-2] - ph, pw:x.shape[-1] - pw]


def check_bool(name: str, value: object) -> bool:
    """Validate a boolean option, raising ``TypeError`` naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def resolve_identity(name: str, value: bool | None, in_channels: int, out_channels: int, stride: int) -> bool:
    """``None``: an identity branch whenever it exists (``in == out`` and stride 1); ``True``: required."""
    possible = in_channels == out_channels and stride == 1
    if value is None:
        return possible
    check_bool(name, value)
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
