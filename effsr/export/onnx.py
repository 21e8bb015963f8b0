"""``to_onnx``: a (fused) SR network as an ONNX graph with dynamic batch, height and width.

The exported graph takes and returns exactly the tensors the PyTorch network does: float32 NCHW RGB in
``[0, model.input_range]`` (255 for RFDN/RLFN/FMEN, 1 for IMDN). Rep blocks are fused first
(:func:`reparam.fuse_all`, then :func:`reparam.fuse_foreign` for blocks with their own deploy switch), so
the graph holds only plain convs with the deploy key names; each conv's weight initializer keeps its PyTorch
parameter name (``B1.c1_r.weight``), which is how :mod:`effsr.export.quantize` names layers. The network's
``arch``, ``scale`` and ``input_range`` are stored as ONNX metadata (``effsr.arch``, ``effsr.scale``,
``effsr.input_range``).

A dynamic graph is checked to be dynamic: onnxruntime runs it on sizes other than the trace size. A network
whose graph depends on the input size (e.g. ``F.adaptive_max_pool2d(x, (h // 8, w // 8))``) is refused with
a ``ValueError`` naming the module, or exported for one fixed LR size with ``input_size=(H, W)`` (metadata
``effsr.static_input = "HxW"``).
"""
from __future__ import annotations

from distill.ranges import input_range as model_input_range

import contextlib
import copy
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from reparam.foreign import ForeignReport

__all__ = ["prepare", "prepare_with_report", "to_onnx", "OnnxFile", "INPUT_NAME", "OUTPUT_NAME", "MIN_SIZE",
           "model_meta", "CHECK_SIZES", "CHECK_TOLERANCE"]

log = logging.getLogger(__name__)

INPUT_NAME = "lr"
OUTPUT_NAME = "sr"
#: Smallest LR height/width the exported graph accepts: ESA's stride-2 conv + 7x7 pool need 15 px; below
#: that the PyTorch code pads, a branch the exporter specialises away.
MIN_SIZE = 16
MAX_SIZE = 8192
DEFAULT_OPSET = 18
#: LR sizes (H, W) a dynamic graph is run at after export (the first two that differ from the trace size).
CHECK_SIZES = ((17, 23), (45, 29), (29, 45))
#: Largest relative difference onnxruntime vs PyTorch accepted by that run (random inputs; ``verify`` checks
#: real images at 1e-5).
CHECK_TOLERANCE = 1e-4


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' and quantizers' chatter (warnings, logging, stdout) for the block."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _check_model(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    scale = getattr(model, "scale", None)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"model: an SR network needs an int attribute scale >= 1, got {scale!r}")
    rng = model_input_range(model)
    if isinstance(rng, bool) or not isinstance(rng, (int, float)) or rng <= 0:
        raise ValueError(f"model: input_range must be a positive number, got {rng!r}")
    return model


def model_meta(model: nn.Module) -> dict[str, Any]:
    """``arch``, ``scale`` and ``input_range`` of an SR network (what the exported graph records)."""
    return {"arch": str(getattr(model, "arch", type(model).__name__)), "scale": int(model.scale),
            "input_range": model_input_range(model)}


def prepare(model: nn.Module) -> nn.Module:
    """A fused eval-mode float32 CPU copy of ``model`` (``model`` itself is not changed).

    Rep blocks are fused with :func:`reparam.fuse_all`, then blocks with their own deploy switch
    (``switch_to_deploy()``, ``reparameterize()``, ``fuse()``, ...) with :func:`reparam.fuse_foreign`, which
    keeps a call only when the network's output stays the same; what it fused and left unfused is logged (and
    returned by :func:`to_onnx` in ``info["foreign"]``). Raises ``ValueError`` naming ``model`` when a rep
    block cannot be fused or one is left afterwards.
    """
    return prepare_with_report(model)[0]


