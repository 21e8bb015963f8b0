"""Plain per-filter L2 importance for DepGraph groups (rep blocks included)."""
from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from reparam import RepBlock

__all__ = ["L2FilterImportance", "ActivationImportance", "rep_block_output_kernel"]

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

        flags = {m: m.training for m in model.modules()}
        handles = [m.register_forward_hook(hook) for m in watched]
        try:
            model.eval()
            p = next(model.parameters())
            with torch.no_grad():
                model(self.inputs.to(device=p.device, dtype=p.dtype))
        finally:
            for h in handles:
                h.remove()
            for m, t in flags.items():
                m.training = t
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
