"""Analytical empirical variational Bayesian matrix factorisation (EVBMF) for rank selection.

Reference: S. Nakajima, M. Sugiyama, S. D. Babacan, R. Tomioka, "Global analytic solution of fully-observed
variational Bayesian matrix factorization", JMLR 14 (2013) 1-37, and "Perfect dimensionality recovery by
variational Bayesian PCA", NeurIPS 2012. For ``Y`` (``L x M``, ``L <= M``) with singular values ``s``,
EVBMF keeps exactly the components with ``s_h > sqrt(M * sigma2 * xbar)``, where
``xbar = (1 + tbar) * (1 + alpha / tbar)``, ``alpha = L / M``, ``tbar = 2.5129 * sqrt(alpha)``, and the
noise variance ``sigma2`` minimises the free energy (a 1-D problem over a bounded interval). Kim et al.
(ICLR 2016) apply it to the mode-0/1 unfoldings of a conv kernel to pick Tucker-2 ranks.

This is an independent numpy implementation: the free energy is minimised by a log-spaced grid search
followed by golden-section refinement (deterministic; no SciPy needed).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["evbmf_rank", "evbmf_noise_variance", "free_energy"]

_TAU_CONST = 2.5129  # tbar = 2.5129 * sqrt(alpha): the root defining the EVBMF threshold (Nakajima et al.)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """Positive root tau(x) of tau^2 - (x - 1 - alpha) tau + alpha = 0 (for x above the threshold)."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def free_energy(sigma2: float, s: np.ndarray, L: int, M: int, residual: float = 0.0) -> float:
    """EVBMF free energy (up to constants) as a function of the noise variance ``sigma2``."""
    H = s.size
    alpha = L / M
    tbar = _TAU_CONST * math.sqrt(alpha)
    xbar = (1.0 + tbar) * (1.0 + alpha / tbar)
    x = s * s / (M * sigma2)
    low = x[x <= xbar]
    high = x[x > xbar]
    tau = _tau(high, alpha)
    eps = np.finfo(np.float64).tiny
    energy = np.sum(low - np.log(low + eps))
    energy += np.sum(high - tau + np.log((tau + 1.0) / high) + alpha * np.log(tau / alpha + 1.0))
    energy += residual / (M * sigma2) + (L - H) * math.log(sigma2)
    return float(energy)


def _golden(f, a: float, b: float, iters: int = 80) -> float:
    """Minimise a unimodal ``f`` on ``[a, b]`` (golden-section search)."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return c if fc <= fd else d


def _prepare(matrix: np.ndarray) -> tuple[np.ndarray, int, int]:
    Y = np.asarray(matrix, dtype=np.float64)
    if Y.ndim != 2 or Y.size == 0:
        raise ValueError(f"matrix must be a non-empty 2-D array, got shape {Y.shape}")
    if not np.all(np.isfinite(Y)):
        raise ValueError("matrix must be finite")
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    s = np.linalg.svd(Y, compute_uv=False)
    return s, L, M


def evbmf_noise_variance(matrix: np.ndarray, grid: int = 256) -> float:
    """The noise variance ``sigma2`` that minimises the EVBMF free energy of ``matrix``."""
    s, L, M = _prepare(matrix)
    return _noise_variance(s, L, M, grid)


def _noise_variance(s: np.ndarray, L: int, M: int, grid: int) -> float:
    alpha = L / M
    tbar = _TAU_CONST * math.sqrt(alpha)
    xbar = (1.0 + tbar) * (1.0 + alpha / tbar)
    H = s.size  # == L: the full SVD, so there is no residual
    # Search interval (Nakajima et al. 2013, Sec. 6; MATLAB's 1-based s(eH_ub+1) is s[e] here).
    e = min(math.ceil(L / (1.0 + alpha)) - 1, H - 1)
    upper = float(np.sum(s * s) / (L * M))
    lower = float(max(s[e] ** 2 / (M * xbar), np.mean(s[e:] ** 2) / M))
    if not upper > 0.0:
        return 0.0
    lower = max(lower, upper * 1e-12)
    if lower >= upper:
        return upper
    f = lambda v: free_energy(v, s, L, M)  # noqa: E731
    grid_pts = np.geomspace(lower, upper, grid)
    values = np.array([f(v) for v in grid_pts])
    i = int(np.argmin(values))
    a, b = grid_pts[max(i - 1, 0)], grid_pts[min(i + 1, grid - 1)]
    best = _golden(f, float(a), float(b))
    return best if f(best) <= values[i] else float(grid_pts[i])


def evbmf_rank(matrix: np.ndarray, grid: int = 256) -> int:
    """Number of components EVBMF keeps for ``matrix`` (may be 0; callers clamp to at least 1)."""
    s, L, M = _prepare(matrix)
    sigma2 = _noise_variance(s, L, M, grid)
    if sigma2 <= 0.0:
        return int(np.sum(s > 0))
    alpha = L / M
    tbar = _TAU_CONST * math.sqrt(alpha)
    threshold = math.sqrt(M * sigma2 * (1.0 + tbar) * (1.0 + alpha / tbar))
    return int(np.sum(s > threshold))
