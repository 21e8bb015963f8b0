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

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run_numpy(x.detach().cpu().float().numpy()))

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, scale={self.scale}, input_range={self.input_range}"
