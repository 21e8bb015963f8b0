"""A torch-pruning ``DependencyGraph`` that knows super-resolution structure.

On top of DepGraph's own handling of concatenation, residual adds and ``x * sigmoid(mask)``:

* ``nn.PixelShuffle(r)``: a customized pruner that is channel-preserving for DepGraph (its input and
  output channels are the same prunable unit) with index mappings between the two spaces: output
  channel ``c`` is input channels ``c*r^2 .. c*r^2 + r^2 - 1``. Input channels can only be removed in
  whole blocks of ``r^2`` (anything else raises); :func:`channel_atoms` tells the pruner which root
  channels must go together.
* ``reparam.RepBlock``: every block is one unit, traced as its fused conv (so DepGraph never looks at
  the branches) and pruned by the slicers of :mod:`prune.rep`. Blocks with an identity path are
  coupled (input channels == output channels). Block classes without a slicer are *locked*.
* The network input and output: the example input is traced as a parameter-like node and the output
  as tp's output node, so a group that would change the network's input or output channels is
  recognizable (:func:`locked_reason`) and never pruned.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from reparam import RepBlock, rep_blocks

from ._tp_compat import BasePruningFunc, HybridIndex, UnwrappedParameters, add_channel_pruning_fns, set_module_name
from ._tp_compat import module_name as tp_module_name
from .rep import get_slicer

__all__ = ["SRDependencyGraph", "build_graph", "channel_atoms", "locked_reason", "PixelShuffleIndexError"]


class PixelShuffleIndexError(ValueError):
    """Channels before a PixelShuffle were pruned in an incomplete block of r^2."""


# ------------------------------------------------------------------------------------------ pruners
class _RepBlockPruner(BasePruningFunc):
    """Input and output channels of a RepBlock are independent units (no identity path)."""

    def prune_out_channels(self, layer: RepBlock, idxs: Sequence[int]) -> RepBlock:
        get_slicer(layer).prune(layer, list(idxs), None)
        return layer

    def prune_in_channels(self, layer: RepBlock, idxs: Sequence[int]) -> RepBlock:
        get_slicer(layer).prune(layer, None, list(idxs))
        return layer

    def get_out_channels(self, layer: RepBlock) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: RepBlock) -> int:
        return layer.in_channels


class _CoupledRepBlockPruner(BasePruningFunc):
    """A RepBlock with an identity path: input channel i *is* output channel i."""

    def prune_out_channels(self, layer: RepBlock, idxs: Sequence[int]) -> RepBlock:
        idxs = list(idxs)
        get_slicer(layer).prune(layer, idxs, idxs)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: RepBlock) -> int:
        return layer.out_channels

    get_in_channels = get_out_channels


class _LockedPruner(BasePruningFunc):
    """A module the pruner does not know how to slice: traced as a unit, never pruned."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError(f"no channel pruner for {type(layer).__name__} (register one with "
                                  "prune.register_rep_block)")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return self.prune_out_channels(layer, idxs)

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return getattr(layer, "out_channels", None)

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return getattr(layer, "in_channels", None)


