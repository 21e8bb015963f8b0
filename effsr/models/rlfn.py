"""RLFN (Kong et al., NTIRE 2022 ESR runtime winner).

Key names follow the official NTIRE 2022 checkpoint: ``fea_conv``, ``B1``..``B<n>`` (RLFB), ``LR_conv``,
``upsampler.0``.
"""
from __future__ import annotations

from torch import Tensor, nn

from ._common import SRNet, check_int, conv1, conv3
from .esa import ESALite

__all__ = ["RLFB", "RLFN"]

NEGATIVE_SLOPE = 0.05


class RLFB(nn.Module):
    """Residual local feature block: ``c1_r`` n->mid, ``c2_r`` mid->mid, ``c3_r`` mid->n (3x3, each + LeakyReLU),
    ``+ x``, ``c5`` 1x1, RLFN's ESA."""

    def __init__(self, channels: int, mid_channels: int, esa_channels: int) -> None:
        super().__init__()
        self.c1_r = conv3(channels, mid_channels)
        self.c2_r = conv3(mid_channels, mid_channels)
        self.c3_r = conv3(mid_channels, channels)
        self.c5 = conv1(channels, channels)
        self.esa = ESALite(channels, esa_channels)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE)

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.c1_r(x))
        y = self.act(self.c2_r(y))
        y = self.act(self.c3_r(y))
        return self.esa(self.c5(y + x))


class RLFN(SRNet):
    """RLFN: ``fea_conv`` -> ``num_blocks`` RLFBs -> ``LR_conv`` (+ ``fea_conv`` output) -> conv + PixelShuffle.

    Args:
        nf: feature channels (official NTIRE 2022: 46).
        mid_channels: channels inside each RLFB (48).
        num_blocks: RLFBs, named ``B1``..``B<num_blocks>`` (4).
        esa_channels: ESA channels (16).
        scale: upscaling factor (4).
    Input and output range 0-255.
    """

    arch = "rlfn"
    input_range = 255.0

    def __init__(
        self, nf: int = 46, mid_channels: int = 48, num_blocks: int = 4, esa_channels: int = 16, scale: int = 4
    ) -> None:
        super().__init__(scale)
        nf = check_int("nf", nf)
        mid_channels = check_int("mid_channels", mid_channels)
        num_blocks = check_int("num_blocks", num_blocks)
        esa_channels = check_int("esa_channels", esa_channels)
        self.config = dict(nf=nf, mid_channels=mid_channels, num_blocks=num_blocks, esa_channels=esa_channels,
                           scale=self.scale)
        self.num_blocks = num_blocks
        self.fea_conv = conv3(3, nf)
        for i in range(1, num_blocks + 1):
            setattr(self, f"B{i}", RLFB(nf, mid_channels, esa_channels))
        self.LR_conv = conv3(nf, nf)
        self.upsampler = nn.Sequential(conv3(nf, 3 * self.scale**2), nn.PixelShuffle(self.scale))

    def forward(self, x: Tensor) -> Tensor:
        f = self.fea_conv(x)
        h = f
        for i in range(1, self.num_blocks + 1):
            h = getattr(self, f"B{i}")(h)
        return self.upsampler(self.LR_conv(h) + f)
