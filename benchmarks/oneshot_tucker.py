"""One-shot (training-free) Tucker-2 of the official RFDN to a parameter budget: plain vs data-aware.

    flock /tmp/effsr-cpu.lock python benchmarks/oneshot_tucker.py [--target-params 289888] [--calib 64]

Calibration: ``--calib`` LR patches (``--patch`` px, 0-255) cut at seeded random positions from T91's
MATLAB-bicubic x4 LR images; evaluation: Set5 (and ``--set14``) x4 Y-PSNR (``effsr.inference.evaluate``,
shave 4, unrounded). Settings compared at the same per-layer ranks (allocated by the data-aware budget run):

* ``plain``: ``decompose.tucker_model`` (HOOI on the weights alone) with those ranks;
* ``data-aware``: ``decompose.data_aware_tucker_model(target_params=...)`` (fit to the teacher's features,
  undecomposed convs refit), with the ``--schedule`` given.

Prints a table and writes ``bench_results/oneshot_tucker.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decompose import data_aware_tucker_model, tucker_model  # noqa: E402
from effsr import models  # noqa: E402
from effsr.data import SRFolder  # noqa: E402
from effsr.inference import evaluate  # noqa: E402
from effsr.metrics import profile  # noqa: E402
from prune.calibration import Calibration  # noqa: E402


def calibration_patches(t91: Path, n: int, patch: int, seed: int) -> torch.Tensor:
    """``n`` LR crops (``1 x 3 x patch x patch``, 0-255 float) from T91, cycling over the images that fit."""
    pairs = [p for p in SRFolder(t91) if min(p.lr.shape[:2]) >= patch]
    if not pairs:
        raise SystemExit(f"no T91 image has an LR side >= {patch}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    crops = []
    for i in range(n):
        lr = pairs[order[i % len(pairs)]].lr
        y = int(rng.integers(0, lr.shape[0] - patch + 1))
        x = int(rng.integers(0, lr.shape[1] - patch + 1))
        crops.append(torch.from_numpy(np.ascontiguousarray(lr[y:y + patch, x:x + patch])).permute(2, 0, 1))
    return torch.stack(crops).float()


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--target-params", type=int, default=289_888)
    ap.add_argument("--calib", type=int, default=64, help="calibration patches")
    ap.add_argument("--patch", type=int, default=32, help="LR patch side")
    ap.add_argument("--rows", type=int, default=2048, help="rows_per_batch of the calibration (0: all)")
    ap.add_argument("--schedule", default="layer", choices=["block", "layer"])
    ap.add_argument("--include-1x1", action="store_true")
    ap.add_argument("--min-channels", type=int, default=16)
    ap.add_argument("--ridge", type=float, default=1e-4)
    ap.add_argument("--refit-ridge", type=float, default=1e-2)
    ap.add_argument("--no-refit", action="store_true")
    ap.add_argument("--set14", action="store_true")
    ap.add_argument("--refine", type=int, default=2, help="ALS rounds per decomposed conv")
    ap.add_argument("--sensitivity", default="noise", choices=["noise", "relative"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench_results" / "oneshot_tucker.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    teacher = models.load("rfdn", str(data / "checkpoints" / "rfdn_aim2020.pth")).eval()
    evals = {"set5": SRFolder(data / "set5")}
    if args.set14:
        evals["set14"] = SRFolder(data / "set14")

    def quality(m: torch.nn.Module) -> dict[str, float]:
        out = {}
        for k, v in evals.items():   # Y-PSNR on rounded (challenge convention) and on unrounded Y
            out[k] = round(float(evaluate(m, v, progress=False)["psnr_y"]), 4)
            out[k + "_float"] = round(float(evaluate(m, v, progress=False, y_round=False)["psnr_y"]), 4)
        return out

    def row(name: str, m: torch.nn.Module, seconds: float | None) -> dict:
        prof = profile(m)
        out = {"model": name, "params": params(m), "flops_g": round(prof.flops / 1e9, 3), "convs": prof.convs,
               "seconds": None if seconds is None else round(seconds, 2)}
        t = time.perf_counter()
        out.update(quality(m))
        out["eval_seconds"] = round(time.perf_counter() - t, 1)
        print(out, flush=True)
        return out

    rows = [row("teacher rfdn", teacher, None)]
    t0 = time.perf_counter()
    x = calibration_patches(data / "t91", args.calib, args.patch, args.seed)
    calib = Calibration(x, batch_size=8, input_range=255.0, rows_per_batch=args.rows or None, seed=args.seed)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    da, rep = data_aware_tucker_model(teacher, calib, target_params=args.target_params,
                                      include_1x1=args.include_1x1, min_channels=args.min_channels,
                                      refit=not args.no_refit, ridge=args.ridge, refit_ridge=args.refit_ridge,
                                      schedule=args.schedule, sensitivity=args.sensitivity, refine=args.refine,
                                      progress=False)
    t_da = time.perf_counter() - t0
    print(rep.table())
    t0 = time.perf_counter()
    plain, _ = tucker_model(teacher, rep.ranks(), include_1x1=args.include_1x1, min_channels=1, progress=False)
    t_plain = time.perf_counter() - t0
    rows.append(row("plain tucker (same ranks)", plain, t_plain))
    rows.append(row(f"data-aware tucker ({args.schedule})", da, t_da + t_data))
    print()
    cols = ["model", "params", "flops_g", "convs", *(f"{k}{s}" for k in evals for s in ("", "_float")), "seconds"]
    print("  ".join(f"{c:>28}" if c == "model" else f"{c:>10}" for c in cols))
    for r in rows:
        print("  ".join(f"{str(r[c]):>28}" if c == "model" else f"{str(r[c]):>10}" for c in cols))
    result = {"args": vars(args), "rows": rows, "calibration_seconds": round(t_data, 2),
              "report": rep.as_dict(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.machine(), "cpus": os.cpu_count()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
