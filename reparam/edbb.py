"""EDBB: the edge-enhanced diverse branch block of EFDN (Yan Wang, CVPRW 2022)."""
from __future__ import annotations

from torch import Tensor

from . import kernels as K
from .base import Branch, ConvBN
from .ecb import ECB


class EDBB(ECB):
    """ECB's branches plus a 1x1 branch: k x k, 1x1, 1x1 -> k x k, 1x1 -> {Sobel-x, Sobel-y, Laplacian}
    (fixed masks with learnable per-channel scale and bias) and the identity.

    The edge and 1x1 -> k x k branches are :class:`reparam.ECB`'s own (this class extends it), so their
    border handling and fusion are shared. No BatchNorm, as in EFDN: ``mode="online"`` is available.

    Options:
        depth_multiplier: width of the 1x1 -> k x k branch relative to ``out_channels`` (default 2;
            ``int(out_channels * depth_multiplier)`` as in EFDN's code).
        use_identity: ``None`` (default) adds the identity whenever it exists (``in == out``, stride 1);
            ``True`` requires it; ``False`` leaves it out.
        edges: subset of ``("sobel_x", "sobel_y", "laplacian")`` (non-empty edges need ``kernel_size >= 3``).
    """

    name = "edbb"

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
        depth_multiplier: float = 2.0,
        use_identity: bool | None = None,
        edges: tuple[str, ...] = ("sobel_x", "sobel_y", "laplacian"),
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups, bias, padding_mode, padding,
                         depth_multiplier=depth_multiplier, use_identity=use_identity, edges=edges)
        self.conv_1x1 = ConvBN(in_channels, out_channels, 1, stride, 1, groups, bias)

    def forward_branches(self, x: Tensor) -> Tensor:
        return super().forward_branches(x) + self.conv_1x1(x)

    def fused_kernel(self) -> K.Kernel:
        return K.merge_parallel([super().fused_kernel(), self.conv_1x1.kernel()], size=self.kernel_size)

    def branches(self) -> list[Branch]:
        return [*super().branches(), Branch("1x1", (self.conv_1x1,))]
