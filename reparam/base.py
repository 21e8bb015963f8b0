"""``RepBlock``: the common base of every re-parameterizable block, and the branch units blocks are built from.

A block pads its input **once** (with its ``padding_mode``) and runs every k x k branch unpadded on that,
so a 1x1 -> k x k branch sees its 1x1 output padded exactly as the fused conv would see it (bias-padding
for ``zeros``, reflection for ``reflect``, ...). ``fused_kernel()`` is a composition of
:mod:`reparam.kernels`; ``fuse()`` turns it into a plain :class:`torch.nn.Conv2d` with the block's
geometry (stride, dilation, groups, padding and padding_mode all preserved).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .utils.validate import check_int  # noqa: F401 - re-exported: reparam.base.check_int
from . import kernels as K

MODES = ("branches", "online")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

__all__ = ["RepBlock", "ConvBN", "Branch", "ChannelVector", "FuseModeWarning", "MODES", "PADDING_MODES",
           "RENAMED_OPTIONS", "bn_kernel", "check_int", "load_exact", "load_declared", "silence", "silence_bn",
           "switch_off", "unit_bn"]

#: Options that were renamed: passing the old name raises ``TypeError`` naming the new one.
RENAMED_OPTIONS = {"with_idt": "use_identity"}


class FuseModeWarning(UserWarning):
    """A block with BatchNorm was fused while in training mode (the fused conv equals its eval mode)."""


def bn_kernel(kernel: tuple[Tensor, Tensor | None], bn: _BatchNorm | None) -> K.Kernel:
    """Fold an (eval-mode) BatchNorm module after ``kernel``; no-op when ``bn`` is None."""
    w, b = kernel
    if bn is None:
        return w, K.bias_or_zeros(w, b)
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("bn: cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    return K.fold_bn(w, b, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def pad_constant(y: Tensor, value: Tensor, pad: int) -> Tensor:
    """Pad ``y`` spatially by ``pad`` with a per-channel constant ``value`` (``(C,)``)."""
    if pad == 0:
        return y
    v = value.reshape(1, -1, 1, 1)
    return F.pad(y - v, [pad] * 4) + v


class ConvBN(nn.Module):
    """A conv with an optional BatchNorm after it: one branch of a block.

    The conv itself is never padded (``padding=0``); blocks decide what it runs on.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        bn: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias=bias and not bn)
        self.bn = nn.BatchNorm2d(out_channels) if bn else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn(y) if self.bn is not None else y

    def kernel(self) -> K.Kernel:
        """The branch as one conv kernel (BN folded with its running statistics)."""
        return bn_kernel((self.conv.weight, self.conv.bias), self.bn)

    def forward_padded(self, x: Tensor, pad: int, padding_mode: str) -> Tensor:
        """``self(x)`` padded by ``pad`` exactly as if the block's input had been padded first.

        Only valid for a pointwise (1x1, stride 1) conv. For ``zeros`` mode the border is the branch's
        response to a zero pixel (its bias after BN, with the same statistics the interior used: batch
        statistics in training, running statistics in eval).
        """
        y = self.conv(x)
        bias = K.bias_or_zeros(self.conv.weight, self.conv.bias)
        if self.bn is not None:
            bn = self.bn
            if bn.training or bn.running_mean is None:
                var, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
            else:
                mean, var = bn.running_mean, bn.running_var
            _, border = K.fold_bn(self.conv.weight, bias, mean, var, bn.weight, bn.bias, bn.eps)
            y = bn(y)
        else:
            border = bias
        if pad == 0:
            return y
        if padding_mode == "zeros":
            return pad_constant(y, border, pad)
        return F.pad(y, [pad] * 4, mode=padding_mode)


@dataclass(frozen=True)
class ChannelVector:
    """A learnable per-output-channel vector of a branch, stored as ``container[key]`` (a ``ParameterDict``).

    ``neutral`` is the value that makes it a no-op: ``1.0`` for a scale, ``0.0`` for a shift.
    """

    container: nn.ParameterDict
    key: str
    neutral: float

    @property
    def param(self) -> nn.Parameter:
        return self.container[self.key]


Unit = Union[ConvBN, _BatchNorm, ChannelVector]


