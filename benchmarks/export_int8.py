"""INT8 export of the official checkpoints (and optionally an `effsr shrink` student), side by side.

For each network: PyTorch fp32 vs onnxruntime fp32 vs onnxruntime INT8 (QDQ) variants, on Set5 and
Set14 (``../shared/data``), calibrated on LR patches of T91 (HR-only: LR made with MATLAB bicubic).
Variants say what each option buys:

* ``per_tensor``      MinMax, per-tensor weights (plain PTQ), 7-bit weights
* ``minmax_s8``       MinMax, per-channel, full 8-bit signed weights (saturates u8 x s8 on CPUs without VNNI)
* ``minmax``          MinMax, per-channel, 7-bit weights (the `effsr export` default)
* ``minmax_u8w``      MinMax, per-channel, 8-bit *unsigned* weights (u8 x u8 kernels: no saturation)
* ``percentile``      Percentile (99.999) calibration, per-channel, 7-bit
* ``entropy``         Entropy calibration, per-channel, 7-bit
* ``minmax_nopin``    as ``minmax`` without pinning the input/output image range
* ``<best>_auto``     the best of the above calibration methods with ``keep_fp32="auto"`` (3 convs)

Runtime: onnxruntime CPU, ``--threads`` intra-op threads for every variant (PyTorch too), best of
``--trials`` passes over the Set5 LR images. Prints a table, writes ``bench_results/export_int8.json``
after every network (partial results survive an interruption).

    flock /tmp/effsr-cpu.lock python benchmarks/export_int8.py               # all five, Set5 + Set14
    python benchmarks/export_int8.py --models rfdn --sets set5 --variants minmax percentile
    python benchmarks/export_int8.py --student runs/demo/student.safetensors --student-model rfdn
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHECKPOINTS = {"rfdn": "rfdn_aim2020.pth", "rlfn": "rlfn_ntire2022.pth", "fmen": "fmen_ntire2022.pth",
               "imdn": "imdn_aim2019.pth", "rfdn_pruned": "rfdn_pruned_ntire2022.pth"}
VARIANTS: dict[str, dict[str, Any]] = {
    "per_tensor": {"method": "minmax", "per_channel": False},
    "minmax_s8": {"method": "minmax", "reduce_range": False},
    "minmax": {"method": "minmax"},
    "minmax_u8w": {"method": "minmax", "reduce_range": False, "weight_type": "uint8"},
    "percentile": {"method": "percentile"},
    "entropy": {"method": "entropy"},
    "minmax_nopin": {"method": "minmax", "pin_io": False},
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = Path(__file__).resolve().parents[1]
    p.add_argument("--data", default=str(root.parent / "shared" / "data"))
    p.add_argument("--models", nargs="*", default=list(CHECKPOINTS), help="official networks (none: --student only)")
    p.add_argument("--student", default=None, help="an `effsr shrink` student (.safetensors with recipe)")
    p.add_argument("--student-model", default="rfdn")
    p.add_argument("--sets", nargs="+", default=["set5", "set14"])
    p.add_argument("--set14-models", nargs="+", default=None,
                   help="networks also measured on Set14 (default: all); others Set5 only")
    p.add_argument("--calib", default="t91", help="calibration folder under --data (default t91)")
    p.add_argument("--calib-count", type=int, default=32)
    p.add_argument("--calib-patch", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--auto", action=argparse.BooleanOptionalAction, default=True,
                   help="also the best method with keep_fp32='auto'")
    p.add_argument("--keep-count", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--out", default=str(root / "bench_results" / "export_int8.json"))
    return p.parse_args()


def main() -> int:
    args = parse()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from effsr import data, export, models
    from effsr.export.quantize import Int8Quantizer, pick_keep_fp32, qdq_summary
    from effsr.export.report import add_comparisons, measure, torch_size_bytes

    root = Path(args.data)
    sets = {s: list(data.open_dataset(root / s)) for s in args.sets}
    calib_pairs = list(data.open_dataset(root / args.calib))
    jobs = [(name, root / "checkpoints" / CHECKPOINTS[name], name) for name in args.models]
    if args.student:
        jobs.append((f"student:{Path(args.student).stem}", Path(args.student), args.student_model))
    results: dict[str, Any] = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                                           "processor": platform.processor(), "cpu_count": os.cpu_count()},
                               "settings": {k: v for k, v in vars(args).items()}, "networks": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for label, weights, name in jobs:
        t0 = time.perf_counter()
        net = export.prepare(models.load(name, weights))
        use = {s: p for s, p in sets.items()
               if s != "set14" or args.set14_models is None or name in args.set14_models or label.startswith("student")}
        runtime_images = [p.lr for p in sets[args.sets[0]]]
        calib = export.calibration_patches(calib_pairs, args.calib_count, args.calib_patch, net.input_range, seed=0)
        row: dict[str, Any] = {"weights": str(weights), "params": sum(p.numel() for p in net.parameters())}
        with tempfile.TemporaryDirectory(prefix="effsr-bench-") as tmp:
            fp32 = export.to_onnx(net, Path(tmp) / "fp32.onnx", fuse=False)
            row["verify"] = export.verify(net, fp32, sets[args.sets[0]][:2])["max_rel_error"]
            variants = {"torch_fp32": measure(net, use, runtime_images, threads=args.threads, trials=args.trials,
                                              size_bytes=torch_size_bytes(net)),
                        "onnx_fp32": measure(export.OnnxSR(fp32, threads=args.threads), use, runtime_images,
                                             threads=args.threads, trials=args.trials, path=fp32)}
            info: dict[str, Any] = {}
            defaults = {"per_channel": True, "reduce_range": True, "weight_type": "int8", "pin_io": True}
            with Int8Quantizer(fp32, calib, threads=args.threads) as q:  # one calibration per method, cached
                def run(vname: str, opts: dict[str, Any], keep: list[str] | None = None) -> None:
                    opts = dict(opts)
                    method = opts.pop("method")
                    for key, default in defaults.items():
                        setattr(q, key, opts.get(key, default))
                    qpath = Path(tmp) / f"{vname}.onnx"
                    tq = time.perf_counter()
                    q.quantize(qpath, method, keep or [])
                    info[vname] = {"method": method, **opts, "keep_fp32": keep or [],
                                   "quantize_s": time.perf_counter() - tq,
                                   "qdq": {k: v for k, v in qdq_summary(qpath).items() if k != "fp32_conv_nodes"}}
                    variants[f"onnx_int8:{vname}"] = measure(export.OnnxSR(qpath, threads=args.threads), use,
                                                             runtime_images, threads=args.threads,
                                                             trials=args.trials, path=qpath)
                    print(f"  {label} {vname}: " + ", ".join(
                        f"{s} {v['psnr_y']:.3f}" for s, v in variants[f"onnx_int8:{vname}"]["eval"].items()),
                        f"{variants[f'onnx_int8:{vname}']['runtime_ms']:.1f} ms", flush=True)

                for vname in args.variants:
                    run(vname, VARIANTS[vname])
                methods = [v for v in ("minmax", "percentile", "entropy") if v in args.variants]
                if args.auto and methods:
                    first = args.sets[0]
                    best = max(methods, key=lambda v: variants[f"onnx_int8:{v}"]["eval"][first]["psnr_y"])
                    for key, default in defaults.items():
                        setattr(q, key, VARIANTS[best].get(key, default))
                    ts = time.perf_counter()
                    sens = q.sensitivity(VARIANTS[best]["method"])
                    keep = pick_keep_fp32(sens, args.keep_count)
                    run(f"{best}_auto", VARIANTS[best], keep)
                    info[f"{best}_auto"].update(sensitivity_s=time.perf_counter() - ts,
                                                sensitivity_top=sens["layers"][:8], psnr_all_calib=sens["psnr_all"])
        add_comparisons(variants)
        row["variants"], row["int8"], row["seconds"] = variants, info, time.perf_counter() - t0
        results["networks"][label] = row
        tmp_out = out.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(results, indent=2, default=float) + "\n")
        os.replace(tmp_out, out)
        print(table(label, row), flush=True)
    print(f"\nwrote {out}")
    return 0


def table(label: str, row: dict[str, Any]) -> str:
    v = row["variants"]
    sets = list(v["torch_fp32"]["eval"])
    head = f"{label:<28} {'KB':>6} {'ms':>7} {'x':>5}" + "".join(f" {s + ' Y':>9} {'drop':>7}" for s in sets)
    lines = [head]
    for key, val in v.items():
        line = f"  {key:<26} {val['size_bytes'] / 1024:>6.0f} {val['runtime_ms']:>7.1f} {val.get('speedup', 0):>5.2f}"
        for s in sets:
            d = val.get("drop", {}).get(s, {}).get("psnr_y", 0.0)
            line += f" {val['eval'][s]['psnr_y']:>9.3f} {d:>7.3f}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