class _PixelShufflePruner(BasePruningFunc):
    """No parameters; channel-preserving for DepGraph (index mappings live on its dependencies)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> None:
        return None

    get_in_channels = get_out_channels


class _ToShuffled:
    """Input-channel indices of a PixelShuffle(r) -> its output channels (whole r^2 blocks only)."""

    def __init__(self, r2: int, where: str) -> None:
        self.r2, self.where = r2, where

    def __call__(self, idxs: list[HybridIndex]) -> list[HybridIndex]:
        blocks: dict[int, list[HybridIndex]] = {}
        for i in idxs:
            blocks.setdefault(i.idx // self.r2, []).append(i)
        out = []
        for c, members in sorted(blocks.items()):
            if len({m.idx for m in members}) != self.r2:
                raise PixelShuffleIndexError(
                    f"{self.where}: channels feeding PixelShuffle must be pruned in whole blocks of "
                    f"{self.r2} (block {c} would be pruned partially)")
            out.extend(HybridIndex(idx=c, root_idx=m.root_idx) for m in members)
        return out


class _FromShuffled:
    """Output channels of a PixelShuffle(r) -> its input channels (r^2 each)."""

    def __init__(self, r2: int) -> None:
        self.r2 = r2

    def __call__(self, idxs: list[HybridIndex]) -> list[HybridIndex]:
        seen, out = set(), []
        for i in idxs:
            if i.idx in seen:
                continue
            seen.add(i.idx)
            out.extend(HybridIndex(idx=i.idx * self.r2 + k, root_idx=i.root_idx) for k in range(self.r2))
        return out


# ------------------------------------------------------------------------------------------- graph
class SRDependencyGraph(tp.DependencyGraph):
    """``tp.DependencyGraph`` with per-instance pruners (coupled rep blocks) and SR-aware bookkeeping."""

    def __init__(self) -> None:
        super().__init__()
        self.instance_pruners: dict[int, tuple[nn.Module, BasePruningFunc]] = {}
        self.input_params: list[torch.Tensor] = []
        self.locked_modules: dict[nn.Module, str] = {}

    def get_pruner_of_module(self, module: Any):  # noqa: ANN201 - tp's signature
        hit = self.instance_pruners.get(id(module))
        if hit is not None and hit[0] is module:
            return hit[1]
        return super().get_pruner_of_module(module)

    def module_name(self, module: Any) -> str:
        return tp_module_name(self, module)


@contextlib.contextmanager
def _tracing_form(model: nn.Module) -> Iterator[None]:
    """Run every outermost RepBlock as its fused conv(s) (detached) while DepGraph traces; restore
    forwards and train/eval flags afterwards."""
    flags = {m: m.training for m in model.modules()}
    patched = []
    try:
        model.eval()
        fused = []
        with torch.no_grad():
            for _, b in rep_blocks(model):
                try:
                    fused.append((b, b.fuse()))
                except Exception:  # noqa: BLE001 - a block that cannot fuse is traced as it is (and locked)
                    if get_slicer(b) is not None:
                        raise
        for block, f in fused:
            block.forward = (lambda x, _f=f: _f(x))  # instance attribute shadows the class forward
            patched.append(block)
        yield
    finally:
        for block in patched:
            block.__dict__.pop("forward", None)
        for m, t in flags.items():
            m.training = t


def _add_pixel_shuffle_mappings(dg: SRDependencyGraph) -> None:
    for module, node in dg.module2node.items():
        if not isinstance(module, nn.PixelShuffle):
            continue
        r2 = module.upscale_factor ** 2
        for in_node in node.inputs:
            for dep in in_node.dependencies:          # producer -> shuffle: input space -> output space
                if dep.target is node:
                    dep.index_mapping[1] = _ToShuffled(r2, dg.module_name(in_node.module))
            for dep in node.dependencies:             # shuffle -> producer: output space -> input space
                if dep.target is in_node:
                    dep.index_mapping[0] = _FromShuffled(r2)


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    # tp's default calls model(*example_inputs), which unbinds a tensor along the batch dimension.
    # The outputs are cloned so that tp always creates its output node: when the last op is a module
    # (e.g. nn.PixelShuffle), tp would otherwise map the root grad_fn to that module and lose the output.
    if isinstance(example_inputs, dict):
        out = model(**example_inputs)
    elif isinstance(example_inputs, (list, tuple)):
        out = model(*example_inputs)
    else:
        out = model(example_inputs)
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(o.clone() if isinstance(o, torch.Tensor) else o for o in out)
    return out


def build_graph(model: nn.Module, example_inputs: Any) -> SRDependencyGraph:
    """Trace ``model`` (in place, nothing is changed) into an :class:`SRDependencyGraph`."""
    customized: dict[Any, BasePruningFunc] = {nn.PixelShuffle: _PixelShufflePruner()}
    coupled_pruners: dict[type, _CoupledRepBlockPruner] = {}
    dg = SRDependencyGraph()
    for name, block in rep_blocks(model):
        cls = type(block)
        slicer = get_slicer(cls)
        if slicer is None:
            customized.setdefault(cls, _LockedPruner())
            dg.locked_modules[block] = f"{name or cls.__name__}: no channel pruner for {cls.__name__}"
            continue
        customized.setdefault(cls, _RepBlockPruner())
        if slicer.coupled(block):
            p = coupled_pruners.setdefault(cls, _CoupledRepBlockPruner())
            dg.instance_pruners[id(block)] = (block, p)
    for name, m in model.named_modules():
        if isinstance(m, nn.PixelUnshuffle):
            customized.setdefault(nn.PixelUnshuffle, _LockedPruner())
            dg.locked_modules[m] = f"{name}: PixelUnshuffle is not supported"
    # The network input, traced as a leaf 'parameter' so that residuals to the input are visible.
    unwrapped: list[UnwrappedParameters] = []
    if isinstance(example_inputs, torch.Tensor):
        inp = example_inputs.detach().clone().requires_grad_(True)
        unwrapped.append(UnwrappedParameters(parameters=inp, pruning_dim=1))
        dg.input_params.append(inp)
        example_inputs = inp
    with _tracing_form(model):
        dg.build_dependency(model, example_inputs=example_inputs, forward_fn=_forward, customized_pruners=customized,
                            unwrapped_parameters=unwrapped, verbose=False)
    for p in {id(p): p for p in coupled_pruners.values()}.values():
        add_channel_pruning_fns(dg, p)
    for inp in dg.input_params:
        set_module_name(dg, inp, "<network input>")
    _add_pixel_shuffle_mappings(dg)
    return dg


# ------------------------------------------------------------------------------------ group facts
def locked_reason(dg: SRDependencyGraph, group: Any, ignored: set[nn.Module] | None = None) -> str | None:
    """Why ``group`` must not be pruned, or None if it may be."""
    ignored = ignored or set()
    for dep, _ in group:
        target = dep.target
        if target.type == ops.OPTYPE.OUTPUT:
            return "changes the network's output channels"
        if any(target.module is p for p in dg.input_params):
            return "changes the network's input channels (residual to the input)"
        if target.module in dg.locked_modules:
            return dg.locked_modules[target.module]
        name = getattr(target.grad_fn, "name", lambda: "")()
        if target.type == ops.OPTYPE.ELEMENTWISE and "pixel" in name.lower():
            return f"functional {name} (use nn.PixelShuffle modules)"
        if target.type == ops.OPTYPE.SPLIT:
            return ("its output is split with torch.split/chunk (split sizes are Python ints in the "
                    "model's forward and would go stale)")
        if target.module in ignored and dg.is_out_channel_pruning_fn(dep.handler):
            return f"{dg.module_name(target.module)} is in ignored_layers"
    return None


def channel_atoms(group: Any) -> list[list[int]]:
    """Root channel indices of a full group that must be removed together (PixelShuffle blocks);
    every other root channel is its own atom. Sorted by smallest member."""
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i in group[0].root_idxs:
        find(int(i))
    # tp merges group items by index, keeping one root per index; so read the blocks on the shuffle's
    # *input* side (index // r^2), where every index appears once with its own root.
    shuffles = {item.dep.target for item in group if isinstance(item.dep.target.module, nn.PixelShuffle)}
    for ps in shuffles:
        r2 = ps.module.upscale_factor ** 2
        for item in group:
            if item.dep.target not in ps.inputs:
                continue
            by_block: dict[int, list[int]] = {}
            for idx, root in zip(item.idxs, item.root_idxs):
                if root is not None:
                    by_block.setdefault(int(idx) // r2, []).append(int(root))
            for roots in by_block.values():
                for r in roots[1:]:
                    parent[find(r)] = find(roots[0])
    atoms: dict[int, list[int]] = {}
    for i in parent:
        atoms.setdefault(find(i), []).append(i)
    return sorted((sorted(a) for a in atoms.values()), key=lambda a: a[0])
