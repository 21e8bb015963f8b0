"""Which channels of a traced network torch-pruning may remove, and which it must leave alone.

DepGraph treats every operation it does not know as element-wise: channel ``c`` in, channel ``c``
out. That is wrong for operations that mix channels, and removing channels through them gives a
network that is *silently different* from the original with those channels zeroed. This module reads
the traced autograd graph (operation names, saved arguments and tensor shapes) and

* **locks** every operation and module whose channels cannot be removed one by one: reductions over
  the channel dim (``x.mean(1)`` / ``var`` / ``sum`` / ``norm`` / ``softmax`` ... as in a hand-written
  ``LayerNorm2d``), ``nn.LayerNorm`` / ``nn.GroupNorm``, permutes and reshapes that move or merge the
  channel dim, ``torch.cat`` of a tensor with itself and ``Tensor.repeat`` over channels, slices of
  channels, grouped convolutions other than depthwise ones (``groups == in == out channels``), and any
  operation it does not recognise. A group of channels that reaches a locked item is never pruned and
  is reported with the item's reason (:func:`prune.graph.locked_reason`); DepGraph follows no channel
  *out of* a locked item (its channels beyond it need not, and often cannot, be mapped). Operations
  inside modules DepGraph prunes as a whole (convs, norms, rep blocks) are left to their pruners;
* **fixes the channel index mappings** DepGraph derives from incomplete shape inference: the sizes of
  every channel ``torch.cat`` are read from the traced shapes, every ``torch.split`` / ``chunk`` output
  is mapped to its own piece (a piece read by several operations, or pieces re-concatenated in another
  order, included), and an operand that is *broadcast* over the channels (a ``[B, 1, H, W]`` attention
  map, a scalar) is decoupled from the channels it multiplies;
* **checks groups by masking** (:func:`failing_groups`): a few channels of each prunable group are
  removed on a float64 copy, and the output must equal the original network with those channels zeroed
  at every layer that reads them. A group that fails (or whose pruned network does not run) is locked.
"""
from __future__ import annotations

import contextlib
import copy
import re
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning import ops

from ._tp_compat import HybridIndex

__all__ = ["OpRecorder", "analyse", "check_index_mappings", "failing_groups", "masking_check", "op_kind",
           "CheckPlan", "one_line"]

#: Element-wise operations (names of their autograd nodes, without ``Backward<n>``): channel ``c`` of the
#: output depends on channel ``c`` of each operand only (operands may broadcast).
POINTWISE = frozenset("""
add sub rsub mul div neg relu leakyrelu rrelu gelu silu sigmoid logsigmoid tanh hardtanh hardsigmoid hardswish
elu celu selu softplus softshrink hardshrink tanhshrink mish clamp clampmin clampmax threshold pow sqrt rsqrt
exp exp2 expm1 log log1p log2 log10 abs reciprocal sin cos erf clone tocopy alias maximum minimum where lerp
addcmul addcdiv fmod remainder atan2 sign sgn floor ceil round trunc frac square
""".split())

#: Spatial operations on NCHW tensors (pooling, resizing, padding): channel ``c`` in, channel ``c`` out.
SPATIAL = frozenset("""
maxpool2dwithindices maxpool2d avgpool2d adaptiveavgpool2d adaptivemaxpool2d upsamplebilinear2d
upsamplenearest2d upsamplebicubic2d upsamplenearestexact2d upsamplebilinear2daa upsamplebicubic2daa
reflectionpad2d replicationpad2d constantpadnd
""".split())

#: Operations along ``dim`` (reductions, normalizations over a dim, scans): safe unless ``dim`` is the
#: channel (or batch) dim.
ALONG_DIM = frozenset("""
mean sum nansum var std varmean stdmean amax amin max min linalgvectornorm norm logsumexp prod softmax
logsoftmax cumsum cumprod cummax cummin median nanmedian kthvalue sort topk roll flip
""".split())

