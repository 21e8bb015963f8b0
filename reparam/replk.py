"""RepLKConv: a large kernel re-parameterized with a parallel small kernel (RepLKNet, Ding et al., CVPR 2022).

The NTIRE 2023 ESR team AIIA-SR (CFSR's ConvFormer layer) uses it as ``DConv9x9 + DConv k'x k'``.
"""
from __future__ import annotations

from torch import Tensor

from . import kernels as K
from ._common import check_bool, crop
from .base import Branch, ConvBN, RepBlock, check_int


def default_small_kernel(kernel_size: int) -> int:
    """RepLKNet's choice: 5 next to large kernels, otherwise the next odd size below ``kernel_size``."""
    return 5 if kernel_size > 5 else kernel_size - 2


class RepLKConv(RepBlock):
    """A ``kernel_size`` x ``kernel_size`` conv plus a parallel ``small_kernel`` conv (same stride,
    dilation and groups), each followed by BN by default.

    Usually depthwise (``groups == in_channels == out_channels``) with a big ``kernel_size`` (e.g. 13),
    but any grouping works. The small branch runs on the block's padded input cropped by the
    difference of the two "same" paddings, so fusion is exact for every ``padding_mode``.

    Options:
        small_kernel: odd size below ``kernel_size`` (default 5 for ``kernel_size > 5``, else ``kernel_size - 2``).
        bn: BatchNorm after each conv (default). ``bn=False`` supports ``mode="online"``.
    """

    name = "replk"

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
        small_kernel: int | None = None,
        bn: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups, bias, padding_mode, padding)
        if kernel_size < 3:
            raise ValueError(f"kernel_size={kernel_size}: RepLKConv needs kernel_size >= 3 to hold a smaller kernel")
        if small_kernel is None:
            small_kernel = default_small_kernel(kernel_size)
        self.small_kernel = check_int("small_kernel", small_kernel)
        if small_kernel % 2 == 0 or small_kernel >= kernel_size:
            raise ValueError(f"small_kernel must be odd and smaller than kernel_size={kernel_size}, got {small_kernel}")
        self.use_bn = check_bool("bn", bn)
        s, d, g = stride, dilation, groups
        self.large = ConvBN(in_channels, out_channels, kernel_size, s, d, g, bias, bn)
        self.small = ConvBN(in_channels, out_channels, small_kernel, s, d, g, bias, bn)

    def forward_branches(self, x: Tensor) -> Tensor:
        xp = self.pad(x)
        c = self.dilation * (self.kernel_size - self.small_kernel) // 2
        return self.large(xp) + self.small(crop(xp, c, c))

    def fused_kernel(self) -> K.Kernel:
        return K.merge_parallel([self.large.kernel(), self.small.kernel()], size=self.kernel_size)

    def branches(self) -> list[Branch]:
        return [Branch("large", (self.large,), main=True), Branch("small", (self.small,))]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", small_kernel={self.small_kernel}, bn={self.use_bn}"
