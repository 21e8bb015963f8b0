"""RFDN (Liu et al., AIM 2020 winner) and MegSR's pruned RFDN (NTIRE 2022).

Key names follow the official code: ``fea_conv``, ``B1``..``B<n>`` (RFDB), ``c.0`` (1x1 + LeakyReLU),
``LR_conv``, ``upsampler.0`` (conv + PixelShuffle).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import SRNet, check_bool, check_int, check_ratio, conv1, conv3
from .esa import ESA

__all__ = ["RFDB", "RFDN", "RFDNPruned"]

NEGATIVE_SLOPE = 0.05


class RFDB(nn.Module):
    """Residual feature distillation block.

    Three (1x1 distill, 3x3 refine) steps, a 3x3 ``c4`` to ``dc`` channels, ``c5`` 1x1 fusing the four
    distilled parts, then ESA. ``inner_residual=False`` drops the ``+ x`` of the refine convs (MegSR).
    """

    def __init__(self, channels: int, distilled: int, esa_channels: int, inner_residual: bool = True) -> None:
        super().__init__()
        n, dc = channels, distilled
        self.inner_residual = inner_residual
        self.c1_d = conv1(n, dc)
        self.c1_r = conv3(n, n)
        self.c2_d = conv1(n, dc)
        self.c2_r = conv3(n, n)
        self.c3_d = conv1(n, dc)
        self.c3_r = conv3(n, n)
        self.c4 = conv3(n, dc)
        self.c5 = conv1(4 * dc, n)
        self.esa = ESA(n, esa_channels)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE)

    def _refine(self, conv: nn.Module, x: Tensor) -> Tensor:
        y = conv(x)
        return self.act(y + x if self.inner_residual else y)

    def forward(self, x: Tensor) -> Tensor:
        d1 = self.act(self.c1_d(x))
        r1 = self._refine(self.c1_r, x)
        d2 = self.act(self.c2_d(r1))
        r2 = self._refine(self.c2_r, r1)
        d3 = self.act(self.c3_d(r2))
        r3 = self._refine(self.c3_r, r2)
        r4 = self.act(self.c4(r3))
        return self.esa(self.c5(torch.cat([d1, d2, d3, r4], dim=1)))


class RFDN(SRNet):
    """RFDN: ``fea_conv`` -> ``num_blocks`` RFDBs -> ``c`` (1x1 on their concatenation) -> ``LR_conv``
    (+ ``fea_conv`` output) -> conv + PixelShuffle.

    Args:
        nf: feature channels (official 50).
        num_blocks: number of RFDBs, named ``B1``..``B<num_blocks>`` (official 4).
        esa_channels: ESA channels ``f`` (official 12).
        distill_ratio: distilled channels ``dc = int(nf * distill_ratio)`` (official 0.5).
        inner_residual: ``+ x`` around each refine conv of the RFDB (official True; MegSR's pruned RFDN False).
        scale: upscaling factor (4).
    Input and output range 0-255.
    """

    arch = "rfdn"
    input_range = 255.0

    def __init__(
        self,
        nf: int = 50,
        num_blocks: int = 4,
        esa_channels: int = 12,
        distill_ratio: float = 0.5,
        inner_residual: bool = True,
        scale: int = 4,
    ) -> None:
        super().__init__(scale)
        nf = check_int("nf", nf)
        num_blocks = check_int("num_blocks", num_blocks)
        esa_channels = check_int("esa_channels", esa_channels)
        distill_ratio = check_ratio("distill_ratio", distill_ratio)
        check_bool("inner_residual", inner_residual)
        dc = int(nf * distill_ratio)
        if dc < 1:
            raise ValueError(f"distill_ratio={distill_ratio} gives no distilled channels for nf={nf}")
        self.config = dict(nf=nf, num_blocks=num_blocks, esa_channels=esa_channels, distill_ratio=distill_ratio,
                           inner_residual=inner_residual, scale=self.scale)
        self.num_blocks = num_blocks
        self.fea_conv = conv3(3, nf)
        for i in range(1, num_blocks + 1):
            setattr(self, f"B{i}", RFDB(nf, dc, esa_channels, inner_residual))
        self.c = nn.Sequential(conv1(nf * num_blocks, nf), nn.LeakyReLU(NEGATIVE_SLOPE))
        self.LR_conv = conv3(nf, nf)
        self.upsampler = nn.Sequential(conv3(nf, 3 * self.scale**2), nn.PixelShuffle(self.scale))

    def forward(self, x: Tensor) -> Tensor:
        f = self.fea_conv(x)
        outs = []
        h = f
        for i in range(1, self.num_blocks + 1):
            h = getattr(self, f"B{i}")(h)
            outs.append(h)
        y = self.LR_conv(self.c(torch.cat(outs, dim=1))) + f
        return self.upsampler(y)


class RFDNPruned(RFDN):
    """MegSR's compressed RFDN (NTIRE 2022 ESR): RFDN with ``nf=40`` and no inner residuals.

    Same arguments as :class:`RFDN` with these defaults.
    """

    arch = "rfdn_pruned"

    def __init__(
        self,
        nf: int = 40,
        num_blocks: int = 4,
        esa_channels: int = 12,
        distill_ratio: float = 0.5,
        inner_residual: bool = False,
        scale: int = 4,
    ) -> None:
        super().__init__(nf, num_blocks, esa_channels, distill_ratio, inner_residual, scale)