#: Shape-only operations: safe when they keep the batch and channel dims (or only add/remove singletons).
VIEWS = frozenset("view reshapealias unsafeview reshape unsqueeze squeeze".split())

_U64 = 1 << 64


def op_kind(grad_fn: Any) -> str:
    """The operation's name without the ``Backward<n>`` suffix, lower case (``MeanBackward1`` -> ``mean``)."""
    name = grad_fn.name() if hasattr(grad_fn, "name") else type(grad_fn).__name__
    return re.sub(r"backward\d*$", "", name.split("::")[-1].lower())


def _op_label(grad_fn: Any) -> str:
    return grad_fn.name().split("::")[-1] if hasattr(grad_fn, "name") else type(grad_fn).__name__


def _dim(d: Any, ndim: int) -> int:
    d = int(d)
    if d >= 1 << 63:                 # negative dims are saved as unsigned 64-bit integers
        d -= _U64
    return d + ndim if d < 0 else d


def _dims(saved: Any, ndim: int) -> list[int] | None:
    """Normalized dims of a saved ``dim`` argument (None: all dims)."""
    if saved is None:
        return None
    if isinstance(saved, (tuple, list)):
        return [_dim(d, ndim) for d in saved] or None
    return [_dim(saved, ndim)]


# ------------------------------------------------------------------------------- traced forward
class OpRecorder(TorchFunctionMode):
    """Records, for every autograd node created while a model runs, the innermost module that was
    running (for messages) and the shapes of the tensors it produced.

    Use :meth:`watch` around the forward pass (it registers and removes the module hooks).
    """

    def __init__(self) -> None:
        super().__init__()
        self.owner: dict[Any, str] = {}      # autograd node -> qualified name of the innermost module
        self.shapes: dict[tuple[Any, int], tuple[int, ...]] = {}
        self._stack: list[str] = []

    @contextlib.contextmanager
    def watch(self, model: nn.Module) -> Iterator[OpRecorder]:
        def enter(label: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _args: Any) -> None:
                self._stack.append(label)
            return hook

        def leave(_m: nn.Module, _args: Any, _out: Any) -> None:
            if self._stack:
                self._stack.pop()

        handles = []
        for name, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(enter(name)))
            handles.append(m.register_forward_hook(leave))
        try:
            with self:
                yield self
        finally:
            for h in handles:
                h.remove()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        where = self._stack[-1] if self._stack else None
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                self.shapes.setdefault((t.grad_fn, t.output_nr), tuple(t.shape))
                if where is not None:
                    self._claim(t.grad_fn, where)
        return out

    def _claim(self, grad_fn: Any, where: str) -> None:
        """Own ``grad_fn`` and every not yet owned node it was computed from (ops inside composites)."""
        stack = [grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in self.owner:
                continue
            self.owner[fn] = where
            stack.extend(f for f, _ in getattr(fn, "next_functions", ()))


# ------------------------------------------------------------------------------------ shapes
class _Shapes:
    def __init__(self, recorder: OpRecorder | None) -> None:
        self.recorded = recorder.shapes if recorder is not None else {}

    def output(self, fn: Any, nr: int = 0) -> tuple[int, ...] | None:
        if fn is None:
            return None
        var = getattr(fn, "variable", None)
        if isinstance(var, torch.Tensor):
            return tuple(var.shape)
        try:
            return tuple(fn._input_metadata[nr].shape)
        except (AttributeError, IndexError, RuntimeError):
            return self.recorded.get((fn, nr))


def _traced_inputs(dg: Any, grad_fn: Any) -> list[tuple[Any, int]]:
    """``(autograd node, output index)`` of each input DepGraph linked, in its ``node.inputs`` order."""
    unwrapped = [p for p, _ in getattr(dg, "unwrapped_parameters", [])]
    out = []
    for f, nr in getattr(grad_fn, "next_functions", ()):
        if f is None:
            continue
        if "accumulategrad" in f.name().lower() and not any(f.variable is p for p in unwrapped):
            continue
        out.append((f, nr))
    return out


# ------------------------------------------------------------------------------- index mappings
class _Drop:
    """No channel of one side corresponds to a channel of the other (a broadcast operand)."""

    def __call__(self, idxs: list[HybridIndex]) -> list[HybridIndex]:
        return []


class _PieceMapping:
    """Channels of a split input <-> channels of one of its pieces ``[start, stop)``."""

    def __init__(self, start: int, stop: int, to_piece: bool) -> None:
        self.start, self.stop, self.to_piece = start, stop, to_piece

    def __call__(self, idxs: list[HybridIndex]) -> list[HybridIndex]:
        if self.to_piece:
            return [HybridIndex(idx=i.idx - self.start, root_idx=i.root_idx) for i in idxs
                    if self.start <= i.idx < self.stop]
        return [HybridIndex(idx=i.idx + self.start, root_idx=i.root_idx) for i in idxs]


class _CatMapping:
    """Channels of input ``k`` of a channel ``torch.cat`` <-> channels of its output. Offsets are read
    from the cat's current sizes (DepGraph updates them as channels are removed)."""

    def __init__(self, cat: Any, k: int, to_output: bool) -> None:
        self.cat, self.k, self.to_output = cat, k, to_output

    def __call__(self, idxs: list[HybridIndex]) -> list[HybridIndex]:
        sizes = self.cat.concat_sizes
        start = sum(sizes[:self.k])
        if self.to_output:
            return [HybridIndex(idx=i.idx + start, root_idx=i.root_idx) for i in idxs]
        stop = start + sizes[self.k]
        return [HybridIndex(idx=i.idx - start, root_idx=i.root_idx) for i in idxs if start <= i.idx < stop]


_OWN_MAPPINGS = (_Drop, _PieceMapping, _CatMapping)


def _deps_between(a: Any, b: Any) -> list[Any]:
    """Every dependency from node ``a`` to node ``b`` and from ``b`` to ``a``."""
    return [d for d in a.dependencies if d.target is b] + [d for d in b.dependencies if d.target is a]


def _occurrences(deps: list[Any], target: Any) -> list[Any]:
    return [d for d in deps if d.target is target]


# ------------------------------------------------------------------------------------- analysis
#: Modules DepGraph prunes as a whole with its own pruners (the operations inside them are theirs).
_TP_MODULES = (ops.TORCH_CONV, ops.TORCH_LINEAR, ops.TORCH_BATCHNORM, ops.TORCH_LAYERNORM, ops.TORCH_GROUPNORM,
               ops.TORCH_INSTANCENORM, ops.TORCH_PRELU, ops.TORCH_EMBED, ops.TORCH_MHA, ops.TORCH_LSTM)


class _Analysis:
    def __init__(self, dg: Any, recorder: OpRecorder | None) -> None:
        self.dg = dg
        self.shapes = _Shapes(recorder)
        self.owner = recorder.owner if recorder is not None else {}
        self.named = dict(dg.model.named_modules())
        self.model_modules = {id(m) for m in self.named.values()}
        self.unit_names = [n for n, m in self.named.items() if n and (
            m in dg.locked_modules or type(m) in dg.CUSTOMIZED_PRUNERS or isinstance(m, _TP_MODULES))]

    # ----------------------------------------------------------------------------- helpers
    def where(self, node: Any) -> str:
        name = self.owner.get(node.grad_fn)
        m = self.named.get(name) if name is not None else None
        if not name or m is None:
            return f"{type(self.dg.model).__name__}.forward"
        return f"{name} ({type(m).__name__})"

    def inside_unit(self, node: Any) -> bool:
        """An operation inside a module DepGraph prunes as one unit (conv, norm, rep block, locked module)."""
        name = self.owner.get(node.grad_fn)
        return bool(name) and any(name == u or name.startswith(u + ".") for u in self.unit_names)

    def lock(self, key: Any, reason: str) -> None:
        self.dg.structure_locks.setdefault(key, reason)

    # ----------------------------------------------------------------------------- entry
    def run(self) -> None:
        for key, node in list(self.dg.module2node.items()):
            if node.type == ops.OPTYPE.OUTPUT or isinstance(key, torch.Tensor):
                continue
            try:
                if id(key) in self.model_modules:
                    self.module(key, node)
                elif not self.inside_unit(node):
                    self.operation(key, node)
            except Exception as e:  # noqa: BLE001 - what cannot be read is not pruned
                label = _op_label(node.grad_fn) if node.grad_fn is not None else type(key).__name__
                self.lock(key, f"{self.where(node)}: {label} could not be analysed ({one_line(e)}); its "
                               "channels are not pruned")

    # ----------------------------------------------------------------------------- modules
    def module(self, m: nn.Module, node: Any) -> None:
        name = self.dg.module_name(m)
        cls = type(m).__name__
        if isinstance(m, ops.TORCH_CONV) and m.groups > 1:
            depthwise = (not m.transposed and m.groups == m.in_channels == m.out_channels)
            if not depthwise:
                self.lock(m, f"{name}: grouped convolution {cls}(groups={m.groups}, {m.in_channels}->"
                             f"{m.out_channels} channels); only depthwise convs (groups == in == out channels) "
                             "are pruned channel by channel")
        elif isinstance(m, nn.LayerNorm):
            self.lock(m, f"{name}: nn.LayerNorm normalizes over its channels; removing a channel changes "
                         "every other channel")
        elif isinstance(m, nn.GroupNorm) and m.num_groups != m.num_channels:
            self.lock(m, f"{name}: nn.GroupNorm(num_groups={m.num_groups}) normalizes over groups of channels; "
                         "removing a channel changes the others of its group")
        elif isinstance(m, (nn.Embedding, nn.MultiheadAttention, nn.LSTM)):
            self.lock(m, f"{name}: {cls} is not pruned channel by channel")
        elif isinstance(m, nn.Linear):
            shape = self.shapes.output(node.grad_fn)
            if shape is None or len(shape) != 2:
                self.lock(m, f"{name}: nn.Linear on a {len(shape) if shape else '?'}-d tensor acts on its last "
                             "dim, not on the channels of an NCHW feature map")

    # -------------------------------------------------------------------------- operations
    def operation(self, key: Any, node: Any) -> None:
        fn = node.grad_fn
        kind = op_kind(fn)
        label = _op_label(fn)
        where = self.where(node)
        out = self.shapes.output(fn)
        ins = _traced_inputs(self.dg, fn)
        if not ins:
            return              # computed from module parameters or constants only: no feature map flows in
        in_shapes = [self.shapes.output(f, nr) for f, nr in ins]
        if node.type == ops.OPTYPE.CONCAT:
            return self.concat(key, node, where, out, ins, in_shapes)
        if node.type == ops.OPTYPE.SPLIT:
            return self.split(key, node, where, ins, in_shapes)
        if out is None or any(s is None for s in in_shapes):
            return self.lock(key, f"{where}: the tensor shapes of {label} could not be read, so its channels "
                                  "cannot be followed")
        if len(out) < 2:
            if all(len(s) < 2 for s in in_shapes):
                return                                     # scalars / vectors: no channel dim involved
            return self.lock(key, f"{where}: {label} reduces a feature map to {len(out)}-d, mixing its channels")
        if node.type == ops.OPTYPE.SLICE:
            return self.slice(key, node, where, label, out, in_shapes)
        if kind in POINTWISE:
            return self.pointwise(key, node, where, label, out, ins, in_shapes)
        if kind in SPATIAL:
            if len(out) == 4 and all(len(s) == 4 and s[1] == out[1] for s in in_shapes):
                return
            return self.lock(key, f"{where}: {label} on a {len(out)}-d tensor changes its channel dim")
        if kind in ALONG_DIM:
            return self.along_dim(key, fn, where, label, kind, out, in_shapes)
        if kind in VIEWS:
            return self.view(key, where, label, out, in_shapes)
        if kind == "permute":
            dims = [_dim(d, len(out)) for d in fn._saved_dims]
            if dims[:2] == [0, 1]:
                return
            return self.lock(key, f"{where}: permute{tuple(dims)} moves the channel dim (e.g. to apply a "
                                  "channels-last LayerNorm / Linear); its channels cannot be followed")
        if kind == "transpose":
            dims = {_dim(fn._saved_dim0, len(out)), _dim(fn._saved_dim1, len(out))}
            if not dims & {0, 1}:
                return
            return self.lock(key, f"{where}: transpose{tuple(sorted(dims))} moves the channel dim; its channels "
                                  "cannot be followed")
        if kind == "repeat":
            reps = list(fn._saved_repeats)          # one per output dim
            if reps[1] == 1:
                return self.pointwise(key, node, where, label, out, ins, in_shapes)
            return self.lock(key, f"{where}: Tensor.repeat repeats the channels {reps[1]} times (the same "
                                  "channel appears several times); its channels are not pruned")
        if kind == "expand":
            src = in_shapes[0] if in_shapes else None
            a = 1 - (len(out) - len(src)) if src is not None else -1
            if src is not None and 0 <= a < len(src) and src[a] == out[1]:
                return
            return self.lock(key, f"{where}: {label} broadcasts one channel to {out[1]} (the count is a Python "
                                  "int of the forward); its channels are not pruned")
        self.lock(key, f"{where}: {label} is not known to keep channels independent (only element-wise, "
                       "spatial and per-channel operations are followed); its channels are not pruned")

    def concat(self, key: Any, node: Any, where: str, out: Any, ins: list, in_shapes: list) -> None:
        fn = node.grad_fn
        ndim = len(out) if out is not None else (len(in_shapes[0]) if in_shapes and in_shapes[0] else 0)
        dim = _dim(getattr(fn, "_saved_dim", 1), ndim) if ndim else None
        if out is None or dim is None or any(s is None for s in in_shapes) or len(ins) != len(node.inputs):
            key.concat_sizes = [0] * len(node.inputs)   # DepGraph then maps nothing (it cannot infer them either)
            node.enable_index_mapping = False
            return self.lock(key, f"{where}: the shapes of a torch.cat could not be read; its channels are "
                                  "not pruned")
        if dim != 1:
            if all(len(s) == len(out) and s[1] == out[1] for s in in_shapes):
                node.enable_index_mapping = False           # along another dim: channel c stays channel c
                return
            return self.lock(key, f"{where}: torch.cat along dim {dim} mixes the channel layout")
        counts: dict[tuple[int, int], int] = {}
        for f, nr in ins:
            counts[(id(f), nr)] = counts.get((id(f), nr), 0) + 1
        repeated = max(counts.values(), default=1)
        sizes = [int(s[1]) for s in in_shapes]
        if sum(sizes) != out[1]:
            key.concat_sizes = [0] * len(node.inputs)
            node.enable_index_mapping = False
            return self.lock(key, f"{where}: torch.cat sizes {sizes} do not add up to {out[1]} channels")
        key.concat_sizes = sizes
        if repeated > 1:
            self.lock(key, f"{where}: torch.cat concatenates the same tensor {repeated} times along the "
                           "channels (as torch.cat([x, x, ...], 1)); the copies cannot be pruned apart")
        # Install the mappings (DepGraph's own ones pair inputs and dependencies by position only).
        node.enable_index_mapping = False
        for k, in_node in enumerate(node.inputs):
            back = _occurrences(node.dependencies, in_node)
            fwd = _occurrences(in_node.dependencies, node)
            nth = sum(1 for j in range(k) if node.inputs[j] is in_node)
            if nth < len(back):
                back[nth].index_mapping[1] = _CatMapping(key, k, to_output=False)
            if nth < len(fwd):
                fwd[nth].index_mapping[1] = _CatMapping(key, k, to_output=True)

    def split(self, key: Any, node: Any, where: str, ins: list, in_shapes: list) -> None:
        """Map each consumer of a channel split to the piece it reads (DepGraph assumes consumer ``i``
        reads piece ``i``, which fails when a piece has several readers)."""
        fn = node.grad_fn
        try:
            pieces = [tuple(m.shape) for m in fn._input_metadata]
        except (AttributeError, RuntimeError):
            pieces = []
        src = in_shapes[0] if in_shapes else None
        if not pieces or src is None:
            node.enable_index_mapping = False
            return self.lock(key, f"{where}: the pieces of a torch.split/chunk could not be read; its channels "
                                  "are not pruned")
        dim = _dim(getattr(fn, "_saved_dim", 0), len(src))
        node.enable_index_mapping = False
        if dim != 1:
            return
        offsets = [0]
        for p in pieces:
            offsets.append(offsets[-1] + int(p[1]))
        # consumer nodes in DepGraph's order; each occurrence reads the piece its autograd input names
        reads: dict[int, list[int]] = {}
        for out_node in dict.fromkeys(node.outputs):
            nrs = [nr for f, nr in getattr(out_node.grad_fn, "next_functions", ()) if f is fn]
            reads[id(out_node)] = nrs
        seen: dict[int, int] = {}
        mapped = True
        for out_node in node.outputs:
            k = seen.get(id(out_node), 0)
            seen[id(out_node)] = k + 1
            nrs = reads.get(id(out_node), [])
            fwd = _occurrences(node.dependencies, out_node)
            back = _occurrences(out_node.dependencies, node)
            if k >= len(nrs) or k >= len(fwd) or k >= len(back):
                mapped = False
                continue
            lo, hi = offsets[nrs[k]], offsets[nrs[k] + 1]
            fwd[k].index_mapping[0] = _PieceMapping(lo, hi, to_piece=True)
            back[k].index_mapping[0] = _PieceMapping(lo, hi, to_piece=False)
        if not mapped:
            self.lock(key, f"{where}: the readers of a torch.split/chunk could not be matched to its pieces")

    def slice(self, key: Any, node: Any, where: str, label: str, out: Any, in_shapes: list) -> None:
        fn = node.grad_fn
        src = in_shapes[0]
        dim = _dim(fn._saved_dim, len(src))
        if dim != 1:
            node.enable_index_mapping = False
            return
        start, step = _dim(fn._saved_start, src[1]), int(fn._saved_step)
        end = int(fn._saved_end)
        if end >= 1 << 63:              # negative ends are saved as unsigned 64-bit integers
            end -= _U64
        end = min(end + src[1] if end < 0 else end, src[1])
        if start == 0 and step == 1 and end >= src[1]:
            node.enable_index_mapping = False
            return
        self.lock(key, f"{where}: x[:, {start}:{end}] slices the channels with Python ints that "
                       "would go stale; its channels are not pruned")

    def pointwise(self, key: Any, node: Any, where: str, label: str, out: tuple, ins: list,
                  in_shapes: list) -> None:
        """Element-wise: couple operands that carry the channels, decouple operands broadcast over them."""
        c = out[1]
        if len(ins) != len(node.inputs):
            if all(len(s) == len(out) and s[1] == c for s in in_shapes):
                return
            return self.lock(key, f"{where}: the operands of {label} could not be matched; its channels are "
                                  "not pruned")
        broadcast = []
        for (f, nr), s, in_node in zip(ins, in_shapes, node.inputs):
            a = 1 - (len(out) - len(s))
            ch = s[a] if 0 <= a < len(s) else 1
            if ch == c:
                continue
            if ch == 1:
                broadcast.append(in_node)
                continue
            return self.lock(key, f"{where}: {label} combines {ch} with {c} channels")
        for in_node in dict.fromkeys(broadcast):
            for dep in _deps_between(node, in_node):
                dep.index_mapping[0] = _Drop()
                dep.index_mapping[1] = _Drop()

    def along_dim(self, key: Any, fn: Any, where: str, label: str, kind: str, out: tuple, in_shapes: list) -> None:
        src = in_shapes[0]
        saved = getattr(fn, "_saved_dims", None) if kind in ("roll", "flip") else getattr(fn, "_saved_dim", None)
        dims = _dims(saved, len(src))
        if dims is not None and not set(dims) & {0, 1} and len(src) >= 2 and out[1] == src[1]:
            return
        over = "all dims" if dims is None else f"dim {dims[0] if len(dims) == 1 else tuple(dims)}"
        self.lock(key, f"{where}: {label} works over {over}, across the channels (e.g. a channel mean/variance "
                       "as in a hand-written LayerNorm, or a softmax over channels); removing a channel "
                       "changes every other channel")

    def view(self, key: Any, where: str, label: str, out: tuple, in_shapes: list) -> None:
        src = in_shapes[0]
        if len(src) >= 2 and tuple(src[:2]) == tuple(out[:2]):
            return

        def spread(s: Sequence[int]) -> list[int]:
            return [d for d in s if d != 1]

        if len(spread(src)) <= 1 and spread(src) == spread(out):
            return                      # only singleton dims added or removed (a parameter shaped [1, C, 1, 1])
        self.lock(key, f"{where}: {label} reshapes {list(src)} -> {list(out)}, merging or moving the channel "
                       "dim; its channels cannot be followed")


def _wall(dg: Any, key: Any) -> None:
    """DepGraph follows no channel *out of* a locked item: every group that reaches it is locked anyway,
    and its channels beyond it need not (and often cannot) be mapped."""
    node = dg.module2node.get(key)
    for dep in node.dependencies if node is not None else ():
        dep.index_mapping = [_Drop(), _Drop()]


def analyse(dg: Any, recorder: OpRecorder | None) -> None:
    """Lock what cannot be pruned channel by channel (``dg.structure_locks``) and install the channel
    index mappings of ``torch.cat`` / ``torch.split`` / broadcast operands. Runs on a freshly traced
    graph, before DepGraph derives its own mappings."""
    _Analysis(dg, recorder).run()
    for key in dg.structure_locks:
        _wall(dg, key)


def check_index_mappings(dg: Any) -> None:
    """After DepGraph derived its mappings: lock reshapes it maps by flattening channels into another dim
    (``_FlattenIndexMapping``) -- the shapes say channels are kept, so such a mapping is a guess."""
    names = {id(m) for m in dg.model.modules()}
    for key, node in dg.module2node.items():
        if node.type != ops.OPTYPE.RESHAPE or id(key) in names or key in dg.structure_locks:
            continue
        for dep in list(node.dependencies) + [d for n in node.inputs + node.outputs for d in n.dependencies
                                              if d.target is node]:
            if any(m is not None and not isinstance(m, _OWN_MAPPINGS) and "Flatten" in type(m).__name__
                   for m in dep.index_mapping):
                dg.structure_locks[key] = (f"{_op_label(node.grad_fn)}: torch-pruning maps it by flattening "
                                           "channels into another dim; its channels are not pruned")
                _wall(dg, key)
                break


# --------------------------------------------------------------------------- masking check
#: ``(root module name, root channels to remove)`` of one group in a masking check.
CheckPlan = tuple[str, list[int]]


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _zero_inputs(idxs: list[int], last_dim: bool) -> Callable[..., Any]:
    def hook(_m: nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        if last_dim:
            x[..., idxs] = 0
        else:
            x[:, idxs] = 0
        return (x, *args[1:])
    return hook


def one_line(e: BaseException) -> str:
    """``Type: message`` of an exception on one line (the message cut at 200 characters)."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:200]}" if msg else type(e).__name__


def masking_check(model: nn.Module, example: torch.Tensor, plans: Sequence[CheckPlan],
                  build: Callable[[nn.Module, torch.Tensor], Any]) -> str | None:
    """Remove the channels of every plan on a copy of ``model`` (float64 where the model runs in it) and
    compare with ``model`` whose layers read those channels as zeros. None when they agree, else why not.

    ``build(model, example)`` traces a copy (:func:`prune.graph.build_graph`)."""
    x = example.detach()
    dtype, tol = torch.float64, 1e-9
    try:
        ref = copy.deepcopy(model).eval().to(dtype)
        with torch.no_grad():
            ref(x.to(dtype))
    except Exception:  # noqa: BLE001 - e.g. float32-only code: check in the model's own precision
        ref = copy.deepcopy(model).eval()
        dtype, tol = x.dtype, (1e-4 if x.dtype == torch.float32 else 1e-2)
        with torch.no_grad():
            ref(x)
    x = x.to(dtype)
    pruned = copy.deepcopy(ref)
    try:
        dg = build(pruned, x)
        mods = dict(pruned.named_modules())
        names = {id(m): n for n, m in pruned.named_modules()}
        masks: dict[str, set[int]] = {}
        todo = []
        for root_name, idxs in plans:
            root = mods[root_name]
            fn = dg.get_pruner_of_module(root).prune_out_channels
            group = dg.get_pruning_group(root, fn, list(idxs))
            for item in group:
                layer, h = item.dep.target.module, item.dep.handler
                if id(layer) in names and isinstance(layer, nn.Module) and dg.is_in_channel_pruning_fn(h):
                    masks.setdefault(names[id(layer)], set()).update(int(i) for i in item.idxs)
            todo.append((root, fn, list(idxs)))
        for root, fn, idxs in todo:
            dg.get_pruning_group(root, fn, idxs).prune()
    except Exception as e:  # noqa: BLE001 - any failure of torch-pruning on these groups is the answer
        return f"torch-pruning fails to prune it ({one_line(e)})"
    try:
        with torch.no_grad():
            got = _tensors(pruned(x))
    except Exception as e:  # noqa: BLE001
        return f"the pruned network fails to run ({one_line(e)})"
    ref_mods = dict(ref.named_modules())
    handles = [ref_mods[n].register_forward_pre_hook(_zero_inputs(sorted(ix), isinstance(ref_mods[n], nn.Linear)))
               for n, ix in masks.items()]
    try:
        with torch.no_grad():
            want = _tensors(ref(x))
    finally:
        for h in handles:
            h.remove()
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return (f"pruning it changes the network's output shape ({[tuple(g.shape) for g in got]} instead of "
                f"{[tuple(w.shape) for w in want]})")
    for g, w in zip(got, want):
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        err = float((g - w).abs().max()) if w.numel() else 0.0
        if not err <= tol * scale:
            return (f"pruning it is not the same as zeroing its channels (output differs by {err:.3g}): the "
                    "network has a structure torch-pruning does not map correctly")
    return None


def failing_groups(model: nn.Module, example: torch.Tensor, plans: Sequence[CheckPlan],
                   build: Callable[[nn.Module, torch.Tensor], Any]) -> dict[str, str]:
    """``{root name: reason}`` of the plans whose pruning is not equivalent to zeroing their channels:
    all plans are checked together, and halves of a failing set again, down to single groups."""
    plans = list(plans)
    if not plans:
        return {}
    why = masking_check(model, example, plans, build)
    if why is None:
        return {}
    if len(plans) == 1:
        return {plans[0][0]: why}
    half = len(plans) // 2
    found = {**failing_groups(model, example, plans[:half], build),
             **failing_groups(model, example, plans[half:], build)}
    if not found:                       # each half alone is fine, together they are not
        return {name: f"{why} (together with other groups)" for name, _ in plans}
    return found
