"""Measure the export variants side by side and write/print the export report.

Variants: ``torch_fp32`` (the fused PyTorch network), ``onnx_fp32`` and ``onnx_int8`` (onnxruntime CPU).
Each gets ``size_bytes`` (fp32 tensor bytes for PyTorch, file size for ONNX), ``runtime_ms`` (per image,
best of N passes over the same LR images, the same thread count for every variant) and
``eval.<set>.{psnr_y, psnr_rgb, ssim_y}`` measured by :func:`effsr.inference.evaluate`. ONNX variants
also get ``drop.<set>`` (PyTorch fp32 minus theirs, dB / SSIM) and ``speedup`` (fp32 ONNX runtime over
theirs).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["export_model", "measure", "torch_size_bytes", "add_comparisons", "max_drop", "format_table", "VARIANTS"]

VARIANTS = ("torch_fp32", "onnx_fp32", "onnx_int8")
METRICS = ("psnr_y", "psnr_rgb", "ssim_y")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def torch_size_bytes(model: nn.Module) -> int:
    """Bytes of the network's tensors as fp32 (parameters and buffers)."""
    return int(sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point()))


def measure(model: nn.Module, eval_sets: Mapping[str, Sequence[Any]], runtime_images: Sequence[Any], *,
            threads: int = 1, trials: int = 3, progress: bool = False,
            size_bytes: int | None = None, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{"size_bytes", "runtime_ms", "runtime_trials_ms", "threads", "eval": {set: {psnr_y, psnr_rgb,
    ssim_y, images}}}`` for one variant (a PyTorch network or an :class:`~effsr.export.OnnxSR`)."""
    from effsr.inference import evaluate
    from effsr.metrics import runtime

    if size_bytes is None:
        size_bytes = Path(path).stat().st_size if path is not None else torch_size_bytes(model)
    with torch_threads(threads):
        evals = {}
        for name, pairs in eval_sets.items():
            r = evaluate(model, pairs, progress=progress, device="cpu")
            evals[name] = {k: float(r[k]) for k in METRICS} | {"images": int(r["images"])}
        t = runtime(model, list(runtime_images), device="cpu", trials=trials, warmup=1)
    out: dict[str, Any] = {"size_bytes": int(size_bytes), "runtime_ms": float(t["ms_per_image"]),
                           "runtime_trials_ms": [float(v) for v in t["trials_ms"]], "threads": threads,
                           "eval": evals}
    if path is not None:
        out["path"] = Path(path).name
    return out


def add_comparisons(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Add ``drop`` (vs ``torch_fp32``) and ``speedup`` (vs ``onnx_fp32`` runtime) to the ONNX variants."""
    ref = variants["torch_fp32"]
    base_ms = variants.get("onnx_fp32", {}).get("runtime_ms")
    for key, v in variants.items():
        if key == "torch_fp32":
            continue
        v["drop"] = {s: {m: ref["eval"][s][m] - e[m] for m in METRICS} for s, e in v["eval"].items()}
        if base_ms:
            v["speedup"] = base_ms / v["runtime_ms"]
        v["size_ratio"] = v["size_bytes"] / ref["size_bytes"]
    return variants


def max_drop(variants: Mapping[str, Mapping[str, Any]], variant: str = "onnx_int8", metric: str = "psnr_y") -> float:
    """The largest drop of ``metric`` over the eval sets for ``variant``."""
    return max(d[metric] for d in variants[variant]["drop"].values())


def format_table(variants: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain-text table: size, runtime, speed-up, and PSNR-Y / PSNR-RGB / SSIM-Y (drop) per eval set."""
    sets = list(next(iter(variants.values()))["eval"])
    head = f"{'variant':<11} {'size':>9} {'ms/img':>8} {'speedup':>7}"
    for s in sets:
        head += f"  {s + ' PSNR-Y (drop)':>22} {'PSNR-RGB':>8} {'SSIM-Y':>7}"
    lines = [head, "-" * len(head)]
    for key in VARIANTS:
        if key not in variants:
            continue
        v = variants[key]
        speed = f"{v['speedup']:.2f}x" if "speedup" in v else "-"
        row = f"{key:<11} {v['size_bytes'] / 1024:>7.0f}KB {v['runtime_ms']:>8.1f} {speed:>7}"
        for s in sets:
            e = v["eval"][s]
            drop = f"({-v['drop'][s]['psnr_y']:+.3f})" if "drop" in v else ""
            row += f"  {e['psnr_y']:>13.3f} {drop:>8} {e['psnr_rgb']:>8.3f} {e['ssim_y']:>7.4f}"
        lines.append(row)
    return "\n".join(lines)


def export_model(net: nn.Module, out_dir: str | os.PathLike[str], eval_sets: Mapping[str, Sequence[Any]],
                 runtime_images: Sequence[Any], verify_images: Sequence[Any], calib: Any = None,
                 int8: Mapping[str, Any] | None = None, *, opset: int = 18, threads: int = 1, trials: int = 3,
                 progress: bool = False, input_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Export a fused network into ``out_dir`` (``<arch>.onnx``, with ``int8``: ``<arch>.int8.onnx``), verify
    the fp32 graph on ``verify_images`` (:class:`~effsr.export.ExportMismatchError` above 1e-5), measure every
    variant and return ``{"verify", "variants", "int8"?, "seconds"}`` (nothing else is written).

    ``int8``: keyword arguments of :func:`~effsr.export.quantize_int8` (``method``, ``keep_fp32``, ...),
    calibrated on the ``calib`` patches.
    """
    import time

    from .onnx import to_onnx
    from .quantize import quantize_int8
    from .session import OnnxSR
    from .verify import verify

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    arch = str(getattr(net, "arch", "model"))
    fp32_path = to_onnx(net, out_dir / f"{arch}.onnx", opset=opset, fuse=False, input_size=input_size)
    report: dict[str, Any] = {"verify": verify(net, fp32_path, verify_images, threads=threads),
                              "onnx": {k: v for k, v in fp32_path.info.items() if k in ("dynamic", "static_input")}}
    variants = {"torch_fp32": measure(net, eval_sets, runtime_images, threads=threads, trials=trials,
                                      progress=progress, size_bytes=torch_size_bytes(net)),
                "onnx_fp32": measure(OnnxSR(fp32_path, threads=threads), eval_sets, runtime_images, threads=threads,
                                     trials=trials, progress=progress, path=fp32_path)}
    if int8 is not None:
        if calib is None:
            raise ValueError("calib: INT8 export needs calibration patches")
        info = quantize_int8(fp32_path, calib, out_dir / f"{arch}.int8.onnx", threads=threads, **int8)
        int8_path = Path(info["path"])
        info["path"] = int8_path.name
        report["int8"] = info
        variants["onnx_int8"] = measure(OnnxSR(int8_path, threads=threads), eval_sets, runtime_images,
                                        threads=threads, trials=trials, progress=progress, path=int8_path)
    report["variants"] = add_comparisons(variants)
    report["seconds"] = time.perf_counter() - t0
    return report
