"""One-shot (training-free) pruning of the official RFDN to MegSR's size, with closed-form reconstruction.

    flock /tmp/effsr-cpu.lock python benchmarks/oneshot_prune.py --data ../shared/data

For each channel criterion (L2 filter norm, activation RMS, reconstruction error) the official AIM 2020
RFDN (433,448 params) is pruned to <= --target params, either with one uniform ratio in every group
(the smallest ratio that fits, found by bisection) or with per-group ratios from
``prune.prune_to_budget`` (sensitivity allocation); then ``prune.reconstruct`` refits the student to
the teacher layer by layer on --calib T91 patches (LR made with ``effsr.imresize``). Prints a table of
Set5 Y-PSNR (shave 4, BT.601, unrounded) before/after reconstruction and the time of each stage, and
writes ``bench_results/oneshot_prune.json``. No gradient step anywhere.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import prune
from effsr import models
from effsr.data import PatchDataset, SRFolder
from effsr.inference import evaluate

MEGSR_PARAMS = 289_888


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def psnr_y(m: torch.nn.Module, pairs) -> float:
    return float(evaluate(m.eval(), pairs, progress=False)["psnr_y"])


def uniform_ratio(net: torch.nn.Module, example: torch.Tensor, target: int, iters: int = 12) -> float:
    """Smallest uniform ratio whose one-shot prune has <= target params (the count does not depend on
    the importance: every group keeps round(n0 * (1 - ratio)) channels)."""
    lo, hi = 0.0, 0.9
    for _ in range(iters):
        mid = (lo + hi) / 2
        n = n_params(prune.l2_filter_prune(net, example, mid, progress=False, flops_input_size=None))
        lo, hi = (mid, hi) if n > target else (lo, mid)
    return hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--target", type=int, default=MEGSR_PARAMS)
    ap.add_argument("--calib", type=int, default=64, help="calibration patches")
    ap.add_argument("--patch", type=int, default=32, help="LR calibration patch size")
    ap.add_argument("--rows", type=int, default=8192, help="rows per batch for the statistics")
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma list of runs to do (default all)")
    ap.add_argument("--out", default="bench_results/oneshot_prune.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    net = models.load("rfdn", str(data / "checkpoints" / "rfdn_aim2020.pth")).eval()
    set5 = list(SRFolder(data / "set5"))
    t91 = [p for p in SRFolder(data / "t91") if min(p.lr.shape[:2]) >= args.patch]
    lr = next(iter(DataLoader(PatchDataset(t91, patch_size=args.patch, length=args.calib, seed=1),
                              batch_size=args.calib)))[0] * 255.0
    calib = prune.Calibration(lr, batch_size=16, input_range=255.0, rows_per_batch=args.rows)
    example = lr[:1]
    rows: list[dict] = []
    teacher_psnr = psnr_y(net, set5)
    rows.append(dict(run="teacher", params=n_params(net), psnr_oneshot=teacher_psnr, psnr_recon=None,
                     prune_s=0.0, recon_s=0.0))
    print(f"teacher: {n_params(net):,} params, Set5 Y {teacher_psnr:.3f} dB", flush=True)
    ratio = uniform_ratio(net, example, args.target)
    print(f"uniform ratio {ratio:.4f}", flush=True)

    def importance(kind: str):
        return {"l2": None, "activation": prune.ActivationImportance(lr[:16]),
                "recon": prune.ReconstructionImportance(calib)}[kind]

    runs = [(f"uniform/{k}", k, "uniform", "pruned", False) for k in ("l2", "activation", "recon")]
    runs += [(f"budget/{k}", k, "budget", "pruned", False) for k in ("activation", "recon")]
    runs += [("uniform/activation/all-layers", "activation", "uniform", "all", False)]
    runs += [(f"uniform/{k}/residual", k, "uniform", "pruned", True) for k in ("activation", "recon")]
    runs += [(f"budget/{k}/residual", k, "budget", "pruned", True) for k in ("recon",)]
    only = {s for s in args.only.split(",") if s}
    for name, kind, how, layers, residual in runs:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        if how == "uniform":
            small = prune.l2_filter_prune(net, example, ratio, importance=importance(kind), progress=False,
                                          flops_input_size=None)
        else:
            small = prune.prune_to_budget(net, example, calib, target_params=args.target, importance=importance(kind))
        t_prune = time.perf_counter() - t0
        before = psnr_y(small, set5)
        t0 = time.perf_counter()
        rep = prune.reconstruct(small, net, calib, layers=layers, ridge=args.ridge, residual=residual,
                                progress=False)
        t_rec = time.perf_counter() - t0
        after = psnr_y(small, set5)
        row = dict(run=name, params=n_params(small), psnr_oneshot=before, psnr_recon=after, prune_s=t_prune,
                   recon_s=t_rec, passes=rep.passes, layers_solved=len(rep.layers))
        rows.append(row)
        print(f"{name:<32} {row['params']:>8,}  one-shot {before:7.3f}  recon {after:7.3f}  "
              f"prune {t_prune:6.1f}s  recon {t_rec:6.1f}s ({rep.passes} passes)", flush=True)
    print()
    print("| run | params | Set5 Y one-shot | after reconstruction | prune s | reconstruct s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rec = "" if r["psnr_recon"] is None else f"{r['psnr_recon']:.3f}"
        print(f"| {r['run']} | {r['params']:,} | {r['psnr_oneshot']:.3f} | {rec} | {r['prune_s']:.1f} "
              f"| {r['recon_s']:.1f} |")
    out = Path(args.out)
    if only and out.exists():                    # a partial rerun adds its rows to the earlier ones
        old = json.loads(out.read_text()).get("rows", [])
        rows = [r for r in old if r["run"] not in {x["run"] for x in rows}] + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(config=vars(args), uniform_ratio=ratio, threads=args.threads, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
