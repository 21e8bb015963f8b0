"""Data-aware Tucker-2 of one conv from calibration statistics (pure float64 numpy math, no hooks).

The statistics are those of the conv's im2col view on calibration data: ``xtx`` (``(D+1) x (D+1)``) and ``xty``
(``(D+1) x Cout``) with ``D = Cin*kh*kw`` features in ``weight.reshape(Cout, -1)`` order (channel-major, then
kernel taps) and a last constant-1 feature, and ``yty`` (``Cout``), the per-channel sums of squares of the
target ``Y`` (usually the *teacher's* output at this layer). No second pass over the data is ever needed:

* **input factor** ``U_in`` (``r_in x Cin``, the first 1x1): the input-channel subspace that keeps most of the
  conv's output on the data, as in SVD-LLM / ASVD: with the centred per-channel input covariance
  ``Sigma = L L^T`` (summed over kernel taps, Cholesky with a small jitter), the top-``r_in`` right singular
  vectors ``V`` of ``W_(1)^T L`` (``W_(1)^T``: ``Cout*kh*kw x Cin``) give ``U_in = orth(V^T L^-1)``. The plain
  weight-only subspace (top left singular vectors of ``W_(1)``) is evaluated too, and whichever reaches the lower
  calibration error after the refit below is kept -- so the result is never worse than plain Tucker's subspace;
* **core** by ridge regression on the factored inputs ``z = U_in x``: the im2col statistics of ``z`` follow from
  ``xtx`` by a congruence with ``U_in (x) I_{k^2}``, target ``Y``;
* **output factor** ``U_out`` by reduced-rank regression: the top-``r_out`` eigenvectors of the centred
  covariance of the fitted output; the core is projected onto them and the last 1x1 absorbs the bias (the
  fitted mean, including what the projection drops).

Convs that stay whole are refit with :meth:`prune.calibration.ConvStats.solve` (ridge toward the old weights) by
:func:`decompose.data_aware_tucker_model`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._blas import single_threaded_blas

__all__ = ["TuckerFit", "channel_covariance", "input_factor", "fit_core", "reduced_rank",
           "data_aware_tucker", "stats_error", "rank_curves", "factored_stats"]


@dataclass
class TuckerFit:
    """The three layers of a data-aware Tucker-2 (float64): ``first`` (``r_in x Cin``), ``core``
    (``r_out x r_in x kh x kw``), ``last`` (``Cout x r_out``), ``bias`` (``Cout`` or ``None``), and the
    calibration error (sum of squares) of the result, plus which input subspace won."""

    first: np.ndarray
    core: np.ndarray
    last: np.ndarray
    bias: np.ndarray | None
    error: float
    subspace: str

    @property
    def ranks(self) -> tuple[int, int]:
        return self.core.shape[0], self.core.shape[1]

    def weight(self) -> np.ndarray:
        """The equivalent single kernel ``Cout x Cin x kh x kw``."""
        return np.einsum("oa,abhw,bi->oihw", self.last, self.core, self.first)


# ------------------------------------------------------------------------------------------------ helpers
def _check_stats(weight: np.ndarray, xtx: np.ndarray, xty: np.ndarray, yty: np.ndarray | None) -> tuple:
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim != 4:
        raise ValueError(f"weight must be Cout x Cin x kh x kw, got shape {weight.shape}")
    xtx = np.asarray(xtx, dtype=np.float64)
    xty = np.asarray(xty, dtype=np.float64)
    if xtx.ndim == 3:
        if xtx.shape[0] != 1:
            raise ValueError(f"xtx: grouped statistics (G={xtx.shape[0]}) are not Tucker-decomposed")
        xtx = xtx[0]
    if xty.ndim == 3:
        if xty.shape[0] != 1:
            raise ValueError(f"xty: grouped statistics (G={xty.shape[0]}) are not Tucker-decomposed")
        xty = xty[0]
    cout = weight.shape[0]
    d = int(np.prod(weight.shape[1:]))
    if xtx.shape != (d + 1, d + 1):
        raise ValueError(f"xtx must be {(d + 1, d + 1)} for weight {weight.shape} (im2col + constant), "
                         f"got {xtx.shape}")
    if xty.shape != (d + 1, cout):
        raise ValueError(f"xty must be {(d + 1, cout)} for weight {weight.shape}, got {xty.shape}")
    if not xtx[-1, -1] > 0:
        raise ValueError("xtx: empty calibration statistics (count 0)")
    if yty is not None:
        yty = np.asarray(yty, dtype=np.float64).reshape(-1)
        if yty.shape != (cout,):
            raise ValueError(f"yty must have {cout} entries, got {yty.shape}")
    return weight, xtx, xty, yty


def _ridge(gram: np.ndarray, ridge: float, n_free: int) -> np.ndarray:
    """``gram`` plus ``lambda`` on the first ``n_free`` diagonal entries, ``lambda = ridge * mean diag``."""
    g = gram.copy()
    if n_free and ridge > 0:
        scale = float(np.trace(gram[:n_free, :n_free])) / n_free
        g[np.arange(n_free), np.arange(n_free)] += ridge * (scale if scale > 0 else 1.0)
    return g


def _solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def stats_error(xtx: np.ndarray, xty: np.ndarray, yty: np.ndarray, coef: np.ndarray) -> float:
    """``||X_aug coef - Y||^2`` from the (ungrouped) statistics (``coef``: ``(D+1) x Cout``, last row = bias)."""
    if np.ndim(xtx) == 3:
        if np.shape(xtx)[0] != 1:
            raise ValueError("xtx: grouped statistics; stats_error takes one group")
        xtx, xty = xtx[0], xty[0]
    val = float(np.einsum("ik,ij,jk->", coef, xtx, coef, optimize=True) - 2.0 * np.sum(coef * xty) + np.sum(yty))
    return max(val, 0.0)


def _aug(weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    cout = weight.shape[0]
    b = np.zeros(cout) if bias is None else np.asarray(bias, dtype=np.float64).reshape(cout)
    return np.concatenate([weight.reshape(cout, -1).T, b[None, :]], axis=0)


def _sign_fix(vectors: np.ndarray) -> np.ndarray:
    """Columns with their largest-magnitude entry positive (deterministic eigen/singular vectors)."""
    idx = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[idx, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def channel_covariance(xtx: np.ndarray, cin: int, k2: int, centred: bool = True) -> np.ndarray:
    """``Cin x Cin`` input-channel second moment summed over the ``k2`` kernel taps (centred by default)."""
    xtx = np.asarray(xtx, dtype=np.float64)
    if xtx.ndim == 3:
        xtx = xtx[0]
    d = cin * k2
    s = xtx[:d, :d].reshape(cin, k2, cin, k2)
    sigma = np.einsum("atbt->ab", s)
    if centred:
        n = xtx[d, d]
        mu = xtx[d, :d].reshape(cin, k2) / n
        sigma = sigma - n * mu @ mu.T
    return 0.5 * (sigma + sigma.T)


def _whitener(sigma: np.ndarray, jitter: float) -> np.ndarray:
    """Lower Cholesky factor of ``sigma + jitter * mean(diag) I`` (jitter grown until it factors)."""
    scale = float(np.trace(sigma)) / sigma.shape[0]
    scale = scale if scale > 0 else 1.0
    eps = jitter
    eye = np.eye(sigma.shape[0])
    for _ in range(12):
        try:
            return np.linalg.cholesky(sigma + eps * scale * eye)
        except np.linalg.LinAlgError:
            eps = max(eps * 10.0, 1e-12)
    return np.linalg.cholesky(np.diag(np.maximum(np.diag(sigma), 0.0)) + scale * eye)


def _orth_rows(a: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the row space of ``a`` (``r x Cin``), deterministic signs."""
    q, _ = np.linalg.qr(a.T)
    return _sign_fix(q).T


