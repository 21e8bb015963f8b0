"""Calibration statistics for closed-form (least-squares) layer reconstruction; generic PyTorch.

A :class:`Calibration` holds a few input batches (default 64 samples). :meth:`Calibration.collect`
runs them through a *student* network (and optionally a *teacher*) with forward hooks and, for every
requested conv, accumulates in float64, batch by batch (streaming: memory ``O((C_in k^2)^2)`` per
layer, never ``O(N)``):

* ``X``: the im2col view of the **student** conv's input (:func:`im2col`: the conv's own stride,
  padding, dilation, groups and ``padding_mode``), plus a constant-1 column for the bias;
* ``Y``: the **teacher**'s output at the module ``targets[name]`` (default: the same name), optionally
  restricted to the output channels ``out_index[name]`` (the filters the student kept) -- or the
  student conv's own output when ``teacher is None``.

and stores ``X^T X``, ``X^T Y`` and the per-channel ``sum(Y^2)`` in a :class:`ConvStats`. From these
alone, :meth:`ConvStats.solve` gives the ridge least-squares conv ``(weight, bias)`` mapping the
student's inputs to the teacher's outputs (optionally shrunk toward a prior conv instead of zero) and
:meth:`ConvStats.error` gives the calibration residual ``||X W + b - Y||^2`` of any conv.

A module counts as a conv if it is an ``nn.Conv2d`` or has the conv attributes ``in_channels``,
``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups`` and
``padding_mode`` (e.g. a ``reparam.RepBlock`` in training form, seen as its fused conv).

Early exit: a forward pass stops (a private exception raised from a hook) as soon as every layer
requested from it has been captured, so collecting early layers costs about the forward up to them.

>>> import torch
>>> from prune.calibration import Calibration
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1))
>>> calib = Calibration(torch.rand(16, 3, 12, 12), batch_size=8)
>>> st = calib.collect(net, ["2"])["2"]                  # Y = the conv's own output here
>>> w, b = st.solve(ridge=1e-9)
>>> bool(torch.allclose(w.float(), net[2].weight, atol=1e-4)), st.error(net[2].weight, net[2].bias) < 1e-6
(True, True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reparam import RepBlock
from reparam.utils.modules import eval_mode

__all__ = ["im2col", "conv_geometry", "ConvGeometry", "ConvStats", "Calibration", "DEFAULT_SAMPLES",
           "conv_kernel", "conv_has_bias", "write_conv_kernel", "conv_units"]

#: Default number of calibration samples (patches).
DEFAULT_SAMPLES = 64

_PAD_MODES = ("zeros", "reflect", "replicate", "circular")


# ------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class ConvGeometry:
    """What im2col needs to know about a conv (or a conv-like block)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]   # F.pad order: left, right, top, bottom
    dilation: tuple[int, int]
    groups: int
    padding_mode: str

    @property
    def features(self) -> int:
        """``D = (C_in / G) * kh * kw``: im2col features per group (bias column not included)."""
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(i) for i in v)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def conv_geometry(conv: nn.Module) -> ConvGeometry:
    """The :class:`ConvGeometry` of an ``nn.Conv2d`` or a conv-like module (``TypeError`` otherwise)."""
    need = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")
    if not isinstance(conv, nn.Module) or not all(hasattr(conv, a) for a in need):
        raise TypeError(f"conv must be an nn.Conv2d or a conv-like module, got {type(conv).__name__}")
    if isinstance(conv, nn.Conv2d) and getattr(conv, "transposed", False):
        raise TypeError("conv: transposed convolutions are not supported")
    k, s, d = _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.dilation)
    p = conv.padding
    if isinstance(p, str):
        if p == "valid":
            pad = (0, 0, 0, 0)
        elif p == "same":
            th, tw = d[0] * (k[0] - 1), d[1] * (k[1] - 1)
            pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            raise ValueError(f"conv: unknown padding {p!r}")
    else:
        ph, pw = _pair(p)
        pad = (pw, pw, ph, ph)
    mode = getattr(conv, "padding_mode", "zeros")
    if mode not in _PAD_MODES:
        raise ValueError(f"conv: unknown padding_mode {mode!r}")
    return ConvGeometry(int(conv.in_channels), int(conv.out_channels), k, s, pad, d, int(conv.groups), mode)


