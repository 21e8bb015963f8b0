"""IMDN (Hui et al., AIM 2019 constrained SR winner), in the KAIR layout of the official x4 checkpoint.

``model = Sequential(conv, Shortcut(Sequential(IMDBlock x num_blocks, conv)), conv, PixelShuffle)``:
keys ``model.0``, ``model.1.sub.<i>``, ``model.1.sub.<num_blocks>``, ``model.2``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import SRNet, check_int, check_ratio, conv1, conv3

__all__ = ["IMDBlock", "ShortcutBlock", "IMDN"]

NEGATIVE_SLOPE = 0.05


class IMDBlock(nn.Module):
    """Information multi-distillation block: three (3x3 conv + LeakyReLU, split into d distilled and r
    remaining channels) steps, ``conv4`` 3x3 r->d, ``conv1x1`` on the four distilled parts, ``+ x``."""

    def __init__(self, channels: int, distilled: int) -> None:
        super().__init__()
        c, d = channels, distilled
        self.d, self.r = d, c - d
        self.conv1 = nn.Sequential(conv3(c, c), nn.LeakyReLU(NEGATIVE_SLOPE))
        self.conv2 = nn.Sequential(conv3(self.r, c), nn.LeakyReLU(NEGATIVE_SLOPE))
        self.conv3 = nn.Sequential(conv3(self.r, c), nn.LeakyReLU(NEGATIVE_SLOPE))
        self.conv4 = conv3(self.r, d)
        self.conv1x1 = conv1(4 * d, c)

    def forward(self, x: Tensor) -> Tensor:
        d1, r1 = torch.split(self.conv1(x), (self.d, self.r), dim=1)
        d2, r2 = torch.split(self.conv2(r1), (self.d, self.r), dim=1)
        d3, r3 = torch.split(self.conv3(r2), (self.d, self.r), dim=1)
        d4 = self.conv4(r3)
        return x + self.conv1x1(torch.cat([d1, d2, d3, d4], dim=1))


class ShortcutBlock(nn.Module):
    """``x + sub(x)``."""

    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, x: Tensor) -> Tensor:
        return x + self.sub(x)


class IMDN(SRNet):
    """IMDN (AIM 2019 version).

    Args:
        nf: feature channels (official 64).
        num_blocks: IMDBlocks (8).
        distill_ratio: distilled channels per step ``d = int(nf * distill_ratio)`` (0.25 -> 16 of 64).
        scale: upscaling factor (4).
    Input and output range 0-1.
    """

    arch = "imdn"
    input_range = 1.0

    def __init__(self, nf: int = 64, num_blocks: int = 8, distill_ratio: float = 0.25, scale: int = 4) -> None:
        super().__init__(scale)
        nf = check_int("nf", nf)
        num_blocks = check_int("num_blocks", num_blocks)
        distill_ratio = check_ratio("distill_ratio", distill_ratio)
        d = int(nf * distill_ratio)
        if d < 1 or d >= nf:
            raise ValueError(f"distill_ratio={distill_ratio} with nf={nf} gives {d} distilled channels (need 1..nf-1)")
        self.config = dict(nf=nf, num_blocks=num_blocks, distill_ratio=distill_ratio, scale=self.scale)
        body = [IMDBlock(nf, d) for _ in range(num_blocks)] + [conv3(nf, nf)]
        self.model = nn.Sequential(
            conv3(3, nf), ShortcutBlock(nn.Sequential(*body)), conv3(nf, 3 * self.scale**2), nn.PixelShuffle(self.scale)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
