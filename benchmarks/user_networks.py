"""Users' networks shrunk as a user would: the published NTIRE networks of ``../shared/data/ntire2024``.

    flock /tmp/effsr-cpu.lock python benchmarks/user_networks.py --threads 2 [--networks dipnet,span] \
        [--configs prune0,tucker0,distill10]

Each network is named exactly as on the command line (``file.py:Class``, its kwargs, checkpoint, wrapper key and
input range from ``networks.json``) and shrunk with :func:`effsr.shrink.run_shrink` (the code behind
``effsr shrink``) to 67 % of its parameters: calibration and distillation on T91, evaluation on Set5 x4 (PSNR-Y on
integer Y). Configurations:

* ``prune0`` / ``tucker0``: training-free (``--steps 0``), pruning + least-squares reconstruction and data-aware
  Tucker-2, then the default block refinement; ``*_norefine``: the same without block refinement;
* ``distill10``: ``--method auto`` then a fixed number of distillation steps (``--steps``; 300 take 3-5 minutes
  on 2 cores);
* ``minutes10``: ``--method auto`` then ``--train-minutes 10``: distillation ends after 10 minutes of training
  (``minutes10_norefine``: without block refinement; ``distill10`` is without it too);
* ``export``: ``effsr export --int8`` of the teacher (percentile calibration on 32 T91 patches): the fp32 graph's
  verification error, whether it is dynamic in H/W (a refused network is exported again with ``--input-size 64
  64``, as the refusal says), and the INT8 drop and speed-up over fp32 ONNX.

Recorded per network and configuration: the teacher's and the student's Set5 PSNR-Y and their drop, params,
FLOPs, activations, convs, the CPU runtime of teacher and student measured in the same run, wall time per stage,
what pruning locked, the feature layers distillation used, and a reload check (the student file opened with no
``--model`` gives the same PSNR). A network that fails is recorded with its one-line error. Results merge into
``benchmarks/results/user_networks.json`` (a configuration already there is skipped unless ``--force``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effsr import inference, models  # noqa: E402
from effsr.cli_core import error_line  # noqa: E402
from effsr.shrink import ShrinkConfig  # noqa: E402
from effsr.shrink.runner import run_shrink  # noqa: E402

FRACTION = 0.67
CONFIGS: dict[str, dict] = {
    "prune0": {"method": "prune", "steps": 0},
    "tucker0": {"method": "tucker", "steps": 0},
    "prune0_norefine": {"method": "prune", "steps": 0, "refine_steps": 0},
    "tucker0_norefine": {"method": "tucker", "steps": 0, "refine_steps": 0},
    "distill10": {"method": "auto", "steps": 400, "refine_steps": 0},
    "minutes10": {"method": "auto", "train_minutes": 10.0},
    "minutes10_norefine": {"method": "auto", "train_minutes": 10.0, "refine_steps": 0},
    "export": {},
}
#: LR size of a fixed-size graph, for a network whose graph cannot be dynamic in H/W
FIXED_SIZE = (64, 64)


def network_config(root: Path, e: dict) -> dict:
    """The ShrinkConfig fields naming network ``e`` of networks.json."""
    return {"model": f"{root / e['file']}:{e['cls']}", "weights": str(root / e["checkpoint"]),
            "model_config": dict(e["kwargs"]), "input_range": float(e["input_range"]),
            "weights_key": e["state_dict_key"]}


def run_export(e: dict, data: Path, out_root: Path, threads: int) -> dict:
    """``effsr export --int8`` of network ``e``, as on the command line; retried at a fixed size when refused."""
    import contextlib

    from effsr import cli

    root = data / "ntire2024"
    args = ["export", "--model", f"{root / e['file']}:{e['cls']}", "--weights", str(root / e["checkpoint"]),
            "--input-range", str(e["input_range"]), "--int8", "--calib-data", str(data / "t91"),
            "--calib-method", "percentile", "--eval-data", str(data / "set5"), "--threads", str(threads),
            "--no-progress"]
    if e["kwargs"]:
        args += ["--model-config", json.dumps(e["kwargs"])]
    if e["state_dict_key"]:
        args += ["--weights-key", e["state_dict_key"]]
    rec: dict = {"network": e["name"], "config": "export", "threads": threads}
    t0 = time.perf_counter()
    for extra in ([], ["--input-size", *map(str, FIXED_SIZE)]):
        out = out_root / f"{e['name']}_export"
        if out.exists():
            shutil.rmtree(out)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main([*args, *extra, "--out", str(out)])
        if code == 0:
            break
        rec.setdefault("refused", []).append(err.getvalue().strip().splitlines()[-1])
    rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if code != 0:
        rec["error"] = rec["refused"][-1]
        return rec
    rep = json.loads((out / "export.json").read_text())
    v = rep["variants"]
    rec.update({"onnx": rep["onnx"], "verify_max_rel_error": rep["verify"]["max_rel_error"],
                "verify_passed": rep["verify"]["passed"],
                "torch_set5": round(v["torch_fp32"]["eval"]["set5"]["psnr_y"], 4),
                "onnx_fp32_set5": round(v["onnx_fp32"]["eval"]["set5"]["psnr_y"], 4),
                "int8_set5": round(v["onnx_int8"]["eval"]["set5"]["psnr_y"], 4),
                "int8_drop_db": round(v["onnx_int8"]["eval"]["set5"]["psnr_y"] - v["onnx_fp32"]["eval"]["set5"]["psnr_y"], 4),
                "int8_speedup": v["onnx_int8"].get("speedup"),
                "runtime_ms": {k: v[k]["runtime_ms"] for k in v}})
    return rec


def run_one(e: dict, config: str, data: Path, out_root: Path, threads: int, steps: int | None) -> dict:
    if config == "export":
        return run_export(e, data, out_root, threads)
    root = data / "ntire2024"
    named = network_config(root, e)
    teacher = models.open_model(named["model"], named["weights"], config=named["model_config"],
                                input_range=named["input_range"], weights_key=named["weights_key"])
    n_teacher = sum(p.numel() for p in teacher.parameters())
    settings = dict(CONFIGS[config])
    if steps is not None and settings.get("steps"):
        settings["steps"] = steps
    target = int(FRACTION * n_teacher)
    out = out_root / f"{e['name']}_{config}"
    if out.exists():
        shutil.rmtree(out)
    rec: dict = {"network": e["name"], "config": config, "settings": settings, "teacher_params": n_teacher,
                 "target_params": target, "threads": threads}
    cfg = ShrinkConfig(train_data=str(data / "t91"), eval_data=[str(data / "set5")], out=str(out),
                       target_params=target, peers=False, runtime_trials=3, progress=False, device="cpu",
                       **named, **settings)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    try:
        res = run_shrink(cfg)
    except (ValueError, TypeError, RuntimeError) as err:
        rec.update(error=error_line(err), wall_seconds=round(time.perf_counter() - t0, 1))
        return rec
    rec["wall_seconds"] = round(time.perf_counter() - t0, 1)
    report = json.loads((out / "report.json").read_text())
    rows = {m["kind"]: m for m in report["models"]}
    teacher_row, student = rows["teacher"], rows["student"]
    comp = res["compress"]
    dist = res.get("distill") or {}
    t5 = teacher_row["eval"]["set5"]["psnr_y"]
    s5 = student["eval"]["set5"]["psnr_y"]
    reloaded = models.open_model(None, out / "student.safetensors")
    re5 = inference.evaluate(reloaded, _pairs(data / "set5"), progress=False)["psnr_y"]
    rec.update({
        "stage_seconds": {k: v.get("seconds") for k, v in res.items() if isinstance(v, dict) and "seconds" in v},
        "compress_seconds": comp.get("seconds"), "chosen": comp.get("chosen"),
        "candidates": {m: {"held_out_psnr_y": c.get("held_out_psnr_y"), "params": c.get("params")}
                       for m, c in comp.get("candidates", {}).items()},
        "oneshot_set5": round(comp["eval"]["set5"]["psnr_y"], 4),
        "teacher_set5": round(t5, 4), "student_set5": round(s5, 4), "drop_db": round(s5 - t5, 4),
        "params": student["params"], "flops_g": round(student["flops"] / 1e9, 3),
        "activations_m": round(student["activations"] / 1e6, 2), "convs": student["convs"],
        "teacher_convs": teacher_row["convs"], "teacher_activations_m": round(teacher_row["activations"] / 1e6, 2),
        "runtime_ms_teacher": teacher_row["runtime_ms"], "runtime_ms_student": student["runtime_ms"],
        "speedup": round(teacher_row["runtime_ms"] / student["runtime_ms"], 3),
        "locked": _find(comp, "locked"),
        "refine": {m: c.get("refine") and {k: v for k, v in c["refine"].items() if k != "per_block"}
                   for m, c in comp.get("candidates", {}).items()},
        "distill_steps": (dist.get("finetune") or {}).get("steps"),
        "distill_seconds": (dist.get("finetune") or {}).get("seconds"),
        "feature_layers": {"pairs": (dist.get("finetune") or {}).get("pairs"),
                           "how": (dist.get("finetune") or {}).get("feature_layers")},
        "reload_set5": round(float(re5), 4), "reload_matches": abs(float(re5) - s5) < 1e-6,
        "loadavg_before": [round(v, 2) for v in load0], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    })
    return rec


def _find(obj: object, key: str) -> dict:
    """Every ``key`` entry (a dict) found anywhere in ``obj``, merged."""
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key and isinstance(v, dict):
                out.update(v)
            else:
                out.update(_find(v, key))
    elif isinstance(obj, list):
        for v in obj:
            out.update(_find(v, key))
    return out


def _pairs(folder: Path) -> list:
    from effsr.data import SRFolder

    return list(SRFolder(folder))


def table(results: dict) -> str:
    """The results as a markdown table: one row per network, each configuration's Set5 PSNR-Y and drop."""
    nets = list(dict.fromkeys(r["network"] for r in results.values()))
    configs = [c for c in CONFIGS if c != "export" and any(r["config"] == c for r in results.values())]
    head = ["network", "teacher params", "teacher Set5"] + [f"{c}: Set5 (drop), speed-up, wall" for c in configs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in nets:
        first = next(r for r in results.values() if r["network"] == n)
        cells = [n, f"{first['teacher_params']:,}", f"{first.get('teacher_set5', float('nan')):.3f}"]
        for c in configs:
            r = results.get(f"{n}:{c}")
            if r is None:
                cells.append("–")
            elif r.get("error"):
                cells.append(f"error: {r['error'][:60]}")
            else:
                steps = r.get("distill_steps", r["settings"].get("steps"))
                chosen = f" ({r['chosen']}, {steps} steps)" if c.startswith(("distill", "minutes")) else ""
                cells.append(f"{r['student_set5']:.3f} ({r['drop_db']:+.3f}){chosen}, {r['speedup']:.2f}x, "
                             f"{r['wall_seconds']:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    exports = [r for r in results.values() if r["config"] == "export"]
    if exports:
        lines += ["", "| network | fp32 ONNX | verify max rel. error | INT8 Set5 (drop) | INT8 speed-up |",
                  "|---|---|---|---|---|"]
        for r in exports:
            if r.get("error"):
                lines.append(f"| {r['network']} | error: {r['error'][:80]} | | | |")
                continue
            graph = "dynamic H/W" if r["onnx"]["dynamic"] else f"fixed {'x'.join(map(str, r['onnx']['static_input']))}"
            lines.append(f"| {r['network']} | {graph} | {r['verify_max_rel_error']:.1e} | {r['int8_set5']:.3f} "
                         f"({r['int8_drop_db']:+.3f}) | {r['int8_speedup']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--networks", default="all", help="comma-separated names of networks.json, or all")
    ap.add_argument("--configs", default="prune0,tucker0", help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="override the distillation steps of distill10")
    ap.add_argument("--force", action="store_true", help="rerun configurations already in the JSON")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "user_networks.json"))
    ap.add_argument("--table", action="store_true", help="print the results already in --out as a table and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())["results"]))
        return
    data = Path(args.data)
    entries = json.loads((data / "ntire2024" / "networks.json").read_text())["networks"]
    names = [e["name"] for e in entries] if args.networks == "all" else [n.strip() for n in args.networks.split(",")]
    unknown = sorted(set(names) - {e["name"] for e in entries})
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown or any(c not in CONFIGS for c in configs):
        raise SystemExit(f"--networks/--configs: unknown {unknown or configs}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    doc.setdefault("results", {})
    doc["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    for e in (e for e in entries if e["name"] in names):
        for config in configs:
            key = f"{e['name']}:{config}"
            if key in doc["results"] and not args.force:
                print(f"{key}: already in {out} (use --force)")
                continue
            print(f"== {key}", flush=True)
            rec = run_one(e, config, data, out.parent / "user_networks", args.threads, args.steps)
            doc["results"][key] = rec
            out.write_text(json.dumps(doc, indent=2) + "\n")
            print(json.dumps({k: rec.get(k) for k in ("wall_seconds", "chosen", "teacher_set5", "student_set5",
                                                      "drop_db", "params", "convs", "speedup", "int8_drop_db",
                                                      "int8_speedup", "error")}), flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
