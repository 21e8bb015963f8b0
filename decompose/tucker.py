"""Tucker-2 decomposition of one ``nn.Conv2d`` and its exact inverse.

A conv kernel ``W`` (``Cout x Cin x kh x kw``) is approximated along its two channel modes,
``W ~= core x_0 U_out x_1 U_in`` with ``core`` (``r_out x r_in x kh x kw``), ``U_out`` (``Cout x r_out``) and
``U_in`` (``Cin x r_in``), by tensorly's ``partial_tucker`` (HOOI, SVD initialisation). As layers:

1. 1x1 conv ``Cin -> r_in`` (weight ``U_in^T``, no bias),
2. ``kh x kw`` conv ``r_in -> r_out`` (the core) with the original stride, padding, dilation, padding_mode,
3. 1x1 conv ``r_out -> Cout`` (weight ``U_out``) with the original bias.

This is exact for every padding mode: the first layer is a bias-free channel mix, which commutes with
zero, reflect, replicate and circular padding.

The decomposition runs on a float64 numpy copy under a thread-local numpy tensorly backend
(:func:`decompose._backend.numpy_backend`): float64 makes a full-rank decomposition exact to rounding, the
numpy path is deterministic on CPU whatever device the model is on, it needs no autograd bookkeeping, and the
user's tensorly backend (global or per-thread) is never changed.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from ._backend import numpy_backend
from ._blas import single_threaded_blas
from .ranks import resolve_rank
from reparam import kernels as K

__all__ = ["TuckerConv", "tucker_conv", "recompose", "check_conv", "tucker_factors"]


class TuckerConv(nn.Sequential):
    """``nn.Sequential(first 1x1, core kxk, last 1x1)`` produced by :func:`tucker_conv`.

    A plain ``nn.Sequential`` subclass (state-dict keys ``0.weight``, ``1.weight``, ``2.weight``, ``2.bias``)
    that also knows its ranks and can fuse itself back with :meth:`recompose`.
    """

    @property
    def ranks(self) -> tuple[int, int]:
        """``(r_out, r_in)``."""
        return self[1].out_channels, self[1].in_channels

    def recompose(self) -> nn.Conv2d:
        return recompose(self)


def check_conv(conv: Any, name: str = "conv") -> nn.Conv2d:
    """``conv`` if it is a plain, ungrouped ``nn.Conv2d``; ``TypeError``/``ValueError`` otherwise."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    if type(conv).forward is not nn.Conv2d.forward:
        raise TypeError(f"{name}: {type(conv).__name__} overrides Conv2d.forward; only plain convolutions are "
                        "supported")
    if conv.groups != 1:
        raise ValueError(f"{name}: grouped/depthwise convs (groups={conv.groups}) are not Tucker-decomposed")
    if not torch.is_floating_point(conv.weight):
        raise TypeError(f"{name}: weight must be floating point, got {conv.weight.dtype}")
    return conv