def prepare_with_report(model: nn.Module, probe_size: tuple[int, int] = (32, 40)
                        ) -> tuple[nn.Module, ForeignReport]:
    """:func:`prepare` and the :class:`reparam.ForeignReport` of its foreign-block pass (outputs compared on
    a ``1 x 3 x probe_size`` input in ``[0, input_range]``)."""
    import reparam
    from reparam.base import RepBlock

    _check_model(model)
    net = copy.deepcopy(model).cpu().float().eval()
    try:
        fused = reparam.fuse_all(net, inplace=True)
    except (NotImplementedError, ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"model: cannot be fused into plain convs ({type(err).__name__}: {err})") from err
    left = [n for n, m in fused.named_modules() if isinstance(m, RepBlock)]
    if left:
        raise ValueError(f"model: rep blocks left after fusing: {left[:5]}")
    g = torch.Generator().manual_seed(0)
    probe = torch.rand(1, 3, *probe_size, generator=g) * model_input_range(model)
    try:
        fused, report = reparam.fuse_foreign(fused, inplace=True, example=probe)
    except ValueError as err:
        raise ValueError(f"model: {err}") from err
    if report.fused or report.unfused:
        log.log(logging.WARNING if report.unfused else logging.INFO, "%s: %s",
                getattr(model, "arch", type(model).__name__), report.summary())
    for attr in ("arch", "scale", "input_range", "config"):
        if hasattr(model, attr) and not hasattr(fused, attr):
            setattr(fused, attr, getattr(model, attr))
    return fused.eval(), report


def _check_size(size: Any, arg: str, smallest: int) -> tuple[int, int]:
    if not isinstance(size, (tuple, list)) or len(size) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) for v in size):
        raise TypeError(f"{arg} must be a pair of ints (H, W), got {size!r}")
    h, w = int(size[0]), int(size[1])
    if min(h, w) < smallest or max(h, w) > MAX_SIZE:
        raise ValueError(f"{arg} must be between {smallest} and {MAX_SIZE} px per side, got {tuple(size)}")
    return h, w


if TYPE_CHECKING:
    _PathBase = Path
else:
    _PathBase = type(Path())  # PosixPath or WindowsPath: pathlib's concrete class for this system


class OnnxFile(_PathBase):
    """The path of an exported graph (a :class:`pathlib.Path`) with ``info``: what the export found.

    ``info``: ``{"dynamic"`` (height/width dynamic), ``"static_input"`` (``[H, W]`` of a fixed-size graph,
    else ``None``), ``"batch"`` (``"dynamic"`` or the fixed batch size), ``"check"`` (``{"sizes",
    "max_rel_error"}``: onnxruntime against PyTorch on random inputs of those sizes), ``"foreign"`` (the
    :meth:`reparam.ForeignReport.as_dict` of the foreign rep blocks fused and left unfused, ``None`` with
    ``fuse=False``)``}``.
    """

    info: dict[str, Any]


def _set_metadata(proto: Any, meta: dict[str, Any]) -> None:
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"effsr.{key}", str(value)