@dataclass(frozen=True)
class Branch:
    """One parallel path from a block's input to its output, as the block declares it (:meth:`RepBlock.branches`).

    ``units`` are the learnable pieces along the path, input side first: its :class:`ConvBN` convs (the
    first reads the block input, the last writes the block output, fixed operators such as an average or a
    Sobel mask may sit between or after them) followed by its per-output-channel *tail*: a BatchNorm or
    :class:`ChannelVector` s applied after the last conv. A path without convs is an *identity* path:
    ``units == ()`` is a fixed ``+ x``, ``(bn,)`` an identity-BN. ``main`` marks the one branch that
    :meth:`RepBlock.load_kernel` writes a target kernel into; every other branch is switched off.

    The declaration is the single source for everything that treats branches generically: the default
    :meth:`RepBlock.load_kernel` and ``prune``'s channel slicers both derive from it.
    """

    name: str
    units: tuple[Unit, ...]
    main: bool = False

    @property
    def convs(self) -> tuple[ConvBN, ...]:
        return tuple(u for u in self.units if isinstance(u, ConvBN))

    @property
    def tail(self) -> tuple[Unit, ...]:
        """The per-output-channel units after the last conv (all units of an identity path)."""
        last = max((i for i, u in enumerate(self.units) if isinstance(u, ConvBN)), default=-1)
        return self.units[last + 1:]

    @property
    def is_identity(self) -> bool:
        return not self.convs

    def parameters(self) -> Iterator[nn.Parameter]:
        for u in self.units:
            if isinstance(u, ChannelVector):
                yield u.param
            else:
                yield from u.parameters()


