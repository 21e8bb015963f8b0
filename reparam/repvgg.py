"""RepVGGBlock: the training-time block of RepVGG (Ding et al., CVPR 2021)."""
from __future__ import annotations

from torch import Tensor, nn

from . import kernels as K
from ._common import check_bool, resolve_identity
from .base import Branch, ConvBN, RepBlock


class RepVGGBlock(RepBlock):
    """k x k conv-BN + 1x1 conv-BN + identity-BN (the identity only when ``in == out`` and stride 1).

    The 1x1 branch runs on the unpadded input with the block's stride: that is exactly the centre tap
    of the padded k x k window. The block is linear (RepVGG's ReLU comes after it, outside the block).

    Options:
        bn: BatchNorm on every branch (default). ``bn=False``: convs carry biases (when ``bias=True``)
            and the identity is a plain ``+ x``; supports ``mode="online"``.
        use_identity: ``None`` (default) adds the identity branch whenever it exists; ``True`` requires
            it (``ValueError`` if ``in != out`` or stride > 1); ``False`` leaves it out.
    """

    name = "repvgg"

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
        use_identity: bool | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups, bias, padding_mode, padding)
        self.use_bn = check_bool("bn", bn)
        self.use_identity = resolve_identity("use_identity", use_identity, in_channels, out_channels, stride)
        k, s, d, g = kernel_size, stride, dilation, groups
        self.conv_kxk = ConvBN(in_channels, out_channels, k, s, d, g, bias, bn)
        self.conv_1x1 = ConvBN(in_channels, out_channels, 1, s, 1, g, bias, bn)
        self.identity: nn.Module | None = None
        if self.use_identity:
            self.identity = nn.BatchNorm2d(out_channels) if bn else nn.Identity()

    def forward_branches(self, x: Tensor) -> Tensor:
        y = self.conv_kxk(self.pad(x)) + self.conv_1x1(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return y

    def fused_kernel(self) -> K.Kernel:
        ks = [self.conv_kxk.kernel(), self.conv_1x1.kernel()]
        if self.identity is not None:
            ks.append(self.identity_kernel(self.identity if self.use_bn else None))
        return K.merge_parallel(ks, size=self.kernel_size)

    def branches(self) -> list[Branch]:
        out = [Branch("kxk", (self.conv_kxk,), main=True), Branch("1x1", (self.conv_1x1,))]
        if self.identity is not None:
            out.append(Branch("identity", (self.identity,) if self.use_bn else ()))
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bn={self.use_bn}, use_identity={self.use_identity}"
