"""Pixel and frequency losses used by NTIRE 2023 ESR solutions; usable on images and on feature maps.

Every loss takes two tensors of the same shape ``(..., H, W)`` and returns a scalar (mean reduction):

* ``l1`` -- mean absolute error (most teams; DIPNet's feature and output distillation terms).
* ``l2`` / ``mse`` -- mean squared error (DIPNet's fine-tuning stage, LMRLFN's stage 4).
* ``charbonnier`` -- ``mean(sqrt((x - y)^2 + eps^2))`` with ``eps = 1e-3`` (``eps^2 = 1e-6`` as in the report).
* ``fft`` -- L1 between the real and imaginary parts of the 2-D real FFT over the last two dims
  (the "frequency loss" of MFA / SAFMN and the FFT loss of the RepRFB team). ``norm="ortho"`` by default so the
  value does not grow with the patch size.
* ``wavelet`` -- L1 between the high-frequency Haar DWT bands (LH, HL, HH) of the two inputs (LMRLFN's L_W,
  wavelet knowledge distillation [105]); ``levels`` decompositions, optional weight on the final LL band.

:func:`get_loss` turns a name, a weighted sum such as ``"0.9*charbonnier+0.1*fft"``, a callable or an
``nn.Module`` into a loss module.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Union

import torch
from torch import Tensor, nn

__all__ = [
    "l1_loss", "l2_loss", "charbonnier_loss", "fft_loss", "wavelet_loss", "haar_dwt",
    "L1Loss", "L2Loss", "CharbonnierLoss", "FFTLoss", "WaveletLoss", "WeightedSum",
    "LOSSES", "get_loss", "LossSpec",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
LossSpec = Union[str, nn.Module, LossFn]


def _check_pair(x: Tensor, y: Tensor, min_dim: int = 1) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"loss inputs must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape != y.shape:
        raise ValueError(f"loss inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() < min_dim:
        raise ValueError(f"loss inputs need at least {min_dim} dims (..., H, W), got shape {tuple(x.shape)}")


def l1_loss(x: Tensor, y: Tensor) -> Tensor:
    """Mean absolute error."""
    _check_pair(x, y)
    return (x - y).abs().mean()


def l2_loss(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error."""
    _check_pair(x, y)
    return (x - y).pow(2).mean()


def charbonnier_loss(x: Tensor, y: Tensor, eps: float = 1e-3) -> Tensor:
    """``mean(sqrt((x - y)^2 + eps^2))`` -- a smooth L1."""
    _check_pair(x, y)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return torch.sqrt((x - y).pow(2) + eps * eps).mean()


def fft_loss(x: Tensor, y: Tensor, norm: str = "ortho") -> Tensor:
    """L1 between ``view_as_real(rfft2(x))`` and ``view_as_real(rfft2(y))`` over the last two dims (mean).

    ``norm`` is passed to :func:`torch.fft.rfft2` (``"ortho"``, ``"backward"`` or ``"forward"``).
    """
    _check_pair(x, y, min_dim=2)
    if norm not in ("ortho", "backward", "forward"):
        raise ValueError(f"norm must be 'ortho', 'backward' or 'forward', got {norm!r}")
    if x.dtype in (torch.float16, torch.bfloat16):  # half-precision FFTs are limited to powers of two
        x, y = x.float(), y.float()
    fx = torch.view_as_real(torch.fft.rfft2(x, norm=norm))
    fy = torch.view_as_real(torch.fft.rfft2(y, norm=norm))
    return (fx - fy).abs().mean()


