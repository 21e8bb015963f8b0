"""Plain per-filter L2 importance for DepGraph groups (rep blocks included)."""
from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from reparam import RepBlock
from reparam.utils.modules import eval_mode

from .calibration import Calibration, conv_units

__all__ = ["L2FilterImportance", "ActivationImportance", "ReconstructionImportance", "rep_block_output_kernel"]

_OUT_FNS = (function.prune_conv_out_channels, function.prune_linear_out_channels)


def rep_block_output_kernel(block: RepBlock) -> torch.Tensor:
    """Weight ``(out, in, k, k)`` of the conv that produces the block's output once fused."""
    fused = block.fuse()
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise TypeError(f"{type(block).__name__}.fuse() contains no Conv2d")
    return convs[-1].weight.detach()


class L2FilterImportance(tp.importance.GroupMagnitudeImportance):
    """torch-pruning's ``GroupMagnitudeImportance(p=2, normalizer=None, group_reduction="sum")``
    restricted to **output filters**: the importance of a channel is the L2 norm of its filter(s).

    Consumers' input slices are not counted (a plain filter norm, as in L2 filter pruning). When the
    group couples several layers (residual adds, ``x * mask``), the filters of all coupled producers are
    concatenated (sum of squares, then square root). A ``RepBlock`` contributes the filter of its fused
    conv (the kernel that will be deployed).
    """

    def __init__(self) -> None:
        super().__init__(p=2, group_reduction="sum", normalizer=None, bias=False,
                         target_types=[nn.modules.conv._ConvNd, nn.Linear])

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        dg = getattr(group, "_DG", None)
        items = list(group)
        if not items:
            return None
        n_root = len(items[0].root_idxs if items[0].root_idxs is not None else items[0].idxs)
        imp = None
        for item in items:
            dep, idxs, roots = item.dep, item.idxs, item.root_idxs
            if roots is None or any(r is None for r in roots):
                continue
            layer, fn = dep.layer, dep.pruning_fn
            w = None
            if fn in _OUT_FNS or fn == function.prune_depthwise_conv_out_channels:
                if isinstance(layer, tuple(self.target_types)):
                    w = layer.weight.detach()
                    if getattr(layer, "transposed", False):
                        w = w.transpose(0, 1)
            elif isinstance(layer, RepBlock) and dg is not None and dg.is_out_channel_pruning_fn(fn):
                w = rep_block_output_kernel(layer)
            if w is None:
                continue
            local = w[idxs].flatten(1).abs().pow(self.p).sum(1).float()
            if imp is None:
                imp = torch.zeros(n_root, dtype=torch.float32, device=local.device)
            imp.scatter_add_(0, torch.tensor(roots, device=local.device, dtype=torch.long), local)
        if imp is None:
            return None
        return imp.pow(1.0 / self.p)


