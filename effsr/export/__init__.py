"""effsr.export: the verified network leaves the lab -- ONNX fp32 and INT8, with the PSNR cost measured.

>>> from effsr import export, models                                   # doctest: +SKIP
>>> net = models.load("rfdn", "rfdn_aim2020.pth")
>>> export.to_onnx(net, "rfdn.onnx")                                  # fused, dynamic N/H/W
>>> export.verify(net, "rfdn.onnx", lr_images)                        # max relative error <= 1e-5
>>> calib = export.calibration_patches(train_pairs, count=32, size=64, input_range=net.input_range)
>>> export.quantize_int8("rfdn.onnx", calib, "rfdn.int8.onnx", method="minmax", keep_fp32="auto")

``effsr export`` (:mod:`effsr.export.cli`) does all of it and writes ``export.json``; see ``docs/export.md``.
Needs the ``export`` extra: ``pip install effsr[export]`` (onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from effsr.lazy import lazy_exports

#: public name -> the submodule that defines it (imported on first use: ``effsr export --help`` loads none).
_EXPORTS = {
    **dict.fromkeys(("INPUT_NAME", "MIN_SIZE", "OUTPUT_NAME", "prepare", "to_onnx"), "onnx"),
    **dict.fromkeys(("METHODS", "Int8Quantizer", "calibration_patches", "conv_layers", "pick_keep_fp32",
                     "qdq_summary", "quantize_int8"), "quantize"),
    **dict.fromkeys(("OnnxSR", "read_meta", "session"), "session"),
    **dict.fromkeys(("FP32_TOLERANCE", "ExportMismatchError", "verify"), "verify"),
}

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on demand
    from .onnx import INPUT_NAME, MIN_SIZE, OUTPUT_NAME, prepare, to_onnx
    from .quantize import (METHODS, Int8Quantizer, calibration_patches, conv_layers, pick_keep_fp32,
                           qdq_summary, quantize_int8)
    from .session import OnnxSR, read_meta, session
    from .verify import FP32_TOLERANCE, ExportMismatchError, verify

__all__ = [
    "to_onnx", "prepare", "verify", "quantize_int8", "calibration_patches", "Int8Quantizer", "pick_keep_fp32",
    "conv_layers", "qdq_summary", "OnnxSR", "session", "read_meta", "ExportMismatchError", "FP32_TOLERANCE",
    "METHODS", "INPUT_NAME", "OUTPUT_NAME", "MIN_SIZE",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)


class _Package(types.ModuleType):
    """``export.verify`` and ``export.session`` stay the functions when their submodules are imported (the
    import system sets a package attribute named after each submodule it loads)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
