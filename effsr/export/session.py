"""onnxruntime CPU sessions, and :class:`OnnxSR`: an ONNX graph wearing an SR network's interface.

:class:`OnnxSR` is an ``nn.Module`` with ``scale`` and ``input_range`` whose ``forward`` runs the graph in
onnxruntime, so :func:`effsr.inference.evaluate` and :func:`effsr.metrics.runtime` measure an exported
graph exactly as they measure the PyTorch network (same images, same uint8 conversion, same timing loop).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["session", "OnnxSR", "read_meta"]


def _check_threads(threads: Any) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    return threads


def session(path: str | os.PathLike[str], threads: int = 1) -> Any:
    """An onnxruntime ``InferenceSession`` on the CPU with ``threads`` intra-op threads (1 inter-op)."""
    import onnxruntime as ort

    _check_threads(threads)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path: no ONNX file at {p}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ValueError(f"path: onnxruntime cannot load {p}: {str(err).splitlines()[0]}") from err


def read_meta(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``effsr.*`` metadata :func:`effsr.export.to_onnx` stored (keys without the prefix)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key[len("effsr."):]: p.value for p in proto.metadata_props if p.key.startswith("effsr.")}


def _starts(n: int, size: int, margin: int) -> list[int]:
    """Window starts covering ``[0, n)`` with windows of ``size`` that overlap by ``2 * margin``; the last
    window ends at ``n``."""
    if n <= size:
        return [0]
    step = max(size - 2 * margin, 1)
    starts = list(range(0, n - size, step))
    return starts + [n - size]


def windowed(run: Any, x: torch.Tensor, size: tuple[int, int], scale: int, margin: int = 8) -> torch.Tensor:
    """``run`` (a fixed-size SR graph) on an ``N x C x H x W`` input of any size: windows of exactly ``size``
    (an input smaller than that is padded by replication first), overlapping by ``2 * margin`` LR pixels; each
    output pixel is taken from the window where it lies farthest from a window edge (the centre part)."""
    import torch.nn.functional as F

    (h, w), (wh, ww) = x.shape[-2:], size
    ph, pw = max(wh - h, 0), max(ww - w, 0)
    xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
    H, W = xp.shape[-2:]
    out = None
    tops, lefts = _starts(H, wh, margin), _starts(W, ww, margin)
    for i, top in enumerate(tops):
        # rows this window owns: from the middle of its overlap with the previous one to that with the next
        r0 = 0 if i == 0 else (top + tops[i - 1] + wh) // 2
        r1 = H if i == len(tops) - 1 else (tops[i + 1] + top + wh) // 2
        for j, left in enumerate(lefts):
            c0 = 0 if j == 0 else (left + lefts[j - 1] + ww) // 2
            c1 = W if j == len(lefts) - 1 else (lefts[j + 1] + left + ww) // 2
            y = run(xp[..., top:top + wh, left:left + ww].contiguous())
            if out is None:
                out = y.new_zeros(*y.shape[:2], H * scale, W * scale)
            out[..., r0 * scale:r1 * scale, c0 * scale:c1 * scale] = \
                y[..., (r0 - top) * scale:(r1 - top) * scale, (c0 - left) * scale:(c1 - left) * scale]
    assert out is not None
    return out[..., : h * scale, : w * scale]


class OnnxSR(nn.Module):
    """Run an exported SR graph like the network: ``OnnxSR(path)(x)`` with ``x`` N x 3 x H x W float.

    ``scale``/``input_range`` come from the graph's metadata unless given.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int = 1, scale: int | None = None,
                 input_range: float | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = session(self.path, threads)
        meta = read_meta(self.path) if scale is None or input_range is None else {}
        self.scale = int(scale if scale is not None else meta.get("scale", 4))
        self.input_range = float(input_range if input_range is not None else meta.get("input_range", 255.0))
        self.arch = meta.get("arch", "onnx")
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads
        static = (meta or read_meta(self.path)).get("static_input")
        #: ``(H, W)`` of a graph exported at a fixed size (``effsr export --input-size``), else None
        self.static_input = tuple(int(v) for v in static.split("x")) if static else None

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float()
        if self.static_input is not None and tuple(x.shape[-2:]) != self.static_input:
            return windowed(lambda t: torch.from_numpy(self.run_numpy(t.numpy())), x, self.static_input, self.scale)
        return torch.from_numpy(self.run_numpy(x.numpy()))

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, scale={self.scale}, input_range={self.input_range}"
