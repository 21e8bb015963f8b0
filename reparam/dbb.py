"""DBB: the Diverse Branch Block (Ding et al., CVPR 2021)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels as K
from ._common import check_bool
from .base import Branch, ConvBN, RepBlock, bn_kernel, check_int


class DBB(RepBlock):
    """Four branches: k x k conv-BN, 1x1 conv-BN, 1x1-BN -> k x k average -> BN, 1x1-BN -> k x k conv-BN.

    The average branch applies a fixed ``1/k^2`` kernel with the block's stride *and dilation*
    (count-include-pad on the once-padded input), so unlike the reference implementation dilated DBBs
    fuse exactly. 1x1 outputs that feed a k x k operator are padded as the fused conv pads its input
    (BN-bias padding for ``zeros``), so borders are exact for every ``padding_mode``.

    Options:
        bn: BatchNorm after every conv and after the average (default). ``bn=False`` gives a linear,
            BN-free DBB (convs carry biases when ``bias=True``) that supports ``mode="online"``.
        internal_channels: width of the 1x1 -> k x k branch; default ``in_channels`` (``2 * in_channels``
            when ``groups == out_channels``, as in the reference). Must be a multiple of ``groups``.

    Deviations from the reference:

    * for depthwise blocks the reference drops the 1x1 branch and the 1x1 in front of the average; here
      both are kept (a depthwise 1x1 is a learnable per-channel scale);
    * in **training mode** the border of a 1x1-BN output that feeds a k x k operator is filled with the
      BN's response to a zero pixel computed with the *batch* statistics (the ones the interior is
      normalised with, gradients flowing through them); the reference fills it with the *running*
      statistics and detached gamma/beta. Ours makes the training-mode forward exactly "zero-pad the
      input, then run each branch", consistent between border and interior, so the gradient of the border
      is the true one. In eval mode both use the running statistics and equal the fused conv; the
      difference is confined to the ``padding`` border pixels of training-mode forwards.
    """

    name = "dbb"

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
        bn: bool = True,
        internal_channels: int | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups, bias, padding_mode, padding)
        self.use_bn = check_bool("bn", bn)
        if internal_channels is None:
            internal_channels = in_channels if groups < out_channels else 2 * in_channels
        self.internal_channels = check_int("internal_channels", internal_channels)
        if internal_channels % groups:
            raise ValueError(f"internal_channels={internal_channels} must be a multiple of groups={groups}")
        k, s, d, g = kernel_size, stride, dilation, groups
        self.conv_kxk = ConvBN(in_channels, out_channels, k, s, d, g, bias, bn)
        self.conv_1x1 = ConvBN(in_channels, out_channels, 1, s, 1, g, bias, bn)
        self.avg_1x1 = ConvBN(in_channels, out_channels, 1, 1, 1, g, bias, bn)
        self.avg_bn = nn.BatchNorm2d(out_channels) if bn else None
        self.seq_1x1 = ConvBN(in_channels, internal_channels, 1, 1, 1, g, bias, bn)
        self.seq_kxk = ConvBN(internal_channels, out_channels, k, s, d, g, bias, bn)

    def _avg(self) -> K.Kernel:
        """The fixed k x k average as a depthwise kernel (dtype/device of the parameters)."""
        return K.avg_kernel(self.out_channels, self.out_channels, self.kernel_size, like=self.avg_1x1.conv.weight)

    def forward_branches(self, x: Tensor) -> Tensor:
        p, pm = self.padding, self.padding_mode
        y = self.conv_kxk(self.pad(x)) + self.conv_1x1(x)
        a = F.conv2d(self.avg_1x1.forward_padded(x, p, pm), self._avg()[0], None, self.stride, 0, self.dilation,
                     self.out_channels)
        if self.avg_bn is not None:
            a = self.avg_bn(a)
        return y + a + self.seq_kxk(self.seq_1x1.forward_padded(x, p, pm))

    def fused_kernel(self) -> K.Kernel:
        g, c = self.groups, self.out_channels
        avg = bn_kernel(K.merge_sequential(self.avg_1x1.kernel(), self._avg(), g, c, g), self.avg_bn)
        seq = K.merge_sequential(self.seq_1x1.kernel(), self.seq_kxk.kernel(), g, g, g)
        return K.merge_parallel([self.conv_kxk.kernel(), self.conv_1x1.kernel(), avg, seq], size=self.kernel_size)

    def branches(self) -> list[Branch]:
        avg_tail = () if self.avg_bn is None else (self.avg_bn,)
        return [Branch("kxk", (self.conv_kxk,), main=True), Branch("1x1", (self.conv_1x1,)),
                Branch("avg", (self.avg_1x1, *avg_tail)), Branch("seq", (self.seq_1x1, self.seq_kxk))]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bn={self.use_bn}, internal_channels={self.internal_channels}"
