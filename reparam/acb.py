"""ACB: the Asymmetric Convolution Block of ACNet (Ding et al., ICCV 2019)."""
from __future__ import annotations

from torch import Tensor

from . import kernels as K
from ._common import check_bool, crop
from .base import Branch, ConvBN, RepBlock


class ACB(RepBlock):
    """k x k + 1 x k + k x 1 convs (each followed by BN by default), summed.

    The 1 x k (k x 1) branch runs on the block's padded input with the extra rows (columns) cropped
    off, i.e. exactly as the fused conv sees the centre row (column) of its window, for every
    ``padding_mode``, stride and dilation.

    Options:
        bn: BatchNorm after each conv (default ``True``); ``bn=False`` supports ``mode="online"``.
    """

    name = "acb"

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
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups, bias, padding_mode, padding)
        self.use_bn = check_bool("bn", bn)
        k, s, d, g = kernel_size, stride, dilation, groups
        self.square = ConvBN(in_channels, out_channels, (k, k), s, d, g, bias, bn)
        self.hor = ConvBN(in_channels, out_channels, (1, k), s, d, g, bias, bn)
        self.ver = ConvBN(in_channels, out_channels, (k, 1), s, d, g, bias, bn)

    def forward_branches(self, x: Tensor) -> Tensor:
        xp, p = self.pad(x), self.padding
        return self.square(xp) + self.hor(crop(xp, p, 0)) + self.ver(crop(xp, 0, p))

    def fused_kernel(self) -> K.Kernel:
        return K.merge_parallel([self.square.kernel(), self.hor.kernel(), self.ver.kernel()], size=self.kernel_size)

    def branches(self) -> list[Branch]:
        return [Branch("square", (self.square,), main=True), Branch("hor", (self.hor,)), Branch("ver", (self.ver,))]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bn={self.use_bn}"
