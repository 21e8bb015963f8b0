"""The kernel algebra of re-parameterization: small pure functions on ``(weight, bias)``.

Every block's ``fused_kernel()`` is a composition of these functions; no fusion math lives anywhere
else. All functions are differentiable, allocate with ``*_like`` / ``new_*`` so dtype and device follow
their inputs (float64 works), and never modify their arguments.

Conventions: ``weight`` has the :func:`torch.nn.functional.conv2d` layout ``(out, in // groups, kh, kw)``;
``bias`` is a 1-D tensor of length ``out`` (``None`` is accepted wherever a bias is an input and
treated as zeros). A *kernel pair* is ``(weight, bias)`` with a real bias tensor.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

Kernel = tuple[Tensor, Tensor]

__all__ = [
    "Kernel",
    "bias_or_zeros",
    "fold_bn",
    "pad_kernel",
    "to_dense",
    "to_grouped",
    "merge_sequential",
    "merge_parallel",
    "compose_1x1_then_conv",
    "compose_conv_then_1x1",
    "pads_input",
    "scale_channels",
    "identity_kernel",
    "subtract_identity",
    "avg_kernel",
    "mask_kernel",
    "SOBEL_X",
    "SOBEL_Y",
    "LAPLACIAN",
]


def bias_or_zeros(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``bias`` itself, or zeros of length ``weight.shape[0]`` with the weight's dtype/device."""
    if bias is not None:
        return bias
    return weight.new_zeros(weight.shape[0])


def fold_bn(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    gamma: Tensor | None,
    beta: Tensor | None,
    eps: float,
) -> Kernel:
    """Fold an eval-mode BatchNorm that follows a conv into the conv's kernel.

    ``BN(conv(x)) = conv'(x)`` with ``w' = w * g/s`` and ``b' = (b - mean) * g/s + beta`` where
    ``s = sqrt(var + eps)``. ``gamma``/``beta`` may be ``None`` (BN with ``affine=False``).
    """
    bias = bias_or_zeros(weight, bias)
    std = torch.sqrt(running_var.to(weight.dtype) + eps)
    g = gamma if gamma is not None else torch.ones_like(std)
    b = beta if beta is not None else torch.zeros_like(std)
    t = g / std
    return weight * t.reshape(-1, 1, 1, 1), (bias - running_mean.to(weight.dtype)) * t + b


