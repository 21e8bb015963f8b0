"""``effsr export``: fuse, export ONNX fp32 (verified), optionally INT8, measure both, write export.json."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from effsr.cli_core import CLIError, command
from effsr.cli_model import add_model_args, open_model

__all__: list[str] = []


def _export_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, weights="required")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="export a fixed-size graph for this LR input size (for a network whose graph cannot be "
                        "dynamic in H/W, e.g. pooling sizes computed from the input); the ONNX variants are then "
                        "run window by window (default: dynamic H/W)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: <arch>.onnx, <arch>.int8.onnx, "
                                                              "export.json")
    p.add_argument("--eval-data", action="append", default=None, metavar="DIR",
                   help="evaluation set (HR/ + LR_bicubic/X4/, HR-only, or 'default'); repeat for several "
                        "(default: 'default', scikit-image's photos)")
    p.add_argument("--max-eval-images", type=int, default=None, metavar="N", help="first N images of each set")
    p.add_argument("--int8", action="store_true", help="also write an INT8 (QDQ) graph and measure it")
    p.add_argument("--calib-data", default=None, metavar="DIR",
                   help="calibration images for --int8 (LR patches are cut from them; 'default' allowed)")
    p.add_argument("--calib-count", type=int, default=32, metavar="N", help="calibration patches (default 32)")
    p.add_argument("--calib-patch", type=int, default=64, metavar="P", help="LR patch size (default 64)")
    p.add_argument("--calib-method", default="minmax", choices=("minmax", "percentile", "entropy"),
                   help="activation range calibration (default minmax)")
    p.add_argument("--percentile", type=float, default=99.999, help="for --calib-method percentile (99.999)")
    p.add_argument("--keep-fp32", default=None, metavar="auto|LAYER,...",
                   help="leave layers in float: 'auto' (the most sensitive convs on the calibration set) or "
                        "comma-separated layer names such as B1.esa.conv4")
    p.add_argument("--keep-count", type=int, default=3, metavar="K", help="layers kept fp32 by 'auto' (3)")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=True,
                   help="per-channel weight scales (default on)")
    p.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=True,
                   help="7-bit weights: no u8*s8 saturation on x86 CPUs without VNNI (default on)")
    p.add_argument("--pin-io", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the input and output image on the exact pixel grid [0, input_range] (default on)")
    p.add_argument("--weight-type", default="int8", choices=("int8", "uint8"),
                   help="int8 (default; 7-bit with --reduce-range) or uint8 weights (u8 x u8 kernels, 8 bits)")
    p.add_argument("--op-types", default=None, metavar="OP,...",
                   help="ONNX op types to quantize (default: every op onnxruntime can quantize)")
    p.add_argument("--max-drop", type=float, default=None, metavar="DB",
                   help="fail (exit 1, nothing written) when INT8 loses more PSNR-Y than this on any eval set")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="CPU threads for every variant, torch and onnxruntime alike (default 1)")
    p.add_argument("--runtime-trials", type=int, default=3, metavar="N", help="timed passes; best counts (3)")
    p.add_argument("--verify-images", type=int, default=2, metavar="N",
                   help="real LR images (from the first eval set) for the fp32 ONNX check (default 2)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--seed", type=int, default=0, help="calibration patch sampling seed")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _check_args(args: argparse.Namespace) -> None:
    from effsr.cli_core import check_output_dir

    check_output_dir(args.out, "--out")
    if args.input_size is not None and min(args.input_size) < 8:
        raise CLIError(f"--input-size: H and W must be >= 8, got {args.input_size[0]} {args.input_size[1]}")
    if not args.int8:
        for flag, value in (("--calib-data", args.calib_data), ("--max-drop", args.max_drop),
                            ("--keep-fp32", args.keep_fp32)):
            if value is not None:
                raise CLIError(f"{flag} needs --int8")
    elif args.calib_data is None:
        raise CLIError("--int8 needs calibration data: --calib-data DIR (or 'default')")
    for flag, value, low in (("--calib-count", args.calib_count, 1), ("--calib-patch", args.calib_patch, 16),
                             ("--keep-count", args.keep_count, 0), ("--threads", args.threads, 1),
                             ("--runtime-trials", args.runtime_trials, 1), ("--verify-images", args.verify_images, 1),
                             ("--opset", args.opset, 13)):
        if value < low:
            raise CLIError(f"{flag} must be >= {low}, got {value}")
    if args.max_eval_images is not None and args.max_eval_images < 1:
        raise CLIError(f"--max-eval-images must be >= 1, got {args.max_eval_images}")
    if args.max_drop is not None and not args.max_drop >= 0:
        raise CLIError(f"--max-drop must be a number of dB >= 0, got {args.max_drop}")
    if not 0 < args.percentile <= 100:
        raise CLIError(f"--percentile must be in (0, 100], got {args.percentile}")


def _set_name(spec: str, taken: dict[str, Any]) -> str:
    name = "default" if spec == "default" else (Path(spec).name or "data")
    base, k = name, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _keep_fp32(spec: str | None) -> str | list[str]:
    if spec is None or spec == "none":
        return []
    if spec == "auto":
        return "auto"
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise CLIError("--keep-fp32: expected 'auto' or comma-separated layer names")
    return names


def run_export(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """The command's work; returns (exit code, report). Files appear in ``--out`` only on success."""
    from effsr.cli_core import StagedDir, open_data, write_json_atomic

    from . import quantize as q
    from .onnx import prepare
    from .report import export_model, format_table, max_drop
    from .verify import ExportMismatchError

    _check_args(args)
    keep = _keep_fp32(args.keep_fp32) if args.int8 else []
    op_types = [s.strip() for s in args.op_types.split(",") if s.strip()] if args.op_types else None
    model = open_model(args)
    try:
        net = prepare(model)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err).splitlines()[0]) from err
    if isinstance(keep, list) and keep:
        import torch

        convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
        unknown = [k for k in keep if k not in convs]
        if unknown:
            raise CLIError(f"--keep-fp32: no conv layer named {unknown[0]!r}; layers: {', '.join(convs[:8])}, ...")
    eval_sets: dict[str, Any] = {}
    for spec in args.eval_data or ["default"]:
        pairs = open_data(spec, net.scale)
        if args.max_eval_images is not None:
            pairs = list(pairs)[: args.max_eval_images]
        eval_sets[_set_name(spec, eval_sets)] = pairs
    calib = None
    if args.int8:
        calib_pairs = open_data(args.calib_data, net.scale)
        try:
            size = max(args.input_size) if args.input_size else args.calib_patch
            calib = q.calibration_patches(list(calib_pairs), args.calib_count, size, net.input_range, args.seed)
            if args.input_size:  # a fixed-size graph is calibrated at its own input size
                h, w = args.input_size
                calib = calib[..., (size - h) // 2:(size - h) // 2 + h, (size - w) // 2:(size - w) // 2 + w]
        except ValueError as err:
            raise CLIError(f"--calib-data {args.calib_data}: {err}") from err
    first = list(next(iter(eval_sets.values())))
    runtime_images = [p.lr for p in first]
    verify_images = [p for p in first if min(p.lr.shape[:2]) >= 16][: args.verify_images]
    if not verify_images:
        raise CLIError("no eval LR image is at least 16 x 16 pixels; cannot verify the export")
    arch = str(getattr(net, "arch", args.model))
    progress = not args.no_progress
    report: dict[str, Any] = {"model": args.model, "arch": arch, "weights": str(args.weights),
                              "scale": int(net.scale), "input_range": float(net.input_range), "opset": args.opset,
                              "threads": args.threads, "runtime_trials": args.runtime_trials,
                              "eval_data": {name: spec for name, spec in zip(eval_sets, args.eval_data or ["default"])}}
    int8 = None
    if args.int8:
        int8 = {"method": args.calib_method, "keep_fp32": keep, "keep_count": args.keep_count,
                "per_channel": args.per_channel, "reduce_range": args.reduce_range, "pin_io": args.pin_io,
                "op_types": op_types, "percentile": args.percentile, "weight_type": args.weight_type}
    with StagedDir(args.out) as staged:
        assert staged.path is not None
        try:
            report.update(export_model(net, staged.path, eval_sets, runtime_images, verify_images, calib, int8,
                                       opset=args.opset, threads=args.threads, trials=args.runtime_trials,
                                       progress=progress,
                                       input_size=tuple(args.input_size) if args.input_size else None))
        except ExportMismatchError as err:
            print(f"effsr export: FAILED verification: {err}", file=sys.stderr)
            return 1, report
        except ValueError as err:
            raise CLIError(str(err).splitlines()[0].replace("input_size=(H, W)", "--input-size H W")) from err
        if "int8" in report:
            report["int8"]["calib_data"] = str(args.calib_data)
        print(format_table(report["variants"]))
        if args.int8:
            drop = max_drop(report["variants"])
            report["int8_max_drop_psnr_y"] = drop
            report["max_drop"] = args.max_drop
            if args.max_drop is not None and drop > args.max_drop:
                print(f"effsr export: INT8 loses {drop:.3f} dB PSNR-Y > --max-drop {args.max_drop:g}; "
                      f"nothing written to {args.out}", file=sys.stderr)
                return 1, report
        write_json_atomic(staged.path / "export.json", json.loads(json.dumps(report, default=float)))
        staged.commit()
    print(f"\nexport folder: {args.out} ({', '.join(sorted(p.name for p in Path(args.out).iterdir()))})")
    return 0, report


@command("export", help="fuse, export to ONNX (verified vs PyTorch), optionally INT8; measure size/PSNR/speed",
         arguments=_export_args)
def _export(args: argparse.Namespace) -> int:
    code, _ = run_export(args)
    sys.stdout.flush()
    return code
