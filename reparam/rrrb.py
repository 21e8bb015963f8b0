"""RRRB and ERB: FMEN's residual-in-residual rep block and enhanced residual block (Du et al., CVPRW 2022).

The NTIRE 2023 report calls RRRB the "ERB RepBlock".
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import kernels as K
from .base import ConvBN, RepBlock, check_int


def _group_embedding(channels: int, expanded: int, groups: int, like: Tensor) -> Tensor:
    """Dense 0/1 matrix ``(expanded, channels)`` placing each group's channels first in its expanded group."""
    cg, eg = channels // groups, expanded // groups
    m = like.new_zeros(expanded, channels)
    c = torch.arange(channels, device=like.device)
    m[(c // cg) * eg + c % cg, c] = 1
    return m


class RRRB(RepBlock):
    """1x1 expand C->rC, k x k conv with an inner residual, 1x1 reduce rC->C, outer residual.

    ``y = reduce(fea(e) + e) + x`` with ``e = expand(x)``, where ``fea`` sees ``e`` padded as the fused
    conv pads its input (bias-padding for ``zeros``), so it fuses exactly into one k x k conv.
    Residuals need ``in_channels == out_channels`` and ``stride == 1``.
    """

    name = "rrrb"
    allows_in_ne_out = False

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
        ratio: int = 2,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups, bias, padding_mode, padding)
        if stride != 1:
            raise ValueError(f"stride={stride}: RRRB's residual connections need stride 1")
        self.ratio = check_int("ratio", ratio)
        c, g = in_channels, groups
        self.expand = ConvBN(c, c * ratio, 1, 1, 1, g, bias)
        self.fea = ConvBN(c * ratio, c * ratio, kernel_size, 1, dilation, g, bias)
        self.reduce = ConvBN(c * ratio, c, 1, 1, 1, g, bias)

    def forward_branches(self, x: Tensor) -> Tensor:
        e = self.expand.forward_padded(x, self.padding, self.padding_mode)
        p = self.padding
        inner = self.fea(e) + (e[..., p:e.shape[-2] - p, p:e.shape[-1] - p] if p else e)
        return self.reduce(inner) + x

    def fused_kernel(self) -> K.Kernel:
        g, k, c = self.groups, self.kernel_size, self.in_channels
        fea = self.fea.kernel()
        inner = K.merge_parallel([fea, K.identity_kernel(c * self.ratio, g, k, like=fea[0])])
        w = K.merge_sequential(self.expand.kernel(), inner, g, g, g)
        w = K.merge_sequential(w, self.reduce.kernel(), g, g, g)
        return K.merge_parallel([w, self.identity_kernel()])

    def load_kernel(self, weight: Tensor, bias: Tensor | None) -> None:
        """Expand/reduce embed the C channels into rC; ``fea`` carries ``weight - 2 I`` (two residuals)."""
        g, c, rc = self.groups, self.in_channels, self.in_channels * self.ratio
        if not self.bias and bias is not None and bool(bias.ne(0).any()):
            raise ValueError("bias: the block was built with bias=False, cannot load a non-zero bias")
        emb = _group_embedding(c, rc, g, weight)  # (rC, C)
        self.expand.conv.weight.copy_(K.to_grouped(emb[:, :, None, None], g))
        self.reduce.conv.weight.copy_(K.to_grouped(emb.t()[:, :, None, None], g))
        target = K.to_dense(K.subtract_identity(weight, g, times=2), g)
        # fea = emb . target . emb^T over the channels: reduce's embedding, the target, expand's embedding
        inner = K.merge_sequential((emb.t()[:, :, None, None], None), (target, None))
        fea, _ = K.merge_sequential(inner, (emb[:, :, None, None], None))
        self.fea.conv.weight.copy_(K.to_grouped(fea, g))
        if self.bias:
            self.expand.conv.bias.zero_()
            self.reduce.conv.bias.zero_()
            self.fea.conv.bias.copy_(emb @ K.bias_or_zeros(weight, bias))


class ERB(RepBlock):
    """FMEN's enhanced residual block: RRRB -> LeakyReLU(0.1) -> RRRB.

    ``fuse()`` returns the plain ``Sequential(conv, LeakyReLU, conv)``; ``fused_kernel()`` returns the
    two kernels. It replaces a conv-act-conv pair, so it has no single-conv ``from_conv``.
    """

    name = "erb"
    allows_in_ne_out = False

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
        ratio: int = 2,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups, bias, padding_mode, padding)
        opts = dict(kernel_size=kernel_size, stride=stride, dilation=dilation, groups=groups, bias=bias,
                    padding_mode=padding_mode, ratio=ratio)
        self.rrrb1 = RRRB(in_channels, out_channels, **opts)
        self.act = nn.LeakyReLU(negative_slope)
        self.rrrb2 = RRRB(out_channels, out_channels, **opts)

    def set_mode(self, mode: str) -> "ERB":
        super().set_mode(mode)
        self.rrrb1.set_mode(mode)
        self.rrrb2.set_mode(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.rrrb2(self.act(self.rrrb1(x)))

    def fused_kernel(self) -> tuple[K.Kernel, K.Kernel]:  # type: ignore[override]
        return self.rrrb1.fused_kernel(), self.rrrb2.fused_kernel()

    def fuse(self) -> nn.Module:
        return nn.Sequential(self.rrrb1.fuse(), nn.LeakyReLU(self.act.negative_slope), self.rrrb2.fuse())

    @classmethod
    def check_convertible(cls, conv: nn.Module) -> None:
        raise TypeError("ERB replaces a conv-act-conv pair, not a single conv; convert single convs with RRRB")
