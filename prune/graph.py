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
* Structures DepGraph does not map channel by channel (reductions over channels, LayerNorm, permutes,
  ``torch.cat([x, x])``, grouped convs, unknown operations, ...) are found in the traced graph and
  locked, and the channel mappings of ``torch.cat`` / ``torch.split`` and broadcast operands are
  installed from the traced shapes (:mod:`prune.structure`). A group DepGraph fails on is locked
  (:meth:`SRDependencyGraph.get_all_groups`, :func:`prune_group`), and :func:`verify_groups` checks
  every prunable group against zeroing its channels before anything is removed.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from reparam import RepBlock, rep_blocks

from ._tp_compat import BasePruningFunc, HybridIndex, UnwrappedParameters, add_channel_pruning_fns, set_module_name
from ._tp_compat import module_name as tp_module_name
from .rep import get_slicer
from .structure import OpRecorder, analyse, check_index_mappings, failing_groups, one_line

__all__ = ["SRDependencyGraph", "build_graph", "channel_atoms", "locked_reason", "PixelShuffleIndexError",
           "GroupPruneError", "prune_group", "verify_groups"]


class PixelShuffleIndexError(ValueError):
    """Channels before a PixelShuffle were pruned in an incomplete block of r^2."""


class GroupPruneError(ValueError):
    """torch-pruning failed to prune a group; the layers of the group are left as they were."""


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
        #: modules and traced operations whose channels cannot be removed one by one -> why
        self.structure_locks: dict[Any, str] = {}
        #: root module name -> why torch-pruning could not build its group
        self.group_errors: dict[str, str] = {}
        #: root module name -> why removing its channels is not zeroing them (None: checked, fine)
        self.checked: dict[str, str | None] = {}
        self.example_inputs: torch.Tensor | None = None
        self.recorder: OpRecorder | None = None

    def get_pruner_of_module(self, module: Any):  # noqa: ANN201 - tp's signature
        hit = self.instance_pruners.get(id(module))
        if hit is not None and hit[0] is module:
            return hit[1]
        return super().get_pruner_of_module(module)

    def module_name(self, module: Any) -> str:
        return tp_module_name(self, module)

    def _build_dependency(self, module2node: Any) -> None:
        # tp's hook between tracing and its shape inference / index mappings: read the structure of the
        # traced graph first (tp's concat-size inference fails on e.g. torch.cat([x, x]) of the input).
        super()._build_dependency(module2node)
        analyse(self, self.recorder)

    def get_all_groups(self, ignored_layers: Iterable[nn.Module] = (),
                       root_module_types: Sequence[type] = (ops.TORCH_CONV, ops.TORCH_LINEAR)) -> Iterator[Any]:
        """Every group with full indices, one per root layer, as ``tp.DependencyGraph.get_all_groups``;
        a root whose group torch-pruning cannot build is recorded in :attr:`group_errors` (with the
        exception) instead of raising."""
        ignored = list(ignored_layers) + list(self.IGNORED_LAYERS_IN_TRACING)
        visited: set[int] = set()
        for m in list(self.module2node.keys()):
            if any(m is i for i in ignored) or not isinstance(m, tuple(root_module_types)) or id(m) in visited:
                continue
            try:
                pruner = self.get_pruner_of_module(m)
                n = None if pruner is None else pruner.get_out_channels(m)
                if n is None:
                    continue
                group = self.get_pruning_group(m, pruner.prune_out_channels, list(range(n)))
            except Exception as e:  # noqa: BLE001 - any tp failure locks this group, never the run
                name = self.module_name(m)
                self.group_errors.setdefault(name, f"{name}: torch-pruning cannot build its group ({one_line(e)})")
                continue
            prunable = True
            for dep, _ in group:
                if self.is_out_channel_pruning_fn(dep.handler):
                    visited.add(id(dep.target.module))
                    if any(dep.target.module is i for i in ignored):
                        prunable = False
            if prunable:
                yield group


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


def _forward(model: nn.Module, example_inputs: Any, recorder: OpRecorder | None = None) -> Any:
    # tp's default calls model(*example_inputs), which unbinds a tensor along the batch dimension.
    # The outputs are cloned so that tp always creates its output node: when the last op is a module
    # (e.g. nn.PixelShuffle), tp would otherwise map the root grad_fn to that module and lose the output.
    with recorder.watch(model) if recorder is not None else contextlib.nullcontext():
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
        dg.example_inputs = example_inputs.detach()
        inp = example_inputs.detach().clone().requires_grad_(True)
        unwrapped.append(UnwrappedParameters(parameters=inp, pruning_dim=1))
        dg.input_params.append(inp)
        example_inputs = inp
    dg.recorder = OpRecorder()
    ran = []

    def forward(m: nn.Module, x: Any) -> Any:
        out = _forward(m, x, dg.recorder)
        ran.append(True)
        return out

    try:
        with _tracing_form(model):
            dg.build_dependency(model, example_inputs=example_inputs, forward_fn=forward,
                                customized_pruners=customized, unwrapped_parameters=unwrapped, verbose=False)
    except Exception as e:
        if not ran:
            raise                       # the model's own forward failed: its error, unchanged
        raise ValueError(f"model: torch-pruning cannot trace {type(model).__name__} ({one_line(e)})") from e
    finally:
        dg.recorder = None              # drops the references to the autograd graph
    for p in {id(p): p for p in coupled_pruners.values()}.values():
        add_channel_pruning_fns(dg, p)
    for inp in dg.input_params:
        set_module_name(dg, inp, "<network input>")
    _add_pixel_shuffle_mappings(dg)
    check_index_mappings(dg)
    return dg


