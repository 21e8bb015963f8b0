"""ECB: the edge-oriented convolution block of ECBSR (Zhang et al., ACM MM 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels as K
from ._common import resolve_identity
from .base import Branch, ChannelVector, ConvBN, RepBlock

EDGE_MASKS = {"sobel_x": K.SOBEL_X, "sobel_y": K.SOBEL_Y, "laplacian": K.LAPLACIAN}


class ECB(RepBlock):
    """k x k conv + (1x1 expand -> k x k) + 1x1 -> {Sobel-x, Sobel-y, Laplacian} (+ identity).

    The edge branches are fixed masks with learnable per-channel scale and bias, applied depthwise after
    a 1x1 conv. Every 1x1 output is padded as the fused conv pads its input (bias-padding for
    ``zeros``), so fusion is exact at the borders. No BatchNorm: ``mode="online"`` is available.

    Options:
        depth_multiplier: the 1x1 -> k x k branch is ``int(out_channels * depth_multiplier)`` wide, as in
            ECBSR's own code (so its checkpoints load), rounded down to a multiple of ``groups`` (at least
            ``groups``).
        use_identity: ``False`` (default, ECBSR's ``with_idt=False``) leaves the identity out; ``None``
            adds it whenever it exists (``in == out``, stride 1); ``True`` requires it.
        edges: subset of ``("sobel_x", "sobel_y", "laplacian")`` (non-empty edges need ``kernel_size >= 3``).
    """

    name = "ecb"

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
        use_identity: bool | None = False,
        edges: tuple[str, ...] = ("sobel_x", "sobel_y", "laplacian"),
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups, bias, padding_mode, padding)
        edges = tuple(edges)
        unknown = [e for e in edges if e not in EDGE_MASKS]
        if unknown:
            raise ValueError(f"edges: unknown masks {unknown}; choose from {sorted(EDGE_MASKS)}")
        if edges and kernel_size < 3:
            raise ValueError(f"kernel_size={kernel_size}: Sobel/Laplacian edges need kernel_size >= 3 (or edges=())")
        self.use_identity = resolve_identity("use_identity", use_identity, in_channels, out_channels, stride)
        if (isinstance(depth_multiplier, bool) or not isinstance(depth_multiplier, (int, float))
                or depth_multiplier <= 0):
            raise ValueError(f"depth_multiplier must be a positive number, got {depth_multiplier!r}")
        self.depth_multiplier = depth_multiplier
        mid = max(groups, int(out_channels * depth_multiplier) // groups * groups)
        self.edges = edges
        k, s, d, g = kernel_size, stride, dilation, groups
        self.conv_kxk = ConvBN(in_channels, out_channels, k, s, d, g, bias)
        self.expand = ConvBN(in_channels, mid, 1, 1, 1, g, bias)
        self.expand_kxk = ConvBN(mid, out_channels, k, s, d, g, bias)
        self.edge_1x1 = nn.ModuleDict({e: ConvBN(in_channels, out_channels, 1, 1, 1, g, bias) for e in edges})
        self.edge_scale = nn.ParameterDict({e: nn.Parameter(torch.randn(out_channels) * 1e-3) for e in edges})
        self.edge_bias = nn.ParameterDict(
            {e: nn.Parameter(torch.randn(out_channels) * 1e-3) for e in edges} if bias else {}
        )
        for e in edges:
            mask = K.pad_kernel(torch.tensor(EDGE_MASKS[e]).reshape(1, 1, 3, 3), k)
            self.register_buffer(f"mask_{e}", mask, persistent=False)

    def _edge_kernel(self, e: str) -> K.Kernel:
        return K.mask_kernel(getattr(self, f"mask_{e}"), self.edge_scale[e], self.edge_bias[e] if self.bias else None)

    def forward_branches(self, x: Tensor) -> Tensor:
        p, pm = self.padding, self.padding_mode
        y = self.conv_kxk(self.pad(x))
        y = y + self.expand_kxk(self.expand.forward_padded(x, p, pm))
        for e in self.edges:
            w, b = self._edge_kernel(e)
            t = self.edge_1x1[e].forward_padded(x, p, pm)
            y = y + F.conv2d(t, w, b, self.stride, 0, self.dilation, self.out_channels)
        if self.use_identity:
            y = y + x
        return y

    def fused_kernel(self) -> K.Kernel:
        g = self.groups
        ks = [self.conv_kxk.kernel(), K.merge_sequential(self.expand.kernel(), self.expand_kxk.kernel(), g, g, g)]
        for e in self.edges:
            ks.append(K.merge_sequential(self.edge_1x1[e].kernel(), self._edge_kernel(e), g, self.out_channels, g))
        if self.use_identity:
            ks.append(self.identity_kernel())
        return K.merge_parallel(ks)

    def branches(self) -> list[Branch]:
        out = [Branch("kxk", (self.conv_kxk,), main=True), Branch("expand", (self.expand, self.expand_kxk))]
        for e in self.edges:
            tail = [ChannelVector(self.edge_scale, e, 1.0)]
            if self.bias:
                tail.append(ChannelVector(self.edge_bias, e, 0.0))
            out.append(Branch(f"edge_{e}", (self.edge_1x1[e], *tail)))
        if self.use_identity:
            out.append(Branch("identity", ()))
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", use_identity={self.use_identity}, edges={self.edges}"