def input_factor(weight: np.ndarray, xtx: np.ndarray, r_in: int, jitter: float = 1e-6,
                 whiten: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(U_in, s2)``: the ``r_in x Cin`` first factor (orthonormal rows) and the squared singular values of the
    (whitened) mode-1 unfolding, whose tail sums estimate the output error of truncating the input channels."""
    cout, cin, kh, kw = weight.shape
    m = np.moveaxis(weight, 1, 0).reshape(cin, -1).T          # Cout*kh*kw x Cin
    if whiten:
        lower = _whitener(channel_covariance(xtx, cin, kh * kw), jitter)
        _, s, vt = np.linalg.svd(m @ lower, full_matrices=True)    # all Cin directions, even past rank(W)
        a = np.linalg.solve(lower.T, vt[:r_in].T).T             # V_r^T L^-1
    else:
        _, s, vt = np.linalg.svd(m, full_matrices=True)
        a = vt[:r_in]
    s2 = np.zeros(cin)
    s2[: s.size] = s * s / (kh * kw)            # sigma sums the k^2 taps; the error uses one tap's covariance
    return _orth_rows(a), s2


def factored_stats(xtx: np.ndarray, xty: np.ndarray, first: np.ndarray, k2: int) -> tuple[np.ndarray, np.ndarray]:
    """im2col statistics of ``z = first @ x`` (``first``: ``r x Cin``) from those of ``x``: a congruence with
    ``blockdiag(first (x) I_k2, 1)``."""
    r, cin = first.shape
    d = cin * k2
    s = xtx[:d, :d].reshape(cin, k2, cin, k2)
    zz = np.einsum("ja,atbs,kb->jtks", first, s, first).reshape(r * k2, r * k2)
    zc = np.einsum("ja,at->jt", first, xtx[d, :d].reshape(cin, k2)).reshape(r * k2)
    zy = np.einsum("ja,atc->jtc", first, xty[:d].reshape(cin, k2, -1)).reshape(r * k2, -1)
    ztz = np.empty((r * k2 + 1, r * k2 + 1))
    ztz[:-1, :-1] = zz
    ztz[-1, :-1] = ztz[:-1, -1] = zc
    ztz[-1, -1] = xtx[d, d]
    zty = np.concatenate([zy, xty[d:d + 1]], axis=0)
    return ztz, zty


def fit_core(ztz: np.ndarray, zty: np.ndarray, ridge: float, bias: bool) -> np.ndarray:
    """Ridge solution ``(F+1) x Cout`` (last row the intercept, zero when ``bias`` is false) of ``Y ~ Z B``."""
    f = ztz.shape[0] - 1
    if bias:
        coef = _solve_spd(_ridge(ztz, ridge, f), zty)
    else:
        coef = np.zeros((f + 1, zty.shape[1]))
        coef[:f] = _solve_spd(_ridge(ztz[:f, :f], ridge, f), zty[:f])
    return coef


def reduced_rank(coef: np.ndarray, ztz: np.ndarray, r_out: int, bias: bool) -> tuple[np.ndarray, np.ndarray,
                                                                                        np.ndarray]:
    """``(U_out, core_rows, intercept)``: reduced-rank regression of the fitted output ``Z B`` to ``r_out``.

    ``U_out`` (``Cout x r_out``) are the top eigenvectors of the fitted output's (centred when there is an
    intercept) covariance, ``core_rows = U_out^T B_w^T`` and the intercept absorbs the fitted mean that the
    projection drops.
    """
    f = ztz.shape[0] - 1
    bw = coef[:f]
    cov, mu = _fitted_covariance(coef, ztz, bias)
    _, vecs = np.linalg.eigh(cov)                               # ascending eigenvalues
    vecs = _sign_fix(vecs[:, ::-1][:, :r_out])
    core_rows = vecs.T @ bw.T                                   # r_out x F
    intercept = coef[f] + (bw.T @ mu - vecs @ (vecs.T @ (bw.T @ mu))) if bias else np.zeros(bw.shape[1])
    return vecs, core_rows, intercept


def _fitted_covariance(coef: np.ndarray, ztz: np.ndarray, bias: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(cov, mu)``: the (symmetrised) covariance of the fitted output ``Z B`` -- centred on the feature mean
    ``mu`` when there is an intercept, else uncentred with ``mu = 0``."""
    f = ztz.shape[0] - 1
    bw = coef[:f]
    if bias:
        mu = ztz[-1, :f] / ztz[-1, -1]
        cov = bw.T @ (ztz[:f, :f] - ztz[-1, -1] * np.outer(mu, mu)) @ bw
    else:
        mu = np.zeros(f)
        cov = bw.T @ ztz[:f, :f] @ bw
    return 0.5 * (cov + cov.T), mu


