"""MobileOneBlock: the over-parameterized conv of MobileOne (Vasu et al., CVPR 2023)."""
from __future__ import annotations

from torch import Tensor, nn

from . import kernels as K
from ._common import check_bool, resolve_identity
from .base import Branch, ConvBN, RepBlock, check_int


class MobileOneBlock(RepBlock):
    """``num_branches`` parallel k x k conv-BN branches + a 1x1 conv-BN "scale" branch (when k > 1)
    + identity-BN (when ``in == out`` and stride 1).

    Only the linear part of MobileOne's block (its SE module and activation come after, outside).

    Options:
        num_branches: number of k x k branches (default 1, MobileOne-S0 uses 4).
        bn: BatchNorm on every branch (default). ``bn=False`` supports ``mode="online"``.
        use_identity: ``None`` (default) adds the identity whenever it exists; ``True`` requires it;
            ``False`` leaves it out.
    """

    name = "mobileone"

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
        num_branches: int = 1,
        bn: bool = True,
        use_identity: bool | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups, bias, padding_mode, padding)
        self.num_branches = check_int("num_branches", num_branches)
        self.use_bn = check_bool("bn", bn)
        self.use_identity = resolve_identity("use_identity", use_identity, in_channels, out_channels, stride)
        k, s, d, g = kernel_size, stride, dilation, groups
        self.conv_kxk = nn.ModuleList(
            ConvBN(in_channels, out_channels, k, s, d, g, bias, bn) for _ in range(num_branches)
        )
        self.conv_scale = ConvBN(in_channels, out_channels, 1, s, 1, g, bias, bn) if k > 1 else None
        self.identity: nn.Module | None = None
        if self.use_identity:
            self.identity = nn.BatchNorm2d(out_channels) if bn else nn.Identity()

    def forward_branches(self, x: Tensor) -> Tensor:
        xp = self.pad(x)
        y = sum(branch(xp) for branch in self.conv_kxk)
        if self.conv_scale is not None:
            y = y + self.conv_scale(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return y  # type: ignore[return-value]

    def fused_kernel(self) -> K.Kernel:
        ks = [branch.kernel() for branch in self.conv_kxk]
        if self.conv_scale is not None:
            ks.append(self.conv_scale.kernel())
        if self.identity is not None:
            ks.append(self.identity_kernel(self.identity if self.use_bn else None))
        return K.merge_parallel(ks, size=self.kernel_size)

    def branches(self) -> list[Branch]:
        out = [Branch(f"kxk_{i}", (b,), main=i == 0) for i, b in enumerate(self.conv_kxk)]
        if self.conv_scale is not None:
            out.append(Branch("scale", (self.conv_scale,)))
        if self.identity is not None:
            out.append(Branch("identity", (self.identity,) if self.use_bn else ()))
        return out

    def extra_repr(self) -> str:
        return (super().extra_repr()
                + f", num_branches={self.num_branches}, bn={self.use_bn}, use_identity={self.use_identity}")