# ------------------------------------------------------------------------------------ group facts
def locked_reason(dg: SRDependencyGraph, group: Any, ignored: set[nn.Module] | None = None) -> str | None:
    """Why ``group`` must not be pruned, or None if it may be. A structure whose channels cannot be
    removed one by one (:attr:`SRDependencyGraph.structure_locks`) is named first."""
    ignored = ignored or set()
    locks = getattr(dg, "structure_locks", {})
    for dep, _ in group:
        if dep.target.module in locks:
            return locks[dep.target.module]
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


# --------------------------------------------------------------------------------- safe pruning
def _module_state(m: nn.Module) -> dict[str, Any]:
    return {k: (copy.copy(v) if isinstance(v, (dict, list)) else v) for k, v in m.__dict__.items()}


def prune_group(dg: SRDependencyGraph, group: Any) -> None:
    """``group.prune()``, all or nothing: channel indices are checked against every layer first, the
    group's unwrapped parameters are pruned last, and if torch-pruning fails part-way every module of the
    group is restored and :class:`GroupPruneError` (one line naming the group's root) is raised."""
    name = dg.module_name(group[0].dep.target.module)
    saved: dict[int, tuple[nn.Module, dict[str, Any]]] = {}
    for item in group:
        t, h = item.dep.target.module, item.dep.handler
        if isinstance(t, nn.Module):
            for m in t.modules():
                saved.setdefault(id(m), (m, _module_state(m)))
        if not item.idxs or not isinstance(t, (nn.Module, torch.Tensor)):
            continue
        try:
            if isinstance(t, torch.Tensor):
                n = int(t.shape[dg.module2node[t].pruning_dim])
            else:
                n = dg.get_out_channels(t) if dg.is_out_channel_pruning_fn(h) else dg.get_in_channels(t)
        except Exception:  # noqa: BLE001 - a count tp cannot read is not checked here
            n = None
        if n is not None and (min(item.idxs) < 0 or max(item.idxs) >= n):
            raise GroupPruneError(f"{name}: torch-pruning maps channel {max(item.idxs)} of "
                                  f"{dg.module_name(t)}, which has {n}")
    # unwrapped parameters are replaced on their parent modules (outside the group): prune them last, so
    # that a failure leaves nothing that cannot be restored (the root stays first, it names the history)
    group.items.sort(key=lambda item: isinstance(item.dep.target.module, torch.Tensor))
    try:
        group.prune()
    except Exception as e:  # noqa: BLE001 - restore, then one clear error
        for m, state in saved.values():
            m.__dict__.clear()
            m.__dict__.update(state)
        raise GroupPruneError(f"{name}: torch-pruning failed to prune this group ({one_line(e)})") from e


def _check_channels(group: Any) -> list[int]:
    """Root channels a masking check removes: the first, middle and last atom (at least one atom kept)."""
    atoms = channel_atoms(group)
    if len(atoms) < 2:
        return []
    picks = sorted({0, len(atoms) // 2, len(atoms) - 1})
    picks = picks[:len(atoms) - 1]
    return sorted(c for i in picks for c in atoms[i])


def verify_groups(dg: SRDependencyGraph, groups: Sequence[tuple[str, Any]]) -> dict[str, str]:
    """``{root name: reason}`` of the ``(root name, full group)`` pairs whose pruning is *not* the network
    with those channels zeroed at every layer that reads them (:func:`prune.structure.failing_groups`, on
    a float64 copy of ``dg.model`` with ``dg.example_inputs``). Each root is checked once per graph.

    Groups that slice a ``reparam.RepBlock`` are not checked: a block's slicer may change its internal
    widths by design (RRRB and ERB keep their expanded width at ``ratio * C``), so removing a channel
    there is not zeroing it; the slicers are exact in the block's own terms (:mod:`prune.rep`)."""
    if dg.example_inputs is None:
        return {}
    plans = []
    for name, group in groups:
        if name in dg.checked:
            continue
        if any(isinstance(item.dep.target.module, RepBlock) for item in group):
            dg.checked[name] = None
            continue
        idxs = _check_channels(group)
        try:
            ok = bool(idxs) and dg.check_pruning_group(dg.get_pruning_group(group[0].dep.target.module,
                                                                            group[0].dep.handler, idxs))
        except Exception as e:  # noqa: BLE001 - tp cannot even form the group for a few channels
            dg.checked[name] = f"torch-pruning cannot build it for a few channels ({one_line(e)})"
            continue
        if ok:
            plans.append((name, idxs))
        else:
            dg.checked[name] = None     # nothing removable: check_pruning_group keeps it whole anyway
    try:
        found = failing_groups(dg.model, dg.example_inputs, plans, build_graph)
    except Exception as e:
        raise ValueError(f"model: the pruning groups of {type(dg.model).__name__} cannot be checked on a copy "
                         f"({one_line(e)})") from e
    for name, _ in plans:
        dg.checked[name] = found.get(name)
    return {name: why for name, _ in groups if (why := dg.checked.get(name)) is not None}
