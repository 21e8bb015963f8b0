"""Choosing Tucker-2 ranks ``(r_out, r_in)`` for a conv kernel of shape ``(Cout, Cin, kh, kw)``.

Rank specifications (see :func:`resolve_rank`):

* ``(r_out, r_in)`` (or one ``int`` for both): used as given; each must satisfy ``1 <= r <= C``.
* a ``float`` ``f`` in ``(0, 1]``: keep about ``f`` of the conv's parameters (weight and bias). The ranks
  are the *largest balanced* pair that fits the budget: among all pairs whose decomposed parameter count
  is ``<= f * params``, maximise ``min(r_out / Cout, r_in / Cin)`` (so the Cout:Cin ratio is preserved as
  far as integers allow), then the parameter count. If even ``(1, 1)`` is over budget, ``(1, 1)``.
* ``"vbmf"``: analytical EVBMF on the mode-0 (``Cout x Cin*kh*kw``) and mode-1 (``Cin x Cout*kh*kw``)
  unfoldings, each clamped to ``[1, C]``.
* ``energy=e`` in ``(0, 1]``: the smallest rank per mode whose leading singular values of that mode's
  unfolding hold at least ``e`` of the squared-singular-value energy.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

from ._blas import single_threaded_blas
from .vbmf import evbmf_rank

__all__ = ["RankError", "tucker_params", "conv_params", "ranks_for_fraction", "ranks_for_energy",
           "ranks_vbmf", "check_ranks", "resolve_rank"]


class RankError(ValueError, TypeError):
    """A rank of the wrong type: a ``ValueError`` (like every invalid rank) that is also a ``TypeError``."""


def conv_params(cout: int, cin: int, kh: int, kw: int, bias: bool) -> int:
    return cout * cin * kh * kw + (cout if bias else 0)


def tucker_params(cout: int, cin: int, kh: int, kw: int, bias: bool, r_out: int, r_in: int) -> int:
    """Parameters of the Tucker-2 sequence: 1x1 Cin->r_in, kh x kw r_in->r_out, 1x1 r_out->Cout (+bias)."""
    return cin * r_in + r_in * r_out * kh * kw + r_out * cout + (cout if bias else 0)


def ranks_for_fraction(cout: int, cin: int, kh: int, kw: int, bias: bool, fraction: float) -> tuple[int, int]:
    """The largest balanced ``(r_out, r_in)`` whose sequence keeps at most ``fraction`` of the parameters."""
    budget = fraction * conv_params(cout, cin, kh, kw, bias)
    fixed = cout if bias else 0
    k2 = kh * kw
    best: tuple[float, int, int, int] | None = None  # (balance, params, r_out, r_in)
    for r_out in range(1, cout + 1):
        # params are linear in r_in for a fixed r_out: cin*r_in + k2*r_out*r_in + r_out*cout + fixed
        room = budget - r_out * cout - fixed
        if room < cin + k2 * r_out:
            break  # not even r_in = 1 fits, and it only gets worse with larger r_out
        r_in = min(cin, int(math.floor(room / (cin + k2 * r_out) + 1e-9)))
        # the balanced choice never needs r_in above what matches r_out's kept fraction (+ rounding)
        r_in = min(r_in, max(1, math.ceil(r_out / cout * cin)))
        balance = min(r_out / cout, r_in / cin)
        params = tucker_params(cout, cin, kh, kw, bias, r_out, r_in)
        key = (balance, params, r_out, r_in)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        return 1, 1
    return best[2], best[3]


def _energy_rank(matrix: np.ndarray, energy: float) -> int:
    s = np.linalg.svd(matrix, compute_uv=False)
    e = s * s
    total = float(e.sum())
    if total == 0.0:
        return 1
    kept = np.cumsum(e) / total
    return int(np.searchsorted(kept, energy - 1e-12) + 1)


def unfold(weight: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding (rows indexed by that mode)."""
    return np.moveaxis(weight, mode, 0).reshape(weight.shape[mode], -1)


def ranks_for_energy(weight: np.ndarray, energy: float) -> tuple[int, int]:
    """Per mode, the smallest rank keeping ``energy`` of the unfolding's squared singular values."""
    cout, cin = weight.shape[:2]
    with single_threaded_blas():
        r_out = min(cout, max(1, _energy_rank(unfold(weight, 0), energy)))
        r_in = min(cin, max(1, _energy_rank(unfold(weight, 1), energy)))
    return r_out, r_in


def ranks_vbmf(weight: np.ndarray) -> tuple[int, int]:
    """EVBMF ranks of the mode-0 and mode-1 unfoldings, clamped to ``[1, C]``."""
    cout, cin = weight.shape[:2]
    with single_threaded_blas():
        r_out = min(cout, max(1, evbmf_rank(unfold(weight, 0))))
        r_in = min(cin, max(1, evbmf_rank(unfold(weight, 1))))
    return r_out, r_in


def check_ranks(ranks: Any, cout: int, cin: int, name: str = "rank") -> tuple[int, int]:
    """Validate an explicit ``(r_out, r_in)`` (or one int for both) against the channel counts."""
    if isinstance(ranks, Integral) and not isinstance(ranks, bool):
        ranks = (int(ranks), int(ranks))
    if not (isinstance(ranks, (tuple, list)) and len(ranks) == 2):
        raise RankError(f"{name} must be (r_out, r_in), an int, a float in (0, 1] or 'vbmf', got {ranks!r}")
    out = []
    for r, c, which in zip(ranks, (cout, cin), ("r_out", "r_in")):
        if isinstance(r, bool) or not isinstance(r, Integral):
            raise RankError(f"{name}: {which} must be an int, got {type(r).__name__} {r!r}")
        if not 1 <= int(r) <= c:
            raise ValueError(f"{name}: {which}={int(r)} must be between 1 and the channel count {c}")
        out.append(int(r))
    return out[0], out[1]


def resolve_rank(weight: np.ndarray, bias: bool, rank: Any = None, energy: float | None = None,
                 name: str = "rank") -> tuple[int, int]:
    """``(r_out, r_in)`` for ``weight`` (``Cout x Cin x kh x kw``, numpy) from one rank specification."""
    cout, cin, kh, kw = weight.shape
    if energy is not None:
        if rank is not None:
            raise ValueError(f"give either {name} or energy, not both")
        if isinstance(energy, bool) or not isinstance(energy, Real):
            raise RankError(f"energy must be a float in (0, 1], got {energy!r}")
        if not 0.0 < float(energy) <= 1.0 or math.isnan(float(energy)):
            raise ValueError(f"energy must be in (0, 1], got {energy!r}")
        return ranks_for_energy(weight, float(energy))
    if rank is None:
        raise ValueError(f"{name} (or energy=) is required")
    if isinstance(rank, str):
        if rank.lower() != "vbmf":
            raise RankError(f"{name}: the only string rank is 'vbmf', got {rank!r}")
        return ranks_vbmf(weight)
    if isinstance(rank, Real) and not isinstance(rank, (Integral, bool)):
        f = float(rank)
        if not 0.0 < f <= 1.0 or math.isnan(f):
            raise ValueError(f"{name}: a float rank is the fraction of parameters to keep, in (0, 1]; got {rank!r}")
        return ranks_for_fraction(cout, cin, kh, kw, bias, f)
    return check_ranks(rank, cout, cin, name)