def _input_dims(proto: Any) -> list[int | str]:
    """The graph input's dims: an int where fixed, the dim's name where dynamic."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _compare(net: nn.Module, graph_path: Path, shapes: list[tuple[int, int, int]], rng: float
             ) -> list[tuple[list[int], float, str]]:
    """``[(shape, rel_error, onnxruntime error)]``: the graph and ``net`` on random inputs of ``shapes``."""
    import numpy as np

    from .session import session

    sess = session(graph_path)
    name = sess.get_inputs()[0].name
    g = torch.Generator().manual_seed(1)
    rows = []
    for n, h, w in shapes:
        x = torch.rand(n, 3, h, w, generator=g) * rng
        with torch.no_grad():
            ref = net(x).numpy()
        try:
            out = sess.run(None, {name: x.numpy()})[0]
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            rows.append(([n, 3, h, w], float("inf"), _first_line(err)))
            continue
        if out.shape != ref.shape:
            rows.append(([n, 3, h, w], float("inf"), f"output shape {list(out.shape)} != {list(ref.shape)}"))
            continue
        peak = float(np.abs(ref).max())
        rows.append(([n, 3, h, w], float(np.abs(out.astype(np.float64) - ref).max() / (peak or 1.0)), ""))
    return rows


def _size_dependence(net: nn.Module, x: torch.Tensor, dims: dict[int, Any]) -> list[str]:
    """Where ``net``'s forward pins the input height or width: traces ``net`` with ``torch.export`` (dynamic
    ``dims``) and attributes every shape guard ``Eq(f(H, W), constant)`` to the innermost module running when
    it was recorded. ``["feats.0.conv1 (SimpleSAFM: Eq((H//8), 4) in adaptive_max_pool2d)", ...]``; empty when
    nothing is found (the tracer's internals are not a stable API: any failure gives an empty list)."""
    import sympy

    names = {id(m): n for n, m in net.named_modules()}
    stack: list[nn.Module] = []
    state: dict[str, Any] = {"env": None, "seen": 0, "symbols": {}}
    found: dict[str, list[str]] = {}

    def attribute() -> None:
        env = state["env"]
        if env is None:
            return
        new, state["seen"] = env.guards[state["seen"]:], len(env.guards)
        owner = stack[-1] if stack else net
        for guard in new:
            expr = guard.expr
            if not isinstance(expr, sympy.Eq) or not expr.free_symbols & set(state["symbols"]):
                continue
            where = str(guard.sloc).strip("() ")
            where = where.rsplit(" in ", 1)[-1] if " in " in where else where
            key = names.get(id(owner), "")
            label = f"{key or '<model>'} ({type(owner).__name__}: {expr.subs(state['symbols'])} in {where})"
            found.setdefault(key, []).append(label)

    def pre(module: nn.Module, args: Any) -> None:
        if module is net and state["env"] is None:
            arg = args[0] if args else None
            if isinstance(arg, torch.Tensor) and isinstance(arg.shape[2], torch.SymInt):
                state["env"] = arg.shape[2].node.shape_env
                state["seen"] = len(state["env"].guards)
                state["symbols"] = {arg.shape[2].node.expr: sympy.Symbol("H"),
                                    arg.shape[3].node.expr: sympy.Symbol("W")}
        attribute()
        stack.append(module)

    def post(module: nn.Module, args: Any, out: Any) -> None:
        attribute()
        if stack and stack[-1] is module:
            stack.pop()

    handles = [h for m in net.modules()
               for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        with quiet(), torch.no_grad():
            torch.export.export(net, (x,), dynamic_shapes=(dims,), strict=False)
    except Exception:  # noqa: BLE001 - the export is expected to fail; the hooks have recorded the guards
        pass
    finally:
        for h in handles:
            h.remove()
    return [labels[0] for labels in found.values()]


def _not_dynamic_error(net: nn.Module, x: torch.Tensor, dims: dict[int, Any], why: str) -> ValueError:
    culprits = []
    try:
        culprits = _size_dependence(net, x, dims)
    except Exception:  # noqa: BLE001 - diagnosis only; the error below is raised either way
        culprits = []
    where = ""
    if culprits:
        more = f" and {len(culprits) - 1} more module(s)" if len(culprits) > 1 else ""
        where = f" in {culprits[0]}{more}"
    return ValueError(
        f"model: the exported graph is not dynamic in height/width ({why}): the graph depends on the input "
        f"size H/W (data-dependent pooling/resize sizes){where}: "
        "export at a fixed size with input_size=(H, W)")


def to_onnx(model: nn.Module, path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET,
            sample_size: tuple[int, int] = (32, 40), fuse: bool = True,
            input_size: tuple[int, int] | None = None) -> OnnxFile:
    """Export ``model`` (fused first unless ``fuse=False``) to ``path`` with dynamic batch/height/width.

    Input ``lr`` (N x 3 x H x W, ``H, W >= 16``) and output ``sr`` (N x 3 x sH x sW), both float32 in
    ``[0, model.input_range]``. The graph is traced at ``sample_size`` and then run in onnxruntime on two
    other (odd) sizes against PyTorch: a network whose graph depends on the input size (pooling or resize
    sizes computed from it, which the exporter bakes in at the trace size) raises ``ValueError`` naming the
    module found responsible, and nothing is written. Such a network exports with ``input_size=(H, W)``: a
    graph for LR inputs of exactly that size (batch still dynamic where the network allows it), recorded as
    ``effsr.static_input`` (``"HxW"``) in the metadata; :func:`~effsr.export.verify` then crops or tiles its
    images to that size. One graph per size: call ``to_onnx`` once per size, with one path each.

    Returns ``path`` as an :class:`OnnxFile` (a ``Path``) whose ``info`` says whether the graph is dynamic,
    its fixed input size, the check's errors and the foreign rep blocks fused (see :func:`prepare`).
    ``ValueError`` (naming ``model``) if the network cannot be fused or exported; the file at ``path`` is
    only written (atomically) when the export succeeds.
    """
    import onnx

    from reparam.utils.io import write_bytes

    _check_model(model)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an int >= 13, got {opset!r}")
    sample = _check_size(sample_size, "sample_size", MIN_SIZE)
    static = None if input_size is None else _check_size(input_size, "input_size", 1)
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be a bool, got {type(fuse).__name__}")
    trace = static or sample
    if fuse:
        net, foreign = prepare_with_report(model, trace)
    else:
        net, foreign = copy.deepcopy(model).cpu().float().eval(), None
    path = Path(path)
    rng = model_input_range(model)
    h, w = trace
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * rng
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=1024)}
    if static is None:
        dims.update({2: torch.export.Dim("height", min=MIN_SIZE, max=MAX_SIZE),
                     3: torch.export.Dim("width", min=MIN_SIZE, max=MAX_SIZE)})
    with tempfile.TemporaryDirectory(prefix="effsr-onnx-") as tmp:
        staged = Path(tmp) / "graph.onnx"
        try:
            with quiet(), torch.no_grad():
                torch.onnx.export(net, (x,), str(staged), input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], dynamic_shapes=(dims,), opset_version=opset,
                                  dynamo=True, optimize=True, external_data=False)
        except Exception as err:  # noqa: BLE001 - the exporter raises many types; reported with the reason
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"model: cannot be exported to ONNX ({type(err).__name__}: {first})") from err
        proto = onnx.load(str(staged))
        in_dims = _input_dims(proto)
        batch: int | str = "dynamic" if isinstance(in_dims[0], str) else int(in_dims[0])
        n2 = 2 if batch == "dynamic" else int(batch)
        if static is None:
            if not (isinstance(in_dims[2], str) and isinstance(in_dims[3], str)):
                raise _not_dynamic_error(net, x, dims, f"its input is fixed at the trace size {h}x{w}")
            sizes = [s for s in CHECK_SIZES if s != (h, w)][:2]
            rows = _compare(net, staged, [(1, h, w), (n2, *sizes[0]), (1, *sizes[1])], rng)
            if rows[0][1] > CHECK_TOLERANCE:
                raise ValueError(f"model: the exported graph differs from PyTorch at the trace size {h}x{w} "
                                 f"({rows[0][2] or f'max relative error {rows[0][1]:.3g}'})")
            bad = [r for r in rows[1:] if r[1] > CHECK_TOLERANCE]
            if bad:
                shape, err_, text = bad[0]
                why = (f"at {shape[2]}x{shape[3]} onnxruntime "
                       + (f"fails: {text}" if text else f"differs from PyTorch by {err_:.3g} relative"))
                raise _not_dynamic_error(net, x, dims, why)
        else:
            if in_dims[2:] != [h, w]:
                raise ValueError(f"model: the graph exported at input_size {h}x{w} takes {in_dims[2:]}")
            rows = _compare(net, staged, [(1, h, w)] + ([(2, h, w)] if batch == "dynamic" else []), rng)
            bad = [r for r in rows if r[1] > CHECK_TOLERANCE]
            if bad:
                raise ValueError(f"model: the graph exported at input_size {h}x{w} differs from PyTorch "
                                 f"({bad[0][2] or f'max relative error {bad[0][1]:.3g}'})")
        meta = model_meta(model)
        if static is not None:
            meta["static_input"] = f"{h}x{w}"
        _set_metadata(proto, meta)
        write_bytes(path, proto.SerializeToString())
    if batch != "dynamic":
        log.warning("%s: the exported graph takes batches of exactly %s", meta["arch"], batch)
    result = OnnxFile(path)
    result.info = {"dynamic": static is None, "static_input": list(static) if static else None,
                   "batch": batch,
                   "check": {"sizes": [r[0] for r in rows], "max_rel_error": max(r[1] for r in rows)},
                   "foreign": foreign.as_dict() if foreign is not None else None}
    return result
