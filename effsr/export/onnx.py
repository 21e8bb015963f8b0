"""``to_onnx``: a (fused) SR network as an ONNX graph with dynamic batch, height and width.

The exported graph takes and returns exactly the tensors the PyTorch network does: float32 NCHW RGB in
``[0, model.input_range]`` (255 for RFDN/RLFN/FMEN, 1 for IMDN). Rep blocks are fused first
(:func:`reparam.fuse_all`), so the graph holds only plain convs with the deploy key names; each conv's
weight initializer keeps its PyTorch parameter name (``B1.c1_r.weight``), which is how
:mod:`effsr.export.quantize` names layers. The network's ``arch``, ``scale`` and ``input_range`` are
stored as ONNX metadata (``effsr.arch``, ``effsr.scale``, ``effsr.input_range``).
"""
from __future__ import annotations

from distill.ranges import input_range as model_input_range

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["prepare", "to_onnx", "INPUT_NAME", "OUTPUT_NAME", "MIN_SIZE", "model_meta"]

INPUT_NAME = "lr"
OUTPUT_NAME = "sr"
#: Smallest LR height/width the exported graph accepts: ESA's stride-2 conv + 7x7 pool need 15 px; below
#: that the PyTorch code pads, a branch the exporter specialises away.
MIN_SIZE = 16
MAX_SIZE = 8192
DEFAULT_OPSET = 18


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

    Raises ``ValueError`` naming ``model`` when a rep block cannot be fused or one is left afterwards.
    """
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
    for attr in ("arch", "scale", "input_range", "config"):
        if hasattr(model, attr) and not hasattr(fused, attr):
            setattr(fused, attr, getattr(model, attr))
    return fused.eval()


def _set_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"effsr.{key}", str(value)
    onnx.save(proto, str(path))


def to_onnx(model: nn.Module, path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET,
            sample_size: tuple[int, int] = (32, 40), fuse: bool = True) -> Path:
    """Export ``model`` (fused first unless ``fuse=False``) to ``path`` with dynamic batch/height/width.

    Input ``lr`` (N x 3 x H x W, ``H, W >= 16``) and output ``sr`` (N x 3 x sH x sW), both float32 in
    ``[0, model.input_range]``. Returns ``path``. ``ValueError`` (naming ``model``) if the network cannot be
    fused or exported.
    """
    _check_model(model)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 13:
        raise ValueError(f"opset must be an int >= 13, got {opset!r}")
    h, w = sample_size
    if min(h, w) < MIN_SIZE:
        raise ValueError(f"sample_size must be at least {MIN_SIZE} x {MIN_SIZE}, got {sample_size}")
    net = prepare(model) if fuse else copy.deepcopy(model).cpu().float().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = model_input_range(model)
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * rng
    dims = {0: torch.export.Dim("batch", min=1, max=1024), 2: torch.export.Dim("height", min=MIN_SIZE, max=MAX_SIZE),
            3: torch.export.Dim("width", min=MIN_SIZE, max=MAX_SIZE)}
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(net, (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=(dims,), opset_version=opset, dynamo=True, optimize=True,
                              external_data=False)
    except Exception as err:  # noqa: BLE001 - the exporter raises many types; reported with the reason
        path.unlink(missing_ok=True)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model: cannot be exported to ONNX ({type(err).__name__}: {first})") from err
    _set_metadata(path, model_meta(model))
    return path
