"""Global Tucker-2 rank allocation under a parameter or FLOP budget.

Each candidate layer offers a set of options: keep the conv whole (its cost, error 0) or Tucker-2 at any
``(r_out, r_in)`` (its cost, an estimated relative calibration error). :func:`allocate` picks one option per layer
so that the total cost is ``<= budget`` and the summed error is small: a greedy descent along each layer's lower
convex hull of (cost, error), always taking the step with the least error added per unit of cost saved (optimal
for the convex relaxation of this multiple-choice knapsack), followed by a fill pass that spends the remaining
slack on the options (hull or not) that remove the most error. Deterministic: ties break by layer order.

Costs are exact. For FLOPs, :func:`bilinear_cost` turns any per-conv cost function into the
``a + b*r_in + c*r_out + d*r_in*r_out`` form of a Tucker sequence by evaluating it on a few rank pairs.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

__all__ = ["LayerChoices", "allocate", "conv_macs", "bilinear_cost", "tucker_shell_convs"]


@dataclass
class LayerChoices:
    """The options of one layer: ``ranks[i]`` (``None`` = keep the conv whole), ``cost[i]``, ``error[i]``."""

    name: str
    ranks: list[tuple[int, int] | None]
    cost: np.ndarray
    error: np.ndarray

    @classmethod
    def grid(cls, name: str, cout: int, cin: int, keep_cost: float, cost: Callable[[int, int], float],
             e_in: np.ndarray, e_out: np.ndarray, scale: float = 1.0) -> "LayerChoices":
        """Every ``(r_out, r_in)`` cheaper than keeping the conv, with error ``(e_in[r_in] + e_out[r_out]) *
        scale``, plus the keep option; dominated options are dropped."""
        r_out = np.arange(1, cout + 1)[:, None]
        r_in = np.arange(1, cin + 1)[None, :]
        costs = np.vectorize(cost, otypes=[float])(np.broadcast_to(r_out, (cout, cin)),
                                                   np.broadcast_to(r_in, (cout, cin)))
        errs = (np.asarray(e_out, dtype=float)[r_out] + np.asarray(e_in, dtype=float)[r_in]) * scale
        mask = costs < keep_cost
        ro, ri = np.nonzero(mask)
        ranks: list[tuple[int, int] | None] = [(int(a) + 1, int(b) + 1) for a, b in zip(ro, ri)]
        cost_v = np.concatenate([costs[mask], [float(keep_cost)]])
        err_v = np.concatenate([errs[mask], [0.0]])
        ranks.append(None)
        return cls(name, ranks, cost_v, err_v).pareto()

    def pareto(self) -> "LayerChoices":
        """Only options that no cheaper-or-equal option beats on error (sorted by cost, then error)."""
        order = np.lexsort((self.error, self.cost))
        keep, best = [], np.inf
        for i in order:
            if self.error[i] < best - 1e-15 * max(1.0, abs(best)) or not keep:
                keep.append(i)
                best = self.error[i]
        idx = np.asarray(keep, dtype=int)
        return LayerChoices(self.name, [self.ranks[i] for i in idx], self.cost[idx], self.error[idx])

    def hull(self) -> list[int]:
        """Indices (into the Pareto-sorted options) of the lower convex hull, cheapest first."""
        pts: list[int] = []
        for i in range(len(self.cost)):
            while len(pts) >= 2:
                a, b = pts[-2], pts[-1]
                # drop b if it lies on or above the segment a -> i
                cross = ((self.cost[b] - self.cost[a]) * (self.error[i] - self.error[a])
                         - (self.error[b] - self.error[a]) * (self.cost[i] - self.cost[a]))
                if cross <= 0:
                    pts.pop()
                else:
                    break
            pts.append(i)
        return pts


def allocate(layers: Sequence[LayerChoices], budget: float, fixed_cost: float = 0.0,
             name: str = "target") -> dict[str, tuple[int, int] | None]:
    """One option per layer with ``fixed_cost + sum(cost) <= budget``; ``{layer: ranks or None}``.

    ``ValueError`` naming ``name`` when even the cheapest option of every layer does not fit.
    """
    cheapest = fixed_cost + sum(float(c.cost.min()) for c in layers)
    if cheapest > budget:
        raise ValueError(f"{name}={budget:g} is unreachable: the smallest ranks of the {len(layers)} decomposable "
                         f"layers still cost {cheapest:g}")
    hulls = [c.hull() for c in layers]
    pos = [len(h) - 1 for h in hulls]                      # start at the most expensive (keep) point
    total = fixed_cost + sum(float(c.cost[h[p]]) for c, h, p in zip(layers, hulls, pos))
    heap: list[tuple[float, int]] = []

    def push(j: int) -> None:
        h, p = hulls[j], pos[j]
        if p > 0:
            c = layers[j]
            saved = c.cost[h[p]] - c.cost[h[p - 1]]
            added = c.error[h[p - 1]] - c.error[h[p]]
            heapq.heappush(heap, (float(added / saved), j))

    for j in range(len(layers)):
        push(j)
    while total > budget and heap:
        _, j = heapq.heappop(heap)
        c, h = layers[j], hulls[j]
        total -= float(c.cost[h[pos[j]]] - c.cost[h[pos[j] - 1]])
        pos[j] -= 1
        push(j)
    choice = [h[p] for h, p in zip(hulls, pos)]
    # fill: spend the slack where it removes the most error (any Pareto option, not only hull points)
    while True:
        slack = budget - total
        best: tuple[float, int, int] | None = None
        for j, c in enumerate(layers):
            cur = choice[j]
            extra = c.cost - c.cost[cur]
            gain = c.error[cur] - c.error
            ok = np.nonzero((extra <= slack) & (gain > 0))[0]
            if ok.size:
                k = int(ok[np.argmax(gain[ok])])
                if best is None or gain[k] > best[0]:
                    best = (float(gain[k]), j, k)
        if best is None:
            break
        _, j, k = best
        total += float(layers[j].cost[k] - layers[j].cost[choice[j]])
        choice[j] = k
    return {c.name: c.ranks[i] for c, i in zip(layers, choice)}


# ----------------------------------------------------------------------------------------------- FLOP costs
def conv_macs(conv: nn.Conv2d, in_hw: tuple[int, int]) -> float:
    """Multiply-accumulates of ``conv`` on an input of spatial size ``in_hw`` (the plain MAC count)."""
    h, w = in_hw
    out_hw = []
    for size, k, s, p, d in zip((h, w), conv.kernel_size, conv.stride, _padding(conv), conv.dilation):
        out_hw.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    kh, kw = conv.kernel_size
    return float(conv.out_channels * (conv.in_channels // conv.groups) * kh * kw * out_hw[0] * out_hw[1])


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))  # type: ignore[return-value]
    return conv.padding  # type: ignore[return-value]


def tucker_shell_convs(conv: nn.Conv2d, r_out: int, r_in: int) -> list[tuple[nn.Conv2d, str]]:
    """The three convs of a Tucker-2 of ``conv`` on the meta device, each with where its input lives
    (``"in"``: the conv's input resolution, ``"out"``: the core's output resolution)."""
    kw = dict(device="meta")
    first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False, **kw)
    mid = nn.Conv2d(r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **kw)
    last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None, **kw)
    return [(first, "in"), (mid, "in"), (last, "out")]


def bilinear_cost(conv: nn.Conv2d, in_hw: tuple[int, int],
                  flops_fn: Callable[[nn.Conv2d, tuple[int, int]], float]) -> Callable[[int, int], float]:
    """``cost(r_out, r_in)`` of the Tucker-2 of ``conv`` under ``flops_fn`` (a per-conv cost that is linear in
    each channel count, like a MAC count), from its values at ranks (1,1), (1,2), (2,1), (2,2)."""
    out_hw = _out_hw(conv, in_hw)

    def total(r_out: int, r_in: int) -> float:
        return sum(float(flops_fn(c, in_hw if where == "in" else out_hw))
                   for c, where in tucker_shell_convs(conv, r_out, r_in))

    f11, f12, f21, f22 = total(1, 1), total(1, 2), total(2, 1), total(2, 2)
    d = f22 - f21 - f12 + f11
    b = f12 - f11 - d            # per r_in
    c = f21 - f11 - d            # per r_out
    a = f11 - b - c - d
    return lambda r_out, r_in: a + b * r_in + c * r_out + d * r_in * r_out


def _out_hw(conv: nn.Conv2d, in_hw: tuple[int, int]) -> tuple[int, int]:
    out = []
    for size, k, s, p, d in zip(in_hw, conv.kernel_size, conv.stride, _padding(conv), conv.dilation):
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]