def _fitted_eigenvalues(coef: np.ndarray, ztz: np.ndarray, bias: bool) -> np.ndarray:
    vals = np.linalg.eigvalsh(_fitted_covariance(coef, ztz, bias)[0])[::-1]
    return np.maximum(vals, 0.0)


def _tucker_from_first(first: np.ndarray, weight_shape: tuple, xtx: np.ndarray, xty: np.ndarray,
                       yty: np.ndarray, r_out: int, ridge: float, bias: bool, subspace: str) -> TuckerFit:
    cout, cin, kh, kw = weight_shape
    k2 = kh * kw
    ztz, zty = factored_stats(xtx, xty, first, k2)
    coef = fit_core(ztz, zty, ridge, bias)
    u_out, core_rows, intercept = reduced_rank(coef, ztz, r_out, bias)
    r_in = first.shape[0]
    core = core_rows.reshape(r_out, r_in, kh, kw)
    fit = TuckerFit(first=first, core=core, last=u_out, bias=intercept if bias else None, error=0.0,
                    subspace=subspace)
    fit.error = stats_error(xtx, xty, yty, _aug(fit.weight(), fit.bias))
    return fit


def refine_first(fit: TuckerFit, xtx: np.ndarray, xty: np.ndarray, ridge: float) -> np.ndarray:
    """One exact least-squares update of the input factor with the core and output factor held fixed.

    The Tucker output ``sum_t (U_out K_t) A x_t + b`` is linear in ``A`` (``r_in x Cin``); its normal equations
    ``H vec(A) = g`` come from the im2col statistics alone (``H``: ``(r_in Cin)^2``). Returns the new ``A`` with
    orthonormal rows (its row space is what matters: the core is refit after it).
    """
    r_out, r_in, kh, kw = fit.core.shape
    k2 = kh * kw
    cin = fit.first.shape[1]
    d = cin * k2
    c = np.einsum("oa,akt->okt", fit.last, fit.core.reshape(r_out, r_in, k2))     # Cout x r_in x k2
    s4 = xtx[:d, :d].reshape(cin, k2, cin, k2)
    pair = np.einsum("ojt,oks->jtks", c, c)
    h = np.einsum("jtks,ctes->jcke", pair, s4, optimize=True).reshape(r_in * cin, r_in * cin)
    b = np.zeros(c.shape[0]) if fit.bias is None else fit.bias
    resid = xty[:d].reshape(cin, k2, -1) - xtx[d, :d].reshape(cin, k2)[:, :, None] * b[None, None, :]
    g = np.einsum("ojt,cto->jc", c, resid).reshape(-1)
    h = 0.5 * (h + h.T)
    a = _solve_spd(_ridge(h, ridge, h.shape[0]), g).reshape(r_in, cin)
    return _orth_rows(a)


