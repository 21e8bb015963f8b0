"""Enhanced spatial attention (ESA) in its two published forms: RFDN's and RLFN's.

Both compute ``x * sigmoid(conv4(up(g(maxpool(conv2(conv1(x))))) + conv_f(conv1(x))))`` with a stride-2
3x3 ``conv2`` (padding 0), ``max_pool2d(kernel 7, stride 3)`` and a bilinear resize
(``align_corners=False``) back to ``x``'s size; they differ in ``g``:

* RFDN (:class:`ESA`): ``g = conv3_(relu(conv3(relu(conv_max(.)))))``;
* RLFN (:class:`ESALite`): ``g = conv3(.)`` -- no ``conv_max``/``conv3_``, no ReLU.

The official code needs an input of at least 15 x 15 pixels (3x3 stride-2 conv, then a 7 x 7 pool).
Here smaller inputs also work: the conv input is replicate-padded to 3 pixels and the pool input is
padded with ``-inf`` to 7 pixels (the pool then takes the global maximum). For inputs the official code
accepts, nothing is padded and the outputs are identical.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import conv1, conv3

__all__ = ["ESA", "ESALite"]

POOL_KERNEL = 7
POOL_STRIDE = 3


def _pad_to(x: Tensor, size: int, mode: str, value: float = 0.0) -> Tensor:
    """Pad ``x`` at the bottom/right so that both spatial sizes are at least ``size``."""
    h, w = x.shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph == 0 and pw == 0:
        return x
    if mode == "constant":
        return F.pad(x, (0, pw, 0, ph), mode="constant", value=value)
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _pooled(conv2: nn.Module, c1_: Tensor) -> Tensor:
    c1 = conv2(_pad_to(c1_, 3, "replicate"))
    return F.max_pool2d(_pad_to(c1, POOL_KERNEL, "constant", float("-inf")), POOL_KERNEL, POOL_STRIDE)


class ESA(nn.Module):
    """RFDN's ESA(n, f): ``conv1`` 1x1 n->f, ``conv_f`` 1x1, ``conv_max``/``conv3``/``conv3_`` 3x3, ``conv2``
    3x3 stride 2 (padding 0), ``conv4`` 1x1 f->n."""

    def __init__(self, channels: int, esa_channels: int) -> None:
        super().__init__()
        n, f = channels, esa_channels
        self.conv1 = conv1(n, f)
        self.conv_f = conv1(f, f)
        self.conv_max = conv3(f, f)
        self.conv2 = conv3(f, f, stride=2, padding=0)
        self.conv3 = conv3(f, f)
        self.conv3_ = conv3(f, f)
        self.conv4 = conv1(f, n)
        # One ``nn.ReLU`` module used twice, as in the official code: the challenge's FLOPs counter hooks
        # activation modules, so the official RFDN's 27,102,622,560 FLOPs include these two ReLUs.
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        c1_ = self.conv1(x)
        v = self.relu(self.conv_max(_pooled(self.conv2, c1_)))
        c3 = self.conv3_(self.relu(self.conv3(v)))
        c3 = F.interpolate(c3, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.conv4(c3 + self.conv_f(c1_)))


class ESALite(nn.Module):
    """RLFN's ESA(n, f): as :class:`ESA` without ``conv_max``/``conv3_`` and without ReLUs."""

    def __init__(self, channels: int, esa_channels: int) -> None:
        super().__init__()
        n, f = channels, esa_channels
        self.conv1 = conv1(n, f)
        self.conv_f = conv1(f, f)
        self.conv2 = conv3(f, f, stride=2, padding=0)
        self.conv3 = conv3(f, f)
        self.conv4 = conv1(f, n)

    def forward(self, x: Tensor) -> Tensor:
        c1_ = self.conv1(x)
        c3 = self.conv3(_pooled(self.conv2, c1_))
        c3 = F.interpolate(c3, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.conv4(c3 + self.conv_f(c1_)))
