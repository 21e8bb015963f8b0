"""RepConv: the online re-parameterized conv of the NTIRE 2023 ESR team DFCDN (OREPA-style, Hu et al. 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels as K
from .base import Branch, ChannelVector, ConvBN, RepBlock, check_int

#: Initial value of each branch's per-output-channel scale.
INITIAL_SCALES = {"kxk": 1.0, "1x1": 0.5, "seq": 0.5, "avg": 0.5}


class RepConv(RepBlock):
    """Linear branches k x k, 1x1, 1x1 -> k x k and 1x1 -> k x k average, each scaled by a learnable
    per-output-channel vector (the scales replace BatchNorm, as in OREPA); no BatchNorm.

    Being purely linear, the whole block is one kernel computed from its parameters: in
    ``mode="online"`` every forward builds that kernel (cheap tensor algebra on weights) and runs a
    single conv, so training costs about one conv -- this is the block to pick for cheap
    over-parameterized training. ``mode`` may be given to the constructor (default ``"branches"``, the
    multi-branch forward; both give the same outputs and gradients).

    Options:
        internal_channels: width of the 1x1 -> k x k branch (default ``out_channels``; a multiple of ``groups``).
        mode: ``"branches"`` or ``"online"``.
    """

    name = "repconv"

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
        internal_channels: int | None = None,
        mode: str = "branches",
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups, bias, padding_mode, padding)
        if internal_channels is None:
            internal_channels = out_channels
        self.internal_channels = check_int("internal_channels", internal_channels)
        if internal_channels % groups:
            raise ValueError(f"internal_channels={internal_channels} must be a multiple of groups={groups}")
        k, s, d, g = kernel_size, stride, dilation, groups
        self.conv_kxk = ConvBN(in_channels, out_channels, k, s, d, g, bias)
        self.conv_1x1 = ConvBN(in_channels, out_channels, 1, s, 1, g, bias)
        self.seq_1x1 = ConvBN(in_channels, internal_channels, 1, 1, 1, g, bias)
        self.seq_kxk = ConvBN(internal_channels, out_channels, k, s, d, g, bias)
        self.avg_1x1 = ConvBN(in_channels, out_channels, 1, 1, 1, g, bias)
        self.scales = nn.ParameterDict(
            {b: nn.Parameter(torch.full((out_channels,), v)) for b, v in INITIAL_SCALES.items()}
        )
        self.set_mode(mode)

    def _avg(self) -> K.Kernel:
        return K.avg_kernel(self.out_channels, self.out_channels, self.kernel_size, like=self.avg_1x1.conv.weight)

    def forward_branches(self, x: Tensor) -> Tensor:
        p, pm, sc = self.padding, self.padding_mode, self.scales
        ys = {
            "kxk": self.conv_kxk(self.pad(x)),
            "1x1": self.conv_1x1(x),
            "seq": self.seq_kxk(self.seq_1x1.forward_padded(x, p, pm)),
            "avg": F.conv2d(self.avg_1x1.forward_padded(x, p, pm), self._avg()[0], None, self.stride, 0,
                            self.dilation, self.out_channels),
        }
        return sum(y * sc[b].reshape(1, -1, 1, 1) for b, y in ys.items())  # type: ignore[return-value]

    def fused_kernel(self) -> K.Kernel:
        g, c = self.groups, self.out_channels
        ks = {
            "kxk": self.conv_kxk.kernel(),
            "1x1": self.conv_1x1.kernel(),
            "seq": K.merge_sequential(self.seq_1x1.kernel(), self.seq_kxk.kernel(), g, g, g),
            "avg": K.merge_sequential(self.avg_1x1.kernel(), self._avg(), g, c, g),
        }
        return K.merge_parallel([K.scale_channels(k, self.scales[b]) for b, k in ks.items()], size=self.kernel_size)

    def branches(self) -> list[Branch]:
        sc = self.scales
        return [Branch("kxk", (self.conv_kxk, ChannelVector(sc, "kxk", 1.0)), main=True),
                Branch("1x1", (self.conv_1x1, ChannelVector(sc, "1x1", 1.0))),
                Branch("seq", (self.seq_1x1, self.seq_kxk, ChannelVector(sc, "seq", 1.0))),
                Branch("avg", (self.avg_1x1, ChannelVector(sc, "avg", 1.0)))]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", internal_channels={self.internal_channels}"