class RepBlock(nn.Module):
    """Base class of every training-time block that fuses to plain convs.

    Subclasses implement :meth:`forward_branches`, :meth:`fused_kernel` and :meth:`load_kernel`
    (the inverse used by :meth:`from_conv` / :func:`reparam.repify`).

    ``mode``: ``"branches"`` runs the multi-branch forward; ``"online"`` (blocks without BatchNorm)
    computes the fused kernel from the parameters and runs a single conv -- same outputs and gradients
    as the branches at about the cost of one conv.
    """

    #: Registry name (``reparam.BLOCKS[name]``), set by subclasses.
    name: ClassVar[str] = ""
    #: Whether ``in_channels != out_channels`` is allowed.
    allows_in_ne_out: ClassVar[bool] = True

    def __new__(cls, *args: Any, **kwargs: Any) -> "RepBlock":
        for old, new in RENAMED_OPTIONS.items():
            if old in kwargs:
                raise TypeError(
                    f"{old}: this option is now called {new} (the same in every block: None adds the identity "
                    f"branch whenever it exists, True requires it, False leaves it out)"
                )
        return super().__new__(cls)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        padding: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels)
        self.out_channels = check_int("out_channels", out_channels)
        self.kernel_size = check_int("kernel_size", kernel_size)
        self.stride = check_int("stride", stride)
        self.dilation = check_int("dilation", dilation)
        self.groups = check_int("groups", groups)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.bias = bias
        same = dilation * (kernel_size - 1) // 2
        if kernel_size % 2 == 0:  # whatever the padding: an even kernel has no centre to merge branches on
            raise ValueError(
                f"kernel_size={kernel_size} is even: rep blocks merge centred branches and need an odd kernel_size"
            )
        if padding is not None and padding != same:
            raise ValueError(f"padding must be {same} ('same' for kernel_size={kernel_size}, dilation={dilation}), "
                             f"got {padding}")
        self.padding = same
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        if not self.allows_in_ne_out and in_channels != out_channels:
            raise ValueError(
                f"{type(self).__name__} needs in_channels == out_channels (got {in_channels} and {out_channels})"
            )
        self._mode = "branches"

    # ------------------------------------------------------------------ modes
    @property
    def mode(self) -> str:
        return self._mode

    def has_batchnorm(self) -> bool:
        return any(isinstance(m, _BatchNorm) for m in self.modules())

    def check_mode(self, mode: str) -> None:
        """Raise ``ValueError`` if this block cannot run in ``mode`` (nothing is changed)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "online" and self.has_batchnorm():
            raise ValueError(
                f"mode='online' needs a block without BatchNorm; {type(self).__name__} has BN branches "
                "(build it with bn=False)"
            )

    def set_mode(self, mode: str) -> "RepBlock":
        self.check_mode(mode)
        self._mode = mode
        return self

    # -------------------------------------------------------------- forward
    def pad(self, x: Tensor) -> Tensor:
        """Pad the block input once, with the block's padding and padding_mode."""
        p = self.padding
        if p == 0:
            return x
        if self.padding_mode == "zeros":
            return F.pad(x, [p] * 4)
        return F.pad(x, [p] * 4, mode=self.padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        if self._mode == "online":
            w, b = self.fused_kernel()
            if self.padding_mode == "zeros":  # let the conv pad: no copy of the input
                return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
            return F.conv2d(self.pad(x), w, b, self.stride, 0, self.dilation, self.groups)
        return self.forward_branches(x)

    def forward_branches(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fused_kernel(self) -> K.Kernel:  # pragma: no cover - abstract
        """``(weight, bias)`` of the single conv equal to the block (eval mode), differentiable."""
        raise NotImplementedError

    def branches(self) -> list[Branch]:
        """The block's parallel paths (see :class:`Branch`), declared once per block class.

        :meth:`load_kernel` and ``prune``'s channel slicers derive from it; a block whose structure is not a
        sum of such paths (RRRB's nested residuals) does not declare it and implements both itself.
        """
        raise NotImplementedError(f"{type(self).__name__} does not declare its branches")

    def identity_kernel(self, norm: _BatchNorm | None = None) -> K.Kernel:
        """The identity path as a kernel of the block's geometry, followed by ``norm`` (identity-BN) if given."""
        like = next(self.parameters(), None)
        if like is None:
            like = torch.zeros(())
        idt = K.identity_kernel(self.out_channels, self.groups, self.kernel_size, like=like)
        return bn_kernel(idt, norm)

    def load_kernel(self, weight: Tensor, bias: Tensor | None) -> None:
        """Set the parameters so that the block computes exactly the conv ``(weight, bias)``.

        Default, from :meth:`branches`: the ``main`` branch's conv carries the target (minus any fixed
        identity path; its scale vectors set to 1 and shifts to 0), every other branch is switched off.
        """
        load_declared(self, weight, bias)

    # ------------------------------------------------------------------ fuse
    @property
    def fused_has_bias(self) -> bool:
        """Whether :meth:`fuse` gives a conv with a bias.

        Rule: a block built with ``bias=True`` always fuses to a conv with a bias; a block built with
        ``bias=False`` fuses to a bias-free conv whenever its fused bias is exactly zero (always without
        BatchNorm; with BatchNorm, e.g. right after ``from_conv`` of a bias-free conv), so that ``repify`` ->
        ``fuse_all`` gives back the original state_dict keys. A bias a BatchNorm has really learnt is kept:
        dropping it would change the function.
        """
        if self.bias:
            return True
        with torch.no_grad():
            return bool(self.fused_kernel()[1].ne(0).any())

    def fuse(self) -> nn.Module:
        """A plain ``nn.Conv2d`` equal to this block in eval mode (the block itself is untouched).

        BatchNorm is folded with its running statistics: a :class:`FuseModeWarning` is raised when a block
        with BatchNorm is fused in training mode (call ``.eval()`` first to silence it).
        """
        if self.training and self.has_batchnorm():
            warnings.warn(
                f"{type(self).__name__}.fuse(): fusing BatchNorm branches in training mode; the fused conv uses the "
                "BN running statistics, i.e. it equals the block in eval mode (call .eval() first to silence this)",
                FuseModeWarning, stacklevel=2,
            )
        with torch.no_grad():
            w, b = self.fused_kernel()
        has_bias = self.bias or bool(b.ne(0).any())
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, bias=has_bias, padding_mode=self.padding_mode,
            device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(w)
            if conv.bias is not None:
                conv.bias.copy_(b)
        conv.train(self.training)
        return conv

    # -------------------------------------------------------------- convert
    @classmethod
    def check_convertible(cls, conv: nn.Module) -> None:
        """Raise ``ValueError`` if ``conv`` cannot be represented by this block type."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        dh, dw = conv.dilation
        if kh != kw or sh != sw or dh != dw:
            raise ValueError("conv: only square kernels, strides and dilations can be converted")
        if kh % 2 == 0:
            raise ValueError(f"conv: kernel_size {kh} is even")
        pad = conv.padding
        same = dh * (kh - 1) // 2
        if isinstance(pad, str):
            if pad != "same" or sh != 1:
                raise ValueError(f"conv: padding {pad!r} is not 'same' padding")
        elif tuple(pad) != (same, same):
            raise ValueError(f"conv: padding {tuple(pad)} is not 'same' padding ({same})")
        if not cls.allows_in_ne_out and conv.in_channels != conv.out_channels:
            raise ValueError(f"conv: {cls.__name__} needs in_channels == out_channels")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: Any) -> "RepBlock":
        """A block of this type that computes exactly ``conv`` (same dtype and device).

        The block has biases exactly when ``conv`` has one (``bias=conv.bias is not None``), so it fuses
        back to ``conv``'s state_dict keys (see :attr:`fused_has_bias`).
        """
        cls.check_convertible(conv)
        block = cls(
            conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size[0], stride=conv.stride[0],
            dilation=conv.dilation[0], groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, **options,
        )
        block = block.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            block.load_kernel(conv.weight.detach(), None if conv.bias is None else conv.bias.detach())
        block.train(conv.training)
        return block

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"mode={self._mode!r}")
        if self.dilation != 1:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if not self.bias:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


# ------------------------------------------------------------------ parameter surgery behind load_kernel
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