def haar_dwt(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One level of the orthonormal 2-D Haar DWT over the last two dims: ``(LL, LH, HL, HH)``.

    For each 2x2 block ``[[a, b], [c, d]]``: ``LL = (a+b+c+d)/2``, ``LH = (a-b+c-d)/2`` (horizontal detail),
    ``HL = (a+b-c-d)/2`` (vertical detail), ``HH = (a-b-c+d)/2``. An odd last row/column is dropped.
    """
    if x.dim() < 2:
        raise ValueError(f"haar_dwt needs at least 2 dims (..., H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    if h == 0 or w == 0:
        raise ValueError(f"haar_dwt needs H, W >= 2, got shape {tuple(x.shape)}")
    x = x[..., :h, :w]
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2


def wavelet_loss(x: Tensor, y: Tensor, levels: int = 1, ll_weight: float = 0.0) -> Tensor:
    """L1 between the high-frequency Haar bands of ``x`` and ``y``, summed over ``levels`` decompositions.

    At each level the loss adds ``mean(|LH_x - LH_y|) + mean(|HL_x - HL_y|) + mean(|HH_x - HH_y|)`` and recurses on LL;
    ``ll_weight * mean(|LL_x - LL_y|)`` of the last level is added when ``ll_weight > 0``.
    """
    _check_pair(x, y, min_dim=2)
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an int >= 1, got {levels!r}")
    if not (isinstance(ll_weight, (int, float)) and math.isfinite(ll_weight) and ll_weight >= 0):
        raise ValueError(f"ll_weight must be a finite number >= 0, got {ll_weight!r}")
    total = x.new_zeros(())
    for _ in range(levels):
        bx, by = haar_dwt(x), haar_dwt(y)
        for hx, hy in zip(bx[1:], by[1:]):
            total = total + (hx - hy).abs().mean()
        x, y = bx[0], by[0]
    if ll_weight > 0:
        total = total + ll_weight * (x - y).abs().mean()
    return total


class _FnLoss(nn.Module):
    """A loss function as a module (so it can sit in a ModuleDict and print nicely)."""

    fn: staticmethod

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return type(self).fn(x, y)


class L1Loss(_FnLoss):
    fn = staticmethod(l1_loss)


class L2Loss(_FnLoss):
    fn = staticmethod(l2_loss)


class CharbonnierLoss(nn.Module):
    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a number > 0, got {eps!r}")
        self.eps = float(eps)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return charbonnier_loss(x, y, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class FFTLoss(nn.Module):
    def __init__(self, norm: str = "ortho") -> None:
        super().__init__()
        if norm not in ("ortho", "backward", "forward"):
            raise ValueError(f"norm must be 'ortho', 'backward' or 'forward', got {norm!r}")
        self.norm = norm

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return fft_loss(x, y, self.norm)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}"


class WaveletLoss(nn.Module):
    def __init__(self, levels: int = 1, ll_weight: float = 0.0) -> None:
        super().__init__()
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be an int >= 1, got {levels!r}")
        if not (isinstance(ll_weight, (int, float)) and math.isfinite(ll_weight) and ll_weight >= 0):
            raise ValueError(f"ll_weight must be a finite number >= 0, got {ll_weight!r}")
        self.levels, self.ll_weight = levels, float(ll_weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return wavelet_loss(x, y, self.levels, self.ll_weight)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, ll_weight={self.ll_weight}"


class _Callable(nn.Module):
    def __init__(self, fn: LossFn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.fn(x, y)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


class WeightedSum(nn.Module):
    """``sum(w_i * loss_i(x, y))``."""

    def __init__(self, terms: list[tuple[float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("WeightedSum needs at least one term")
        for w, _ in terms:
            if not (isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0):
                raise ValueError(f"loss weights must be finite numbers >= 0, got {w!r}")
        self.weights = [float(w) for w, _ in terms]
        self.terms = nn.ModuleList(m for _, m in terms)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        total = x.new_zeros(())
        for w, m in zip(self.weights, self.terms):
            total = total + w * m(x, y)
        return total

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


#: Loss modules by name (constructed with their default options).
LOSSES: dict[str, type[nn.Module]] = {
    "l1": L1Loss, "l2": L2Loss, "mse": L2Loss, "charbonnier": CharbonnierLoss,
    "fft": FFTLoss, "frequency": FFTLoss, "wavelet": WaveletLoss,
}

_TERM = re.compile(
    r"^\s*(?:(?P<w>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*$"
)


def get_loss(spec: LossSpec, argname: str = "loss") -> nn.Module:
    """A loss module from ``spec``: a name in :data:`LOSSES`, a weighted sum of names (``"l1+0.05*fft"``),
    an ``nn.Module`` (returned as is) or a callable ``(x, y) -> scalar``. ``argname`` names the argument in errors."""
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        terms: list[tuple[float, nn.Module]] = []
        for part in spec.split("+"):
            m = _TERM.match(part)
            if m is None or m.group("name").lower() not in LOSSES:
                raise ValueError(
                    f"{argname}: cannot parse loss {spec!r}; use a name from {sorted(LOSSES)} "
                    "or a sum like '0.9*charbonnier+0.1*fft'"
                )
            w = float(m.group("w")) if m.group("w") is not None else 1.0
            terms.append((w, LOSSES[m.group("name").lower()]()))
        if len(terms) == 1 and terms[0][0] == 1.0:
            return terms[0][1]
        return WeightedSum(terms)
    if callable(spec):
        return _Callable(spec)
    raise TypeError(f"{argname} must be a loss name, an nn.Module or a callable, got {type(spec).__name__}")
