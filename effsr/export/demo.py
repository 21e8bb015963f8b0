"""The last step of ``effsr demo``: the student leaves as ONNX fp32 + INT8, and the INT8 cost is shown."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["export_student", "available"]


def available() -> bool:
    """Whether the ``export`` extra (onnx, onnxscript, onnxruntime) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


def export_student(weights: str | os.PathLike[str], out_dir: str | os.PathLike[str], calib_pairs: Sequence[Any],
                   eval_sets: Mapping[str, Sequence[Any]], log: Callable[[str], None] = print, *,
                   method: str = "minmax", calib_count: int = 16, calib_patch: int = 48, threads: int = 1,
                   trials: int = 3) -> dict[str, Any]:
    """Export the student at ``weights`` (reloaded from its recipe) into ``out_dir`` with an INT8 copy.

    Writes ``<arch>.onnx``, ``<arch>.int8.onnx`` and ``export.json`` (all or nothing) and returns the report.
    """
    from effsr.cli_core import StagedDir, write_json_atomic
    from effsr.shrink.recipe import load_student

    from .onnx import prepare
    from .quantize import calibration_patches
    from .report import export_model, format_table, max_drop

    net = prepare(load_student(weights))
    calib = calibration_patches(list(calib_pairs), calib_count, calib_patch, net.input_range)
    first = list(next(iter(eval_sets.values())))
    with StagedDir(str(out_dir)) as staged:
        assert staged.path is not None
        report = {"weights": str(weights), "arch": str(getattr(net, "arch", "model")),
                  **export_model(net, staged.path, eval_sets, [p.lr for p in first], first[:2], calib,
                                 {"method": method}, threads=threads, trials=trials)}
        report["int8_max_drop_psnr_y"] = max_drop(report["variants"])
        write_json_atomic(staged.path / "export.json", report)
        staged.commit()
    i8 = report["variants"]["onnx_int8"]
    log("export: student as ONNX fp32 (verified, max relative error "
        f"{report['verify']['max_rel_error']:.2g}) and INT8 ({method}, per-channel QDQ) in {Path(out_dir)}\n"
        + format_table(report["variants"])
        + f"\nexport: INT8 costs {report['int8_max_drop_psnr_y']:.3f} dB PSNR-Y, onnxruntime speed-up "
          f"{i8['speedup']:.2f}x over fp32 ONNX")
    return report