class ActivationImportance:
    """Data-driven alternative: the L2 norm of each channel's *output activation* on calibration inputs.

    ``inputs`` is one batch in the model's input range (e.g. a few LR patches). A channel's score is the
    root-mean-square activation of every coupled producer (conv / linear / rep block output) on that
    channel, summed in quadrature. Unlike the filter norm it sees biases, input statistics and — in
    residual trunks (``r = lrelu(conv(x) + x)``) — the identity highway: a trunk channel whose filters
    are all small but which carries the shallow features keeps a large activation. Activations are
    recomputed whenever the parameters change (after each pruning step or fine-tune).
    """

    def __init__(self, inputs: torch.Tensor) -> None:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor batch, got {type(inputs).__name__}")
        self.inputs = inputs
        self._key: tuple | None = None
        self._energy: dict[int, torch.Tensor] = {}

    def _refresh(self, dg: Any) -> None:
        model = dg.model
        key = (id(dg), tuple((id(p), p._version) for p in model.parameters()))
        if key == self._key:
            return
        self._dg = dg  # keep it alive so that the ids in the cache key cannot be reused
        watched = [m for m in dg.module2node if isinstance(m, (nn.Conv2d, nn.Linear, RepBlock))]
        energy: dict[int, torch.Tensor] = {}

        def hook(module: nn.Module, _inp: Any, out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            dims = [d for d in range(t.dim()) if d != 1] if t.dim() > 2 else [0]
            energy[id(module)] = t.detach().float().pow(2).mean(dim=dims)

        p = next(model.parameters())
        with eval_mode(model, hooks=[m.register_forward_hook(hook) for m in watched]), torch.no_grad():
            model(self.inputs.to(device=p.device, dtype=p.dtype))
        self._energy, self._key = energy, key

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        dg = getattr(group, "_DG", None)
        if dg is None:
            raise ValueError("group: ActivationImportance needs a group made by a DependencyGraph")
        self._refresh(dg)
        items = list(group)
        n_root = len(items[0].root_idxs if items[0].root_idxs is not None else items[0].idxs)
        imp = None
        for item in items:
            layer, fn, roots = item.dep.layer, item.dep.pruning_fn, item.root_idxs
            e = self._energy.get(id(layer))
            if e is None or roots is None or any(r is None for r in roots):
                continue
            if not dg.is_out_channel_pruning_fn(fn) or e.numel() <= max(item.idxs, default=0):
                continue
            if isinstance(layer, RepBlock) or fn in _OUT_FNS or fn == function.prune_depthwise_conv_out_channels:
                local = e[item.idxs].to(torch.float32)
                if imp is None:
                    imp = torch.zeros(n_root, dtype=torch.float32, device=local.device)
                imp.scatter_add_(0, torch.tensor(roots, device=local.device, dtype=torch.long), local)
        return None if imp is None else imp.sqrt()


class ReconstructionImportance:
    """Reconstruction-error channel selection (He et al. 2017, "Channel pruning for accelerating very
    deep networks", with greedy selection in place of LASSO), computed in closed form from calibration
    statistics (:class:`prune.calibration.ConvStats`).

    For every consumer conv of a group (a conv, or conv-like rep block, whose *input* channels the group
    removes), ``X`` is the im2col of its input on the calibration set and ``Y`` its own current output.
    Channels are eliminated greedily, one atom (a channel, or a PixelShuffle block) at a time: each
    step removes the atom whose removal least increases ``sum_c ||X_c W_c - Y_c||^2 / ||Y_c||^2`` with
    every ``W_c`` re-solved by ridge least squares on the remaining inputs (exact block downdate of
    ``(X^T X + lam I)^-1``, so a step costs ``O(D^2)``). The score of a channel is its elimination rank
    (first eliminated = lowest), so pruning the ``n`` lowest equals the first ``n`` greedy steps.
    ``curves[root name]`` keeps the cumulative error increase of each elimination step.

    Groups without a measurable consumer (e.g. only consumed by a linear layer) fall back to
    :class:`L2FilterImportance`. Statistics are recomputed whenever the parameters change.
    """

    def __init__(self, calibration: Any, ridge: float = 1e-4) -> None:
        if not isinstance(calibration, Calibration):
            raise TypeError(f"calibration must be a prune.calibration.Calibration, got {type(calibration).__name__}")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < float("inf"):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
        self.calibration, self.ridge = calibration, float(ridge)
        self._key: tuple | None = None
        self._stats: dict[int, Any] = {}
        self.curves: dict[str, list[float]] = {}
        self._l2 = L2FilterImportance()

    def _refresh(self, dg: Any) -> None:
        model = dg.model
        key = (id(dg), tuple((id(p), p._version) for p in model.parameters()))
        if key == self._key:
            return
        self._dg = dg
        units = {n: m for n, m in conv_units(model).items() if m.groups == 1}
        stats = self.calibration.collect(model, list(units)) if units else {}
        self._stats = {id(units[n]): st for n, st in stats.items()}
        self._key = key

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        from .graph import channel_atoms
        dg = getattr(group, "_DG", None)
        if dg is None:
            raise ValueError("group: ReconstructionImportance needs a group made by a DependencyGraph")
        self._refresh(dg)
        items = list(group)
        roots0 = items[0].root_idxs if items[0].root_idxs is not None else items[0].idxs
        n_root = len(roots0)
        consumers: dict[int, tuple[Any, dict[int, list[int]]]] = {}
        for item in items:
            layer, fn, roots = item.dep.target.module, item.dep.handler, item.root_idxs
            st = self._stats.get(id(layer))
            if st is None or roots is None or not dg.is_in_channel_pruning_fn(fn):
                continue
            m = consumers.setdefault(id(layer), (st, {}))[1]
            for i, r in zip(item.idxs, roots):
                if r is not None:
                    m.setdefault(int(r), []).append(int(i))
        if not consumers:
            return self._l2(group)
        atoms = channel_atoms(group)
        solvers = [_GreedyLS(st, mapping, self.ridge) for st, mapping in consumers.values()]
        order, curve, total = [], [], 0.0
        remaining = list(range(len(atoms)))
        while remaining:
            cost = torch.zeros(len(remaining), dtype=torch.float64)
            for s in solvers:
                cost += s.costs([atoms[a] for a in remaining])
            j = int(torch.argmin(cost))
            a = remaining.pop(j)
            total += float(cost[j])
            for s in solvers:
                s.remove(atoms[a])
            order.append(a)
            curve.append(total)
        imp = torch.zeros(n_root, dtype=torch.float32)
        for rank, a in enumerate(order):
            imp[atoms[a]] = float(rank)
        self.curves[dg.module_name(items[0].dep.target.module)] = curve
        return imp


class _GreedyLS:
    """Ridge least squares of one consumer conv with input channels removed one block at a time."""

    def __init__(self, st: Any, mapping: dict[int, list[int]], ridge: float) -> None:
        _, cg, kh, kw = st.weight_shape
        self.k = kh * kw
        a = st.xtx[0].clone()
        d = a.shape[0] - 1
        lam = float(st.regularizer(ridge)[0]) if ridge > 0 else 1e-12 * float(a.diagonal()[:d].mean().clamp_min(1e-30))
        a[:d, :d] += lam * torch.eye(d, dtype=a.dtype)
        self.p = torch.linalg.inv(a)                       # (X^T X + lam I)^-1, bias included
        self.w = self.p @ st.xty[0]                        # [D+1, O]
        self.scale = 1.0 / max(float(st.yty.sum()), 1e-300)
        self.active = list(range(d + 1))                   # feature ids still in the model (bias last)
        self.pos = {f: i for i, f in enumerate(self.active)}
        self.mapping = mapping                             # root channel -> consumer input channels

    def _feats(self, atom: list[int]) -> list[int]:
        out = []
        for r in atom:
            for c in self.mapping.get(r, []):
                out.extend(range(c * self.k, (c + 1) * self.k))
        return [self.pos[f] for f in out if f in self.pos]

    def costs(self, atoms: list[list[int]]) -> torch.Tensor:
        out = torch.zeros(len(atoms), dtype=torch.float64)
        for i, atom in enumerate(atoms):
            f = self._feats(atom)
            if f:
                idx = torch.tensor(f)
                pff = self.p[idx][:, idx]
                wf = self.w[idx]
                out[i] = float((wf * torch.linalg.solve(pff, wf)).sum()) * self.scale
        return out

    def remove(self, atom: list[int]) -> None:
        f = self._feats(atom)
        if not f:
            return
        idx = torch.tensor(f)
        keep = torch.tensor([i for i in range(len(self.active)) if i not in set(f)])
        prf = self.p[keep][:, idx]
        pff_inv_pfr = torch.linalg.solve(self.p[idx][:, idx], self.p[idx][:, keep])
        wf = self.w[idx]
        self.w = self.w[keep] - prf @ torch.linalg.solve(self.p[idx][:, idx], wf)
        self.p = self.p[keep][:, keep] - prf @ pff_inv_pfr
        self.active = [self.active[i] for i in keep.tolist()]
        self.pos = {fe: i for i, fe in enumerate(self.active)}