# ------------------------------------------------------------------------------ kernels of conv units
def conv_kernel(m: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias or None)`` of a conv unit, detached: an ``nn.Conv2d``'s own, or a ``RepBlock``'s
    fused kernel (its bias only when the fused conv has one)."""
    if isinstance(m, RepBlock):
        with torch.no_grad():
            w, b = m.fused_kernel()
        return w.detach(), (b.detach() if b is not None and m.fused_has_bias else None)
    return m.weight.detach(), (m.bias.detach() if m.bias is not None else None)


def conv_has_bias(m: nn.Module) -> bool:
    """Whether the conv unit (``nn.Conv2d`` or fused ``RepBlock``) has a bias."""
    return bool(m.fused_has_bias) if isinstance(m, RepBlock) else m.bias is not None


@torch.no_grad()
def write_conv_kernel(m: nn.Module, w: Tensor, b: Tensor | None) -> None:
    """Write ``(w, b)`` into a conv unit in place (a ``RepBlock`` through ``load_kernel``), in its dtype."""
    ref = conv_kernel(m)[0]
    w = w.to(device=ref.device, dtype=ref.dtype)
    b = None if b is None else b.to(device=ref.device, dtype=ref.dtype)
    if isinstance(m, RepBlock):
        m.load_kernel(w, b)
    else:
        m.weight.copy_(w)
        if m.bias is not None and b is not None:
            m.bias.copy_(b)


def im2col(x: Tensor, conv: nn.Module | ConvGeometry) -> Tensor:
    """im2col view of a conv's input: ``[G, N, D]`` with ``N = B * H_out * W_out`` (rows in
    ``(b, h, w)`` order, i.e. the order of ``conv(x).permute(0, 2, 3, 1)``) and
    ``D = (C_in / G) * kh * kw`` in the order of ``weight.flatten(1)``.

    Padding is applied with ``F.pad`` in the conv's ``padding_mode``, then ``F.unfold`` with its
    kernel size, dilation and stride, so ``im2col(x, conv)[g] @ weight_g.flatten(1).T + bias_g`` equals
    the conv's output channels of group ``g``.
    """
    geo = conv if isinstance(conv, ConvGeometry) else conv_geometry(conv)
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected an NCHW tensor, got {got}")
    if x.shape[1] != geo.in_channels:
        raise ValueError(f"x: {x.shape[1]} channels, the conv expects {geo.in_channels}")
    if any(geo.pad):
        if geo.padding_mode == "zeros":
            x = F.pad(x, list(geo.pad))
        else:
            x = F.pad(x, list(geo.pad), mode=geo.padding_mode)
    b = x.shape[0]
    cols = F.unfold(x, geo.kernel_size, dilation=geo.dilation, padding=0, stride=geo.stride)  # [B, C*k*k, L]
    g = geo.groups
    cols = cols.view(b, g, geo.features, cols.shape[-1]).permute(1, 0, 3, 2)                  # [G, B, L, D]
    return cols.reshape(g, -1, geo.features)


# ---------------------------------------------------------------------------------------- stats
@dataclass
class ConvStats:
    """Streaming least-squares statistics of one conv (float64).

    ``xtx``: ``[G, D+1, D+1]`` (the last feature is the constant 1 of the bias); ``xty``:
    ``[G, D+1, O/G]``; ``yty``: ``[O]`` per-output-channel ``sum(Y^2)``; ``count``: rows accumulated
    (``N`` = samples x output pixels); ``weight_shape``: ``(O, C_in/G, kh, kw)``.
    """

    xtx: Tensor
    xty: Tensor
    yty: Tensor
    count: int
    weight_shape: tuple[int, int, int, int]

    @property
    def groups(self) -> int:
        return self.xtx.shape[0]

    @property
    def features(self) -> int:
        return self.xtx.shape[1] - 1

    @classmethod
    def empty(cls, geo: ConvGeometry, out_channels: int, device: torch.device | None = None) -> "ConvStats":
        g, d = geo.groups, geo.features
        if out_channels % g:
            raise ValueError(f"out_channels={out_channels} is not divisible by groups={g}")
        kw = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(g, d + 1, d + 1, **kw), torch.zeros(g, d + 1, out_channels // g, **kw),
                   torch.zeros(out_channels, **kw), 0,
                   (out_channels, geo.in_channels // g, geo.kernel_size[0], geo.kernel_size[1]))

    @torch.no_grad()
    def update(self, cols: Tensor, y: Tensor) -> None:
        """Accumulate one batch: ``cols`` ``[G, N, D]`` (from :func:`im2col`), ``y`` ``[B, O, H, W]``
        (or ``[N, O]``) with ``N = B*H*W`` rows in the same order."""
        g, n, d = cols.shape
        if y.dim() == 4:
            y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
        if y.shape[0] != n:
            raise ValueError(f"y: {y.shape[0]} rows for {n} input rows (does the target have the conv's "
                             "output resolution?)")
        if y.shape[1] != self.yty.numel():
            raise ValueError(f"y: {y.shape[1]} channels, the statistics expect {self.yty.numel()}")
        x = cols.to(torch.float64)
        x = torch.cat([x, x.new_ones(g, n, 1)], dim=2)
        yy = y.to(torch.float64)
        yg = yy.reshape(n, g, -1).permute(1, 0, 2)
        self.xtx += x.transpose(1, 2) @ x
        self.xty += x.transpose(1, 2) @ yg
        self.yty += yy.pow(2).sum(0)
        self.count += n

    def merge(self, other: "ConvStats") -> "ConvStats":
        """Statistics of the union of both row sets (a new object)."""
        if not isinstance(other, ConvStats) or other.xtx.shape != self.xtx.shape or other.xty.shape != self.xty.shape:
            raise ValueError("other: ConvStats of a different layer shape")
        return ConvStats(self.xtx + other.xtx, self.xty + other.xty, self.yty + other.yty,
                         self.count + other.count, self.weight_shape)

    # ------------------------------------------------------------------ derived
    def mean(self) -> Tensor:
        """``[G, D]``: mean of each im2col feature over the calibration rows."""
        self._check_rows()
        return self.xtx[:, -1, :-1] / self.count

    def feature_covariance(self, centered: bool = False) -> Tensor:
        """``[G, D, D]``: ``X^T X / N`` (second moment), or the covariance when ``centered``."""
        self._check_rows()
        m = self.xtx[:, :-1, :-1] / self.count
        if centered:
            mu = self.mean()
            m = m - mu.unsqueeze(2) * mu.unsqueeze(1)
        return m

    def channel_covariance(self, centered: bool = False) -> Tensor:
        """``[G, C_in/G, C_in/G]``: second moment of the input channels, summed over the kernel
        taps (``sum_t E[x_{c,t} x_{c',t}]``)."""
        cov = self.feature_covariance(centered)
        g, (_, cg, kh, kw) = self.groups, self.weight_shape
        t = kh * kw
        return cov.view(g, cg, t, cg, t).diagonal(dim1=2, dim2=4).sum(-1)

    def _check_rows(self) -> None:
        if self.count <= 0:
            raise ValueError("calibration: no rows were accumulated (empty calibration)")

    def _stack(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``[G, D+1, O/G]`` = ``[W_g^T ; b_g]`` in the statistics' layout, float64."""
        o = self.weight_shape[0]
        if tuple(weight.shape) != tuple(self.weight_shape):
            raise ValueError(f"weight: shape {tuple(weight.shape)}, the statistics are for {self.weight_shape}")
        g = self.groups
        w = weight.detach().to(device=self.xtx.device, dtype=torch.float64).reshape(g, o // g, -1).transpose(1, 2)
        b = torch.zeros(o, dtype=torch.float64, device=self.xtx.device) if bias is None else \
            bias.detach().to(device=self.xtx.device, dtype=torch.float64).reshape(o)
        return torch.cat([w, b.view(g, 1, o // g)], dim=1)

    def error(self, weight: Tensor, bias: Tensor | None, reduction: str = "sum") -> Tensor | float:
        """Calibration residual ``||X W^T + b - Y||^2`` from the statistics alone: a float
        (``reduction="sum"``) or the ``[O]`` per-output-channel residuals (``"none"``)."""
        self._check_rows()
        wt = self._stack(weight, bias)                                   # [G, D+1, O/G]
        quad = (wt * (self.xtx @ wt)).sum(1)                             # [G, O/G]
        cross = (wt * self.xty).sum(1)
        per = (self.yty - 2 * cross.reshape(-1) + quad.reshape(-1)).clamp_min(0.0)
        if reduction == "none":
            return per
        if reduction != "sum":
            raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
        return float(per.sum())

    def relative_error(self, weight: Tensor, bias: Tensor | None) -> float:
        """:meth:`error` divided by ``sum(Y^2)`` (0 for a perfect fit, 1 for a zero output)."""
        return float(self.error(weight, bias)) / max(float(self.yty.sum()), 1e-300)

    def regularizer(self, ridge: float) -> Tensor:
        """``[G]``: the absolute ridge ``ridge * trace(X^T X) / D`` per group (scale-free ``ridge``)."""
        d = self.features
        tr = self.xtx[:, :-1, :-1].diagonal(dim1=1, dim2=2).sum(-1) / max(d, 1)
        return ridge * torch.where(tr > 0, tr, torch.ones_like(tr))

    def solve(self, ridge: float = 1e-3, prior: tuple[Tensor, Tensor | None] | None = None,
              bias: bool = True) -> tuple[Tensor, Tensor | None]:
        """Ridge least squares: ``argmin ||X W^T + b - Y||^2 + lam ||W - W_prior||^2`` with
        ``lam = ridge * trace(X^T X) / D`` (scale-free; the bias is not penalised). ``prior``:
        ``(weight, bias)`` to shrink toward (default zero). ``bias=False`` fits a bias-free conv.

        Returns float64 ``(weight [O, C_in/G, kh, kw], bias [O] or None)``.
        """
        self._check_rows()
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
            raise ValueError(f"ridge must be a finite float >= 0, got {ridge!r}")
        g, d1 = self.groups, self.features + 1
        o = self.weight_shape[0]
        lam = self.regularizer(float(ridge))
        eye = torch.eye(d1, dtype=torch.float64, device=self.xtx.device)
        eye[-1, -1] = 0.0                                               # bias unpenalised
        a = self.xtx + lam.view(g, 1, 1) * eye
        rhs = self.xty.clone()
        if prior is not None:
            pw, pb = prior
            w0 = self._stack(pw, pb if bias else None)
            w0[:, -1] = 0.0
            rhs = rhs + lam.view(g, 1, 1) * w0
        if not bias:
            a, rhs = a[:, :-1, :-1], rhs[:, :-1]
        sol = _spd_solve(a, rhs)                                        # [G, D(+1), O/G]
        w = sol[:, : d1 - 1].transpose(1, 2).reshape(self.weight_shape)
        b = sol[:, -1].reshape(o) if bias else None
        return w, b

    def refit_without(self, weight: Tensor, bias: Tensor | None, channels: Sequence[int],
                      ridge: float = 1e-3) -> tuple[Tensor, Tensor | None]:
        """The conv that best keeps its *own* output ``X W^T + b`` (on these rows) once its input
        ``channels`` are removed: ``W_K + Sigma_KK^-1 Sigma_KR W_R`` on the kept im2col features ``K``
        (the constant-1 column included when ``bias`` is given, so the removed channels' mean is folded
        into the bias), with a scale-free ridge on ``Sigma_KK`` (``ridge`` times its mean diagonal over the
        kept features; the constant is not penalised), as in :meth:`solve`. Needs no
        target: it is the closed-form local refit the teacher's statistics allow before any student
        exists. Dense convs only (``groups == 1``).

        Returns float64 ``(weight, bias)`` with the removed channels' columns zero.
        """
        self._check_rows()
        if self.groups != 1:
            raise ValueError(f"refit_without: dense convs only (this one has groups={self.groups})")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
            raise ValueError(f"ridge must be a finite float >= 0, got {ridge!r}")
        _, c_in, kh, kw = self.weight_shape
        gone = sorted({int(c) for c in channels})
        if any(c < 0 or c >= c_in for c in gone):
            raise ValueError(f"channels: input channels must be in [0, {c_in}), got {gone}")
        wt = self._stack(weight, bias)[0]                                # [D+1, O]
        if not gone:
            return weight.detach().to(torch.float64).clone(), None if bias is None else wt[-1].clone()
        t = kh * kw
        removed = torch.zeros(self.features + 1, dtype=torch.bool, device=wt.device)
        for c in gone:
            removed[c * t:(c + 1) * t] = True
        keep = ~removed
        if bias is None:
            keep[-1] = False
        a = self.xtx[0][keep][:, keep].clone()
        n_k = int(keep[:-1].sum())
        if n_k:
            lam = float(ridge) * float(a.diagonal()[:n_k].sum()) / n_k
            a.diagonal()[:n_k] += lam if lam > 0 else 0.0
        new = torch.zeros_like(wt)
        if bool(keep.any()):
            rhs = self.xtx[0][keep][:, removed] @ wt[removed]
            new[keep] = wt[keep] + _spd_solve(a.unsqueeze(0), rhs.unsqueeze(0))[0]
        w = new[:-1].transpose(0, 1).reshape(self.weight_shape)
        return w, None if bias is None else new[-1]


def _spd_solve(a: Tensor, b: Tensor) -> Tensor:
    """Solve ``a x = b`` for symmetric positive (semi-)definite ``a`` (Cholesky; least squares fallback)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info.max()) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(a, b).solution


# ---------------------------------------------------------------------------------- calibration
class _Stop(Exception):
    """Raised from a hook once a pass has captured everything it needs."""


def _as_batches(inputs: Any, batch_size: int) -> list[Tensor]:
    if type(inputs).__module__ == "numpy" and hasattr(inputs, "__array__"):  # an N x C x H x W float array
        import numpy as np

        if not np.issubdtype(inputs.dtype, np.floating):
            raise TypeError(f"inputs: a numpy array of calibration images must be float, got {inputs.dtype}")
        inputs = torch.from_numpy(np.ascontiguousarray(inputs))
    if isinstance(inputs, Tensor):
        if inputs.dim() == 3:
            inputs = inputs.unsqueeze(0)
        if inputs.dim() != 4:
            raise ValueError(f"inputs: expected NCHW batches, got a tensor of shape {tuple(inputs.shape)}")
        if inputs.shape[0] == 0:
            raise ValueError("inputs: empty calibration set (0 samples)")
        return list(inputs.split(batch_size))
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        raise TypeError(f"inputs must be a tensor, a float numpy array or a sequence of NCHW tensors, got "
                        f"{type(inputs).__name__}")
    batches = []
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise TypeError(f"inputs[{i}] must be a tensor, got {type(t).__name__}")
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4:
            raise ValueError(f"inputs[{i}]: expected an NCHW batch, got shape {tuple(t.shape)}")
        if t.shape[0]:
            batches.append(t)
    if not batches:
        raise ValueError("inputs: empty calibration set (no batches)")
    return batches


class Calibration:
    """Calibration inputs and the hooks that turn them into :class:`ConvStats`.

    Args:
        inputs: one ``[N, C, H, W]`` tensor (split into ``batch_size`` chunks) or a sequence of NCHW
            batches (all with the same channels), in the networks' input range.
        batch_size: rows of a tensor ``inputs`` per forward pass.
        input_range: if given, the maximum value the networks expect (e.g. 255): inputs outside
            ``[0, input_range]``, or all below 1/32 of it (a ``[0, 1]`` image fed to a ``0-255`` net),
            raise ``ValueError``.
        channels: if given, the number of input channels the networks expect.
        rows_per_batch: if given, each layer's statistics use at most this many rows (output pixels)
            of each batch: a fixed random subset drawn with ``seed`` (the same rows for the student
            and the teacher). Bounds the cost of ``X^T X`` on large inputs.
        seed: seed of that subset (results are deterministic for a seed).
    """

    def __init__(self, inputs: Tensor | Sequence[Tensor], batch_size: int = 8, *,
                 input_range: float | None = None, channels: int | None = None,
                 rows_per_batch: int | None = None, seed: int = 0) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if rows_per_batch is not None and (isinstance(rows_per_batch, bool) or not isinstance(rows_per_batch, int)
                                           or rows_per_batch < 1):
            raise ValueError(f"rows_per_batch must be None or an int >= 1, got {rows_per_batch!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.rows_per_batch, self.seed = rows_per_batch, seed
        batches = _as_batches(inputs, batch_size)
        c = batches[0].shape[1]
        if channels is not None and c != channels:
            raise ValueError(f"inputs: {c} channels, the network expects {channels}")
        for i, t in enumerate(batches):
            if t.shape[1] != c:
                raise ValueError(f"inputs: batch {i} has {t.shape[1]} channels, batch 0 has {c}")
            if not t.is_floating_point():
                raise ValueError(f"inputs: batch {i} is {t.dtype}, expected a floating-point tensor")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"inputs: batch {i} contains NaN or infinite values")
        if input_range is not None:
            if isinstance(input_range, bool) or not isinstance(input_range, (int, float)) or not input_range > 0:
                raise ValueError(f"input_range must be a positive number, got {input_range!r}")
            lo = min(float(t.min()) for t in batches)
            hi = max(float(t.max()) for t in batches)
            if lo < -1e-3 * input_range or hi > input_range * (1 + 1e-3):
                raise ValueError(f"inputs: values in [{lo:.4g}, {hi:.4g}] are outside [0, {input_range:g}] "
                                 "(input_range)")
            if hi < input_range / 32:
                raise ValueError(f"inputs: values in [{lo:.4g}, {hi:.4g}] but input_range={input_range:g}: "
                                 "are the inputs in the wrong scale (e.g. [0, 1] for a 0-255 network)?")
        self.batches: list[Tensor] = [t.detach() for t in batches]
        self.input_range = input_range

    def __len__(self) -> int:
        return sum(t.shape[0] for t in self.batches)

    @property
    def num_batches(self) -> int:
        return len(self.batches)

    def _rows(self, batch: int, n: int, device: torch.device) -> Tensor | None:
        """The fixed row subset of batch ``batch`` for a layer with ``n`` rows (None: all rows)."""
        if self.rows_per_batch is None or n <= self.rows_per_batch:
            return None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + batch * 7919 + n)
        return torch.randperm(n, generator=g)[: self.rows_per_batch].sort().values.to(device)

    # ---------------------------------------------------------------- forward helpers
    @staticmethod
    def _run(model: nn.Module, x: Tensor) -> None:
        p = next(model.parameters(), None)
        if p is not None:
            x = x.to(device=p.device, dtype=p.dtype)
        try:
            with torch.no_grad():
                model(x)
        except _Stop:
            pass

    @torch.no_grad()
    def outputs(self, model: nn.Module, max_batches: int | None = None) -> list[Tensor]:
        """The model's outputs on the calibration batches (eval mode, no grad)."""
        with eval_mode(model):
            out = []
            p = next(model.parameters(), None)
            for x in self.batches[:max_batches]:
                if p is not None:
                    x = x.to(device=p.device, dtype=p.dtype)
                out.append(model(x))
            return out

    def collect(self, student: nn.Module, names: Sequence[str], teacher: nn.Module | None = None,
                targets: Mapping[str, str] | None = None,
                out_index: Mapping[str, Sequence[int] | Tensor] | None = None,
                teacher_inputs: Sequence[Tensor] | None = None,
                residual: Mapping[str, Sequence[int] | Tensor] | None = None) -> dict[str, ConvStats]:
        """:class:`ConvStats` of the student convs ``names`` (see the module docstring).

        Args:
            student: the network whose conv inputs form ``X``.
            names: conv (or conv-like) module names in ``student``.
            teacher: the network whose outputs form ``Y``; None: the student's own conv outputs.
            targets: ``{name: teacher module name}`` for ``Y`` (default the same name).
            out_index: ``{name: teacher output channels}`` kept by the student conv (default all).
            teacher_inputs: batches fed to the teacher instead of the calibration batches (one per
                calibration batch; used to run a teacher *block* on its own cached inputs).
            residual: ``{name: teacher input channels}`` for convs whose output is added to their own
                input (``y = conv(x) + x``): the target becomes ``Y_t + x_t[:, idx] - x_s`` so that the
                student's *sum* matches the teacher's (it corrects the drift of ``x_s``). Needs the
                conv's output to have its input's shape.
        """
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
        if isinstance(names, str):
            names = [names]
        names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("names: no layers requested")
        smods = dict(student.named_modules())
        tmods = dict(teacher.named_modules()) if teacher is not None else {}
        targets = dict(targets or {})
        out_index = dict(out_index or {})
        geos: dict[str, ConvGeometry] = {}
        idx: dict[str, Tensor | None] = {}
        for n in names:
            if n not in smods:
                raise ValueError(f"names: no module {n!r} in the student")
            geos[n] = conv_geometry(smods[n])
            t = targets.get(n, n)
            if teacher is not None and t not in tmods:
                raise ValueError(f"targets: no module {t!r} in the teacher")
            oi = out_index.get(n)
            idx[n] = None if oi is None else torch.as_tensor(list(oi) if not isinstance(oi, Tensor) else oi,
                                                             dtype=torch.long)
            if idx[n] is not None and idx[n].numel() != geos[n].out_channels:
                raise ValueError(f"out_index: {idx[n].numel()} channels for {n!r}, which has "
                                 f"{geos[n].out_channels} outputs")
        stats = {n: ConvStats.empty(geos[n], geos[n].out_channels) for n in names}

        cur_x: dict[str, Tensor] = {}
        cur_y: dict[str, Tensor] = {}
        res_s: dict[str, Tensor] = {}
        res_t: dict[str, Tensor] = {}
        residual = {n: torch.as_tensor(list(v) if not isinstance(v, Tensor) else v, dtype=torch.long)
                    for n, v in (residual or {}).items() if n in geos}
        if residual and teacher is None:
            raise ValueError("residual: needs a teacher")

        def select(n: str, out: Any) -> Tensor:
            out = out[0] if isinstance(out, (tuple, list)) else out
            if idx[n] is not None:
                out = out.index_select(1, idx[n].to(out.device))
            return out.detach()

        def s_hook(n: str):
            def hook(_m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
                if n in cur_x:
                    return
                cur_x[n] = im2col(inp[0].detach(), geos[n])
                if n in residual:
                    res_s[n] = inp[0].detach()
                if teacher is None:
                    first = out[0] if isinstance(out, (tuple, list)) else out
                    cur_y[n] = select(n, out) if idx[n] is not None else first.detach()
                if len(cur_x) == len(names):
                    raise _Stop
            return hook

        by_target: dict[str, list[str]] = {}
        for n in names:
            by_target.setdefault(targets.get(n, n), []).append(n)

        def t_hook(t: str):
            def hook(_m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
                for n in by_target[t]:
                    if n not in cur_y:
                        cur_y[n] = select(n, out)
                        if n in residual:
                            res_t[n] = inp[0].detach().index_select(1, residual[n].to(inp[0].device))
                if len(cur_y) == len(names):
                    raise _Stop
            return hook

        if teacher_inputs is not None and len(teacher_inputs) != len(self.batches):
            raise ValueError(f"teacher_inputs: {len(teacher_inputs)} batches for {len(self.batches)} calibration "
                             "batches")
        models = [student] + ([teacher] if teacher is not None else [])
        handles = [smods[n].register_forward_hook(s_hook(n)) for n in names]
        if teacher is not None:
            handles += [tmods[t].register_forward_hook(t_hook(t)) for t in by_target]
        with eval_mode(*models, hooks=handles):
            for b, x in enumerate(self.batches):
                cur_x.clear()
                cur_y.clear()
                res_s.clear()
                res_t.clear()
                if teacher is not None:
                    self._run(teacher, x if teacher_inputs is None else teacher_inputs[b])
                self._run(student, x)
                missing = [n for n in names if n not in cur_x or n not in cur_y]
                if missing:
                    raise ValueError(f"names: {missing} did not run in the forward pass (batch {b})")
                for n in names:
                    cols, y = cur_x[n], cur_y[n]
                    if n in residual:
                        if res_t[n].shape != y.shape or res_s[n].shape != y.shape:
                            raise ValueError(f"residual: {n!r} output {tuple(y.shape)} does not have its input's "
                                             f"shape {tuple(res_s[n].shape)}")
                        y = y + res_t[n].to(y) - res_s[n].to(y)
                    y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]) if y.dim() == 4 else y
                    rows = self._rows(b, cols.shape[1], cols.device)
                    if rows is not None:
                        cols, y = cols.index_select(1, rows), y.index_select(0, rows.to(y.device))
                    stats[n].update(cols, y)
        cur_x.clear()
        cur_y.clear()
        return stats

    @torch.no_grad()
    def module_inputs(self, model: nn.Module, name: str) -> list[Tensor]:
        """The first positional input of module ``name`` on each calibration batch (the forward stops
        there). ``O(N)`` memory: used to run one block at a time."""
        mods = dict(model.named_modules())
        if name not in mods:
            raise ValueError(f"name: no module {name!r} in the model")
        got: list[Tensor] = []

        def pre(_m: nn.Module, inp: tuple[Any, ...]) -> None:
            got.append(inp[0].detach())
            raise _Stop

        with eval_mode(model, hooks=[mods[name].register_forward_pre_hook(pre)]):
            out = []
            for b, x in enumerate(self.batches):
                got.clear()
                self._run(model, x)
                if not got:
                    raise ValueError(f"name: {name!r} did not run in the forward pass (batch {b})")
                out.append(got[0])
        return out

    def derived(self, batches: Sequence[Tensor]) -> "Calibration":
        """A calibration over other batches (e.g. a block's cached inputs) with the same row subsets."""
        if len(batches) != len(self.batches):
            raise ValueError(f"batches: {len(batches)} batches for {len(self.batches)} calibration batches")
        new = object.__new__(Calibration)
        new.batches = list(batches)
        new.input_range, new.rows_per_batch, new.seed = None, self.rows_per_batch, self.seed
        return new

    @torch.no_grad()
    def input_means(self, model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
        """``{name: [G, D]}``: mean im2col feature of each conv's input over all calibration rows
        (one forward per batch; float64). Cheap: no ``X^T X``."""
        mods = dict(model.named_modules())
        names = list(dict.fromkeys(names))
        for n in names:
            if n not in mods:
                raise ValueError(f"names: no module {n!r} in the model")
        geos = {n: conv_geometry(mods[n]) for n in names}
        sums = {n: torch.zeros(geos[n].groups, geos[n].features, dtype=torch.float64) for n in names}
        counts = dict.fromkeys(names, 0)

        def hook(n: str):
            def h(_m: nn.Module, inp: tuple[Any, ...], _out: Any) -> None:
                cols = im2col(inp[0].detach(), geos[n])
                sums[n] += cols.to(torch.float64).sum(1).cpu()
                counts[n] += cols.shape[1]
            return h

        with eval_mode(model, hooks=[mods[n].register_forward_hook(hook(n)) for n in names]):
            for x in self.batches:
                self._run(model, x)
        missing = [n for n in names if counts[n] == 0]
        if missing:
            raise ValueError(f"names: {missing} did not run in the forward pass")
        return {n: sums[n] / counts[n] for n in names}

    def execution_order(self, model: nn.Module, names: Sequence[str] | None = None) -> list[str]:
        """Names of the modules (default: every conv-like module) in the order they first run on
        one calibration batch."""
        mods = dict(model.named_modules())
        if names is None:
            names = [n for n, m in mods.items() if n and _is_conv_like(m)]
        order: list[str] = []
        seen: set[str] = set()

        def pre(n: str):
            def hook(_m: nn.Module, _inp: Any) -> None:
                if n not in seen:
                    seen.add(n)
                    order.append(n)
            return hook

        with eval_mode(model, hooks=[mods[n].register_forward_pre_hook(pre(n)) for n in names]):
            self._run(model, self.batches[0][:1])
        return order


def _is_conv_like(m: nn.Module) -> bool:
    if isinstance(m, nn.Conv2d):
        return not m.transposed
    return all(hasattr(m, a) for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                                        "dilation", "groups", "padding_mode")) and hasattr(m, "fused_kernel")


def conv_units(model: nn.Module) -> dict[str, nn.Module]:
    """Conv-like units by name: outermost ``RepBlock``s and ``nn.Conv2d`` not inside one."""
    out: dict[str, nn.Module] = {}

    def walk(m: nn.Module, prefix: str) -> None:
        for name, child in m.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, RepBlock) or (isinstance(child, nn.Conv2d) and not child.transposed):
                out[full] = child
            else:
                walk(child, full)

    if isinstance(model, RepBlock) or isinstance(model, nn.Conv2d):
        out[""] = model
    else:
        walk(model, "")
    return out