def pad_kernel(weight: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Zero-pad a kernel symmetrically to ``size`` (so a centred smaller kernel is embedded).

    Used for 1x1, 1xk, kx1 and small-kernel branches of a larger odd kernel. With the same stride,
    dilation and the larger kernel's "same" padding, the embedded kernel computes exactly what the
    small kernel computes with its own "same" padding. Both sizes must share parity per axis.
    """
    kh, kw = (size, size) if isinstance(size, int) else size
    h, w = weight.shape[-2:]
    if kh < h or kw < w:
        raise ValueError(f"size: cannot pad a {h}x{w} kernel down to {kh}x{kw}")
    if (kh - h) % 2 or (kw - w) % 2:
        raise ValueError(f"size: {h}x{w} kernel cannot be centred in {kh}x{kw} (parity differs)")
    ph, pw = (kh - h) // 2, (kw - w) // 2
    if ph == 0 and pw == 0:
        return weight
    return torch.nn.functional.pad(weight, [pw, pw, ph, ph])


def to_dense(weight: Tensor, groups: int) -> Tensor:
    """Expand a grouped kernel ``(out, in/g, kh, kw)`` to its block-diagonal dense form ``(out, in, kh, kw)``."""
    if groups == 1:
        return weight
    out, cin_g, kh, kw = weight.shape
    if out % groups:
        raise ValueError(f"groups: {groups} does not divide out_channels={out}")
    wg = weight.reshape(groups, out // groups, cin_g, kh, kw)
    eye = torch.eye(groups, dtype=weight.dtype, device=weight.device)
    return torch.einsum("gocxy,gh->gohcxy", wg, eye).reshape(out, groups * cin_g, kh, kw)


def to_grouped(dense: Tensor, groups: int) -> Tensor:
    """Inverse of :func:`to_dense`: take the diagonal blocks of a dense kernel ``(out, in, kh, kw)``.

    Exact when the dense kernel is block diagonal (which every composition of grouped convs with the
    same grouping is); the off-diagonal blocks are discarded.
    """
    if groups == 1:
        return dense
    out, cin, kh, kw = dense.shape
    if out % groups or cin % groups:
        raise ValueError(f"groups: {groups} does not divide channels ({cin}->{out})")
    d = dense.reshape(groups, out // groups, groups, cin // groups, kh, kw)
    diag = torch.diagonal(d, dim1=0, dim2=2)  # (out/g, in/g, kh, kw, g)
    return diag.permute(4, 0, 1, 2, 3).reshape(out, cin // groups, kh, kw)


def merge_sequential(
    first: tuple[Tensor, Tensor | None],
    second: tuple[Tensor, Tensor | None],
    groups_first: int = 1,
    groups_second: int = 1,
    groups_out: int = 1,
) -> Kernel:
    """Kernel of ``second(first(x))`` where one of the two convs is 1x1.

    * ``first`` 1x1, ``second`` kxk: exact when the 1x1 output is padded with its own bias (or the
      block pads the *input* once and both convs run unpadded, which is the same thing) -- the
      classic pitfall is zero-padding that intermediate, which makes the border wrong.
    * ``first`` kxk, ``second`` 1x1: always exact.

    The result is grouped with ``groups_out`` (it must be block diagonal for that grouping, which holds
    whenever both convs respect it).
    """
    w1, b1 = first
    w2, b2 = second
    b1 = bias_or_zeros(w1, b1)
    b2 = bias_or_zeros(w2, b2)
    d1 = to_dense(w1, groups_first)
    d2 = to_dense(w2, groups_second)
    if d1.shape[0] != d2.shape[1]:
        raise ValueError(f"first/second: channel mismatch {d1.shape[0]} vs {d2.shape[1]}")
    if d1.shape[-2:] == (1, 1):
        weight = torch.einsum("omhw,mi->oihw", d2, d1[:, :, 0, 0])
    elif d2.shape[-2:] == (1, 1):
        weight = torch.einsum("om,mihw->oihw", d2[:, :, 0, 0], d1)
    else:
        raise ValueError("first/second: one of the two kernels must be 1x1")
    bias = b2 + torch.einsum("om,m->o", d2.sum(dim=(2, 3)), b1)
    return to_grouped(weight, groups_out), bias


def _pair(value: int | tuple[int, ...], arg: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{arg}: expected an int or a pair of ints, got {value!r}")


def pads_input(padding: int | tuple[int, ...] | str, kernel_size: tuple[int, int] | int) -> bool:
    """Whether a conv with this ``padding`` (as ``nn.Conv2d`` takes it) pads its input at all:
    ``"valid"`` and zeros never do, ``"same"`` does unless the kernel is 1x1."""
    if padding == "valid":
        return False
    if padding == "same":
        return _pair(kernel_size, "kernel_size") != (1, 1)
    return any(p != 0 for p in _pair(padding, "padding"))


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _check_1x1(weight: Tensor, arg: str) -> None:
    if weight.dim() != 4 or tuple(weight.shape[-2:]) != (1, 1):
        raise ValueError(f"{arg}: expected a 1x1 kernel, got {tuple(weight.shape)}")


def _check_ungrouped(groups: int, arg: str) -> None:
    if groups != 1:
        raise ValueError(f"{arg}: only ungrouped convs (groups=1) compose exactly here, got groups={groups}")


def _check_pointwise(weight: Tensor, stride: Any, padding: Any, name: str) -> None:
    """``ValueError`` naming ``{name}``, ``{name}_stride`` or ``{name}_padding`` unless the conv is a 1x1 conv with
    stride 1 that does not pad: one that acts on each pixel alone, so it composes exactly."""
    _check_1x1(weight, name)
    if _pair(stride, f"{name}_stride") != (1, 1):
        raise ValueError(f"{name}_stride: the 1x1 conv must have stride 1 to compose, got {stride!r}")
    if pads_input(padding, (1, 1)):
        raise ValueError(f"{name}_padding: the 1x1 conv must not pad its input to compose, got {padding!r}")


def compose_1x1_then_conv(
    first: tuple[Tensor, Tensor | None],
    second: tuple[Tensor, Tensor | None],
    *,
    first_stride: int | tuple[int, int] = 1,
    first_padding: int | tuple[int, int] | str = 0,
    first_groups: int = 1,
    second_groups: int = 1,
    second_padding: int | tuple[int, int] | str = 0,
    second_padding_mode: str = "zeros",
) -> Kernel:
    """Kernel of ``second(first(x))`` for a 1x1 conv ``first`` feeding any conv ``second``, run as ONE conv
    with ``second``'s kernel size, stride, padding, dilation and padding mode.

    ``W = W2 . W1`` (channels contracted per tap), ``b = b2 + sum_taps(W2) . b1``. Exact when ``first`` is a plain
    channel mix (1x1, stride 1, no padding, groups 1; its dilation never matters) and ``second`` is ungrouped,
    and then for every input size: inside the image both sides compute the same sums. At the border ``second``
    pads ``first``'s output, ``W1 x + b1``; the merged conv pads ``x`` and so sees ``W1 pad(x) + b1``. Reflect,
    replicate and circular padding copy values, which commutes with the channel mix and keeps the constant
    ``b1``, so these agree. Zero padding gives ``0`` on one side and ``b1`` on the other: exact only when ``b1``
    is zero (or absent) or ``second`` does not pad. Anything else raises ``ValueError`` naming the argument.
    """
    w1, b1 = first
    w2, _ = second
    _check_pointwise(w1, first_stride, first_padding, "first")
    _check_ungrouped(first_groups, "first_groups")
    _check_ungrouped(second_groups, "second_groups")
    if second_padding_mode not in _PADDING_MODES:
        raise ValueError(f"second_padding_mode: expected one of {_PADDING_MODES}, got {second_padding_mode!r}")
    if (b1 is not None and bool(torch.any(b1 != 0)) and second_padding_mode == "zeros"
            and pads_input(second_padding, tuple(w2.shape[-2:]))):
        raise ValueError("second_padding: the second conv zero-pads the first's output, which holds the first's "
                         "nonzero bias at the border; one conv cannot reproduce that (use a bias-free first conv, "
                         "no padding, or a non-zero padding mode)")
    return merge_sequential(first, second)


def compose_conv_then_1x1(
    first: tuple[Tensor, Tensor | None],
    second: tuple[Tensor, Tensor | None],
    *,
    first_groups: int = 1,
    second_stride: int | tuple[int, int] = 1,
    second_padding: int | tuple[int, int] | str = 0,
    second_groups: int = 1,
) -> Kernel:
    """Kernel of ``second(first(x))`` for any ungrouped conv ``first`` feeding a 1x1 conv ``second``, run as ONE
    conv with ``first``'s kernel size, stride, padding, dilation and padding mode.

    ``W = W2 . W1`` (channels contracted), ``b = W2 . b1 + b2``. Always exact when ``second`` is a plain channel
    mix (1x1, stride 1, no padding, groups 1; its dilation never matters) and ``first`` is ungrouped: the 1x1
    conv acts on each output pixel of ``first`` separately, so it passes through ``first``'s sum, border and
    padding included. Anything else raises ``ValueError`` naming the argument.
    """
    _check_pointwise(second[0], second_stride, second_padding, "second")
    _check_ungrouped(first_groups, "first_groups")
    _check_ungrouped(second_groups, "second_groups")
    return merge_sequential(first, second)


def merge_parallel(kernels: Iterable[tuple[Tensor, Tensor | None]],
                   size: int | tuple[int, int] | None = None) -> Kernel:
    """Sum of parallel branches: each kernel centred (zero-padded) to ``size`` (default: the largest)."""
    ks = list(kernels)
    if not ks:
        raise ValueError("kernels: need at least one branch")
    if size is None:
        size = (max(w.shape[-2] for w, _ in ks), max(w.shape[-1] for w, _ in ks))
    weight = sum(pad_kernel(w, size) for w, _ in ks)
    bias = sum(bias_or_zeros(w, b) for w, b in ks)
    return weight, bias  # type: ignore[return-value]


def scale_channels(kernel: tuple[Tensor, Tensor | None], scale: Tensor) -> Kernel:
    """Kernel of ``scale[c] * conv(x)[c]``: per-output-channel scaling of weight and bias."""
    w, b = kernel
    return w * scale.reshape(-1, 1, 1, 1), bias_or_zeros(w, b) * scale


def identity_kernel(channels: int, groups: int, size: int | tuple[int, int], like: Tensor) -> Kernel:
    """``(weight, bias)`` of the identity map as a grouped conv (dtype/device follow ``like``)."""
    kh, kw = (size, size) if isinstance(size, int) else size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError("size: an identity kernel needs an odd size")
    if channels % groups:
        raise ValueError(f"groups: {groups} does not divide channels={channels}")
    cin_g = channels // groups
    w = like.new_zeros(channels, cin_g, kh, kw)
    idx = torch.arange(channels, device=like.device)
    w[idx, idx % cin_g, kh // 2, kw // 2] = 1
    return w, like.new_zeros(channels)


def subtract_identity(weight: Tensor, groups: int, times: int = 1) -> Tensor:
    """``weight`` minus ``times`` identity kernels of its own shape and grouping: the part of a target kernel
    left for the learnable branches of a block whose identity path(s) are fixed."""
    idt, _ = identity_kernel(weight.shape[0], groups, tuple(weight.shape[-2:]), like=weight)
    return weight - times * idt


def avg_kernel(channels: int, groups: int, size: int, like: Tensor) -> Kernel:
    """Kernel of a ``size x size`` average pool (count_include_pad) on each channel, as a grouped conv."""
    cin_g = channels // groups
    w = like.new_zeros(channels, cin_g, size, size)
    idx = torch.arange(channels, device=like.device)
    w[idx, idx % cin_g] = 1.0 / (size * size)
    return w, like.new_zeros(channels)


SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def mask_kernel(mask: Tensor, scale: Tensor, bias: Tensor | None) -> Kernel:
    """Depthwise kernel ``(C, 1, kh, kw)`` of a fixed mask (Sobel, Laplacian, ...) with a learnable
    per-channel scale and bias (ECBSR's edge branches)."""
    w = scale.reshape(-1, 1, 1, 1) * mask.to(scale).expand(scale.shape[0], 1, *mask.shape[-2:])
    return w, bias_or_zeros(w, bias)