def tucker_factors(weight: np.ndarray, ranks: tuple[int, int], n_iter_max: int = 100, tol: float = 1e-7,
                   random_state: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(core, U_out, U_in)`` of the partial Tucker decomposition of ``weight`` over modes 0 and 1 (float64)."""
    from tensorly.decomposition import partial_tucker

    w = np.ascontiguousarray(weight, dtype=np.float64)
    with numpy_backend(), single_threaded_blas(), warnings.catch_warnings():
        # ranks above an unfolding's rank are padded with orthogonal columns by tensorly; its warning is noise
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        result = partial_tucker(w, rank=list(ranks), modes=[0, 1], init="svd", svd="truncated_svd",
                                n_iter_max=n_iter_max, tol=tol, random_state=random_state)
    # tensorly >= 0.9 returns ((core, factors), errors); older releases returned (core, factors)
    if isinstance(result[0], np.ndarray):
        core, factors = result
    else:
        (core, factors), _ = result
    u_out, u_in = (np.asarray(f, dtype=np.float64) for f in factors)
    return np.asarray(core, dtype=np.float64), u_out, u_in


def tucker_conv(conv: nn.Conv2d, rank: Any = None, *, energy: float | None = None, n_iter_max: int = 100,
                tol: float = 1e-7, random_state: int = 0) -> TuckerConv:
    """Tucker-2 decompose ``conv`` into ``1x1 (Cin->r_in) -> kxk core (r_in->r_out) -> 1x1 (r_out->Cout)``.

    ``rank``: ``(r_out, r_in)`` or an int for both (``1 <= r <= channels``); a float in ``(0, 1]``, the fraction
    of the conv's parameters to keep; or ``"vbmf"`` (analytical EVBMF on the mode-0/1 unfoldings, at least 1).
    Alternatively ``energy=e``: the fraction of squared-singular-value energy kept per mode.
    The result has ``conv``'s dtype, device and training flag; ``conv`` is not modified.
    Invalid ranks raise ``ValueError`` (wrong types raise :class:`~decompose.ranks.RankError`, which is both a
    ``ValueError`` and a ``TypeError``).
    """
    check_conv(conv)
    weight = conv.weight.detach().to("cpu", torch.float64).numpy()
    ranks = resolve_rank(weight, conv.bias is not None, rank, energy)
    core, u_out, u_in = tucker_factors(weight, ranks, n_iter_max=n_iter_max, tol=tol, random_state=random_state)
    return build_tucker_conv(conv, core, u_out, u_in)


def build_tucker_conv(conv: nn.Conv2d, core: np.ndarray, u_out: np.ndarray, u_in: np.ndarray) -> TuckerConv:
    cout, cin = conv.out_channels, conv.in_channels
    r_out, r_in = core.shape[:2]
    kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    first = nn.Conv2d(cin, r_in, 1, bias=False, **kw)
    mid = nn.Conv2d(r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **kw)
    last = nn.Conv2d(r_out, cout, 1, bias=conv.bias is not None, **kw)
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(np.ascontiguousarray(u_in.T)).reshape(r_in, cin, 1, 1))
        mid.weight.copy_(torch.from_numpy(np.ascontiguousarray(core)))
        last.weight.copy_(torch.from_numpy(np.ascontiguousarray(u_out)).reshape(cout, r_out, 1, 1))
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach())
    seq = TuckerConv(first, mid, last)
    seq.train(conv.training)
    return seq


def _is_pointwise(c: nn.Conv2d) -> bool:
    pad = c.padding
    no_pad = pad == "valid" or pad == "same" or (isinstance(pad, tuple) and all(p == 0 for p in pad))
    return (c.kernel_size == (1, 1) and c.stride == (1, 1) and c.dilation == (1, 1) and c.groups == 1
            and no_pad and type(c).forward is nn.Conv2d.forward)


def recompose(seq: nn.Sequential) -> nn.Conv2d:
    """The single ``nn.Conv2d`` equal to a Tucker sequence ``(1x1, kxk core, 1x1)`` (exact product).

    Works for any ``nn.Sequential`` of three plain convs of that shape (e.g. after fine-tuning), including
    biases on the core and the last conv. A bias on the *first* conv is folded too, except with zero padding on
    a padded core, where it is not exactly representable by one conv (borders differ): ``ValueError``.
    The product is computed in float64 and cast to the core's dtype.
    """
    if not isinstance(seq, nn.Sequential) or len(seq) != 3 or not all(isinstance(m, nn.Conv2d) for m in seq):
        raise TypeError("seq must be an nn.Sequential of three nn.Conv2d (1x1, kxk, 1x1)")
    first, mid, last = seq
    for m, which in ((first, "first"), (last, "last")):
        if not _is_pointwise(m):
            raise ValueError(f"seq: the {which} conv must be a plain 1x1 conv (stride 1, no padding, groups 1)")
    check_conv(mid, "seq[1]")
    if first.out_channels != mid.in_channels or mid.out_channels != last.in_channels:
        raise ValueError("seq: channel counts do not chain (first.out == core.in, core.out == last.in)")
    if first.bias is not None:
        padded = (mid.padding == "same" and mid.kernel_size != (1, 1)) or (
            isinstance(mid.padding, tuple) and any(p > 0 for p in mid.padding))
        if padded and mid.padding_mode == "zeros":
            raise ValueError("seq: a bias on the first conv before a zero-padded core cannot be folded exactly")

    def f64(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to("cpu", torch.float64)

    # the kernel algebra is reparam's: 1x1 -> kxk, then kxk -> 1x1 (a bias on the first conv is folded
    # through the core, exact here since the core's padding is not zeros or there is none)
    inner = K.merge_sequential((f64(first.weight), f64(first.bias)), (f64(mid.weight), f64(mid.bias)))
    weight, bias = K.merge_sequential(inner, (f64(last.weight), f64(last.bias)))
    has_bias = any(m.bias is not None for m in seq)
    out = nn.Conv2d(first.in_channels, last.out_channels, mid.kernel_size, stride=mid.stride, padding=mid.padding,
                    dilation=mid.dilation, bias=has_bias, padding_mode=mid.padding_mode,
                    device=mid.weight.device, dtype=mid.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if has_bias:
            out.bias.copy_(bias)
    out.train(mid.training)
    return out