def data_aware_tucker(weight: np.ndarray, bias: np.ndarray | None, xtx: np.ndarray, xty: np.ndarray,
                      yty: np.ndarray, ranks: tuple[int, int], ridge: float = 1e-6,
                      jitter: float = 1e-6, refine: int = 0) -> TuckerFit:
    """Data-aware Tucker-2 factors of a conv from its calibration statistics (see the module docstring).

    ``weight`` ``Cout x Cin x kh x kw`` and ``bias`` (``None``: the result has no bias either) are the current
    layer's, used to choose the input subspace; the core and output factor are fitted to the target whose
    statistics ``xty``/``yty`` hold. ``ridge`` is relative to the mean diagonal of the factored Gram matrix.
    ``refine``: rounds of alternating least squares on the exact calibration objective after that (the input
    factor by :func:`refine_first`, then the core and output factor again); a round is kept only if it lowers
    the calibration error.
    """
    weight, xtx, xty, yty = _check_stats(weight, xtx, xty, yty)
    if yty is None:
        raise ValueError("yty is required (the target's per-channel sums of squares)")
    cout, cin = weight.shape[:2]
    r_out, r_in = ranks
    if not (1 <= r_out <= cout and 1 <= r_in <= cin):
        raise ValueError(f"ranks: (r_out, r_in)={ranks} must be within (1..{cout}, 1..{cin})")
    with single_threaded_blas():
        best: TuckerFit | None = None
        for whiten, label in ((True, "whitened"), (False, "weight")):
            first, _ = input_factor(weight, xtx, r_in, jitter=jitter, whiten=whiten)
            fit = _tucker_from_first(first, weight.shape, xtx, xty, yty, r_out, ridge, bias is not None, label)
            if best is None or fit.error < best.error:
                best = fit
        assert best is not None
        for _ in range(refine):
            first = refine_first(best, xtx, xty, ridge)
            fit = _tucker_from_first(first, weight.shape, xtx, xty, yty, r_out, ridge, bias is not None,
                                     best.subspace.split("+")[0] + "+als")
            if not fit.error < best.error * (1 - 1e-9):
                break
            best = fit
    return best


def rank_curves(weight: np.ndarray, bias: np.ndarray | None, xtx: np.ndarray, xty: np.ndarray,
                yty: np.ndarray, ridge: float = 1e-6, jitter: float = 1e-6) -> tuple[np.ndarray, np.ndarray, float]:
    """Separable error estimates for every rank: ``(e_in, e_out, energy)``.

    ``e_in[r]`` (``r = 0..Cin``) is the output error of keeping ``r`` whitened input directions (tail sum of the
    whitened mode-1 spectrum), ``e_out[r]`` (``r = 0..Cout``) that of keeping ``r`` output directions of the
    full-input ridge fit (tail sum of its fitted-output eigenvalues), and ``energy`` the target's centred energy
    (to normalise across layers). ``e_in[r_in] + e_out[r_out]`` estimates the Tucker error at ``(r_out, r_in)``.
    """
    weight, xtx, xty, yty = _check_stats(weight, xtx, xty, yty)
    cout, cin, kh, kw = weight.shape
    has_bias = bias is not None
    with single_threaded_blas():
        _, s2 = input_factor(weight, xtx, cin, jitter=jitter, whiten=True)
        coef = fit_core(xtx, xty, ridge, has_bias)
        lam = _fitted_eigenvalues(coef, xtx, has_bias)
    e_in = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    e_out = np.concatenate([np.cumsum(lam[::-1])[::-1], [0.0]])
    n = xtx[-1, -1]
    ysum = xty[-1]                                              # sum over samples of Y per channel
    energy = float(np.sum(yty) - np.sum(ysum * ysum) / n) if has_bias else float(np.sum(yty))
    return e_in, e_out, max(energy, 0.0)
