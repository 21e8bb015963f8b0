"""FMEN (Du et al., NTIRE 2022 ESR): fast and memory-efficient network, deploy and training forms.

Key names follow the official deploy checkpoint: ``head``, ``warmup.0`` / ``warmup.1`` (HFAB),
``basic_blocks.<i>``, ``hfabs.<i>``, ``lr_conv``, ``tail.0``. Each conv of a :class:`BasicBlock` sits in a
:class:`RepSlot` (attribute ``rep_conv``), so the deploy keys are ``...conv1.rep_conv.weight``. Built with
``conv="rrrb"`` the slots hold RRRBs and each BasicBlock is the paper's training-time ERB
(RRRB -> LeakyReLU(0.1) -> RRRB); ``reparam.fuse_all`` gives back the deploy keys. LeakyReLU is applied
functionally, like the official code's global activation, so the challenge FLOPs match (see ``NEGATIVE_SLOPE``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import SRNet, check_int, conv3

__all__ = ["RepSlot", "BasicBlock", "HFAB", "FMEN"]

NEGATIVE_SLOPE = 0.1
# The official FMEN applies one module-level ``nn.LeakyReLU(0.1)`` that is not a submodule of the network,
# so the challenge's FLOPs counter (which hooks the network's modules) never counts it: FMEN's official
# 22,280,011,776 FLOPs leave out its 28,835,840 activation elements. The activations here are functional
# (``F.leaky_relu``) for the same reason, so ``effsr.metrics.profile`` gives the official number.


class RepSlot(nn.Module):
    """A named holder for one 3x3 conv (``rep_conv``): a plain conv when deployed, a rep block in training."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.rep_conv = conv3(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.rep_conv(x)


class BasicBlock(nn.Module):
    """``conv2(act(conv1(x)))`` -- FMEN's ERB in deploy form (no residual: the RRRBs carry it in training)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = RepSlot(channels, channels)
        self.negative_slope = NEGATIVE_SLOPE  # of the functional LeakyReLU (see NEGATIVE_SLOPE)
        self.conv2 = RepSlot(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.leaky_relu(self.conv1(x), self.negative_slope))


class HFAB(nn.Module):
    """High-frequency attention block: ``x * sigmoid(excitate(act(convs(act(squeeze(x))))))``."""

    def __init__(self, channels: int, num_basic: int, mid_channels: int) -> None:
        super().__init__()
        self.squeeze = conv3(channels, mid_channels)
        self.convs = nn.Sequential(*[BasicBlock(mid_channels) for _ in range(num_basic)])
        self.excitate = conv3(mid_channels, channels)
        self.negative_slope = NEGATIVE_SLOPE  # of the functional LeakyReLU (see NEGATIVE_SLOPE)

    def forward(self, x: Tensor) -> Tensor:
        a = self.negative_slope
        y = F.leaky_relu(self.convs(F.leaky_relu(self.squeeze(x), a)), a)
        return x * torch.sigmoid(self.excitate(y))


class FMEN(SRNet):
    """FMEN: ``head`` -> ``warmup`` (conv, HFAB) -> ``num_blocks`` x (BasicBlock, HFAB) -> ``lr_conv``
    (+ ``head`` output) -> conv + PixelShuffle.

    Args:
        nf: feature channels (official 50).
        num_blocks: (BasicBlock, HFAB) pairs (4).
        up_blocks: BasicBlocks inside each HFAB: ``up_blocks[0]`` for the warm-up HFAB, then one per pair;
            ``num_blocks + 1`` non-negative ints (official ``[2, 1, 1, 1, 1]``, the default for 4 blocks;
            None means ``[2] + [1] * num_blocks``).
        mid_channels: HFAB channels (16).
        warmup_mid_channels: channels of the warm-up HFAB (official 12 = mid_channels - 4).
        scale: upscaling factor (4).
    Input and output range 0-255.
    """

    arch = "fmen"
    input_range = 255.0

    def __init__(
        self,
        nf: int = 50,
        num_blocks: int = 4,
        up_blocks: Sequence[int] | None = None,
        mid_channels: int = 16,
        warmup_mid_channels: int = 12,
        scale: int = 4,
    ) -> None:
        super().__init__(scale)
        nf = check_int("nf", nf)
        num_blocks = check_int("num_blocks", num_blocks)
        mid_channels = check_int("mid_channels", mid_channels)
        warmup_mid_channels = check_int("warmup_mid_channels", warmup_mid_channels)
        if up_blocks is None:
            up = [2] + [1] * num_blocks
        else:
            if isinstance(up_blocks, (str, bytes)) or not isinstance(up_blocks, Sequence):
                raise TypeError(f"up_blocks must be a sequence of ints, got {type(up_blocks).__name__}")
            up = [check_int("up_blocks[]", v, minimum=0) for v in up_blocks]
            if len(up) != num_blocks + 1:
                raise ValueError(f"up_blocks must have num_blocks + 1 = {num_blocks + 1} entries, got {len(up)}")
        self.config = dict(nf=nf, num_blocks=num_blocks, up_blocks=list(up), mid_channels=mid_channels,
                           warmup_mid_channels=warmup_mid_channels, scale=self.scale)
        self.head = conv3(3, nf)
        self.warmup = nn.Sequential(conv3(nf, nf), HFAB(nf, up[0], warmup_mid_channels))
        self.basic_blocks = nn.ModuleList([BasicBlock(nf) for _ in range(num_blocks)])
        self.hfabs = nn.ModuleList([HFAB(nf, up[i + 1], mid_channels) for i in range(num_blocks)])
        self.lr_conv = conv3(nf, nf)
        self.tail = nn.Sequential(conv3(nf, 3 * self.scale**2), nn.PixelShuffle(self.scale))

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(x)
        h = self.warmup(x)
        for block, hfab in zip(self.basic_blocks, self.hfabs):
            h = hfab(block(h))
        return self.tail(self.lr_conv(h) + x)
