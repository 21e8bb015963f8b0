"""Prune the official RFDN (AIM 2020) to the size of MegSR's pruned RFDN (289,888 params) and fine-tune.

    python examples/prune_rfdn.py --data ../shared/data --out results/prune_rfdn

What it measures (written to ``<out>/prune_rfdn.json`` and printed):

1. the unpruned RFDN on Set5 (Y-PSNR, shave 4, BT.601),
2. the L2-filter ratio that lands closest to ``--target-params`` (bisection over one-shot prunes),
3. one-shot pruning to that ratio: params, FLOPs (3x256x256, challenge convention), Set5 right after,
   for the L2 filter criterion, the activation criterion (``prune.ActivationImportance``) and random,
4. iterative pruning (AGP schedule, ``--steps`` rounds) with a short L1 fine-tune on T91 patches after
   each round and a final fine-tune, all within ``--budget`` seconds of fine-tuning: Set5 after, times.

The fine-tune here is a *smoke-scale* budget (minutes of CPU), not MegSR's full training.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch_pruning as tp
from torch.utils.data import DataLoader

import prune
from effsr import models
from effsr.data import PatchDataset, SRFolder
from effsr.inference import evaluate
from effsr.metrics import profile
from effsr.train import sr_finetune

MEGSR_PARAMS = 289_888
MEGSR_SET5_Y = 32.12


def set5_y(model: torch.nn.Module, pairs) -> float:
    return float(evaluate(model.eval(), pairs, progress=False)["psnr_y"])


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def find_ratio(net: torch.nn.Module, example: torch.Tensor, target: int, iters: int = 14) -> tuple[float, int]:
    """Ratio whose one-shot prune has the parameter count closest to ``target`` (params fall with ratio)."""
    lo, hi = 0.0, 0.9
    best = (0.0, params(net))
    for _ in range(iters):
        mid = (lo + hi) / 2
        n = params(prune.l2_filter_prune(net, example, mid, progress=False, flops_input_size=(3, 32, 32)))
        if abs(n - target) < abs(best[1] - target):
            best = (mid, n)
        if n > target:
            lo = mid
        else:
            hi = mid
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="folder with checkpoints/, set5/, t91/")
    ap.add_argument("--out", default="results/prune_rfdn", help="output folder (JSON + pruned model)")
    ap.add_argument("--target-params", type=int, default=MEGSR_PARAMS)
    ap.add_argument("--steps", type=int, default=4, help="iterative pruning rounds (AGP schedule)")
    ap.add_argument("--budget", type=float, default=600.0, help="total fine-tuning seconds")
    ap.add_argument("--final-share", type=float, default=0.5, help="share of the budget for the last fine-tune")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=48, help="LR patch size")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--importance", choices=["l2", "activation"], default="l2",
                    help="criterion of the iterative run (one-shot numbers are reported for l2, activation "
                         "and random)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result: dict = {"target_params": args.target_params, "megsr": {"params": MEGSR_PARAMS, "set5_psnr_y": MEGSR_SET5_Y},
                    "args": vars(args)}

    net = models.load("rfdn", data / "checkpoints" / "rfdn_aim2020.pth")
    set5 = list(SRFolder(data / "set5"))
    example = torch.rand(1, 3, 32, 32) * net.input_range
    base = profile(net)
    result["unpruned"] = {"params": base.params, "flops": base.flops, "set5_psnr_y": set5_y(net, set5)}
    print(f"RFDN: {base.params:,} params, {base.flops / 1e9:.2f} G FLOPs, "
          f"Set5 Y {result['unpruned']['set5_psnr_y']:.3f} dB")

    ratio, n = find_ratio(net, example, args.target_params)
    result["ratio"] = ratio
    print(f"ratio {ratio:.4f} -> {n:,} params (target {args.target_params:,})")

    pairs = [p for p in SRFolder(data / "t91") if min(p.lr.shape[:2]) >= args.patch]
    loader = DataLoader(PatchDataset(pairs, patch_size=args.patch, length=10**6, seed=args.seed),
                        batch_size=args.batch, shuffle=False, num_workers=0)
    calibration = next(iter(DataLoader(PatchDataset(pairs, patch_size=args.patch, seed=args.seed + 1),
                                       batch_size=8)))[0] * net.input_range
    criteria = {"l2": None, "activation": prune.ActivationImportance(calibration),
                "random": tp.importance.RandomImportance()}
    result["one_shot"] = {}
    for label, imp in criteria.items():
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        one = prune.l2_filter_prune(net, example, ratio, progress=False, importance=imp)
        t_one = time.perf_counter() - t0
        p1 = profile(one)
        result["one_shot"][label] = {"params": p1.params, "flops": p1.flops, "prune_seconds": t_one,
                                     "set5_psnr_y": set5_y(one, set5),
                                     "channels": one.pruning_report.history[-1].channels,
                                     "locked": one.pruning_report.locked}
        print(f"one-shot {label}: {p1.params:,} params, {p1.flops / 1e9:.2f} G FLOPs, Set5 Y right after "
              f"pruning {result['one_shot'][label]['set5_psnr_y']:.3f} dB ({t_one:.1f} s)")

    # Iterative AGP pruning with fine-tuning between rounds, then a final fine-tune.
    step_budget = args.budget * (1 - args.final_share) / args.steps
    ft_steps = sr_finetune(loader, 10**6, lr=args.lr, max_seconds=step_budget, progress=False)
    after_steps: list[dict] = []

    def finetune(model: torch.nn.Module, step: int) -> dict:
        info = ft_steps(model, step)
        info["set5_psnr_y"] = set5_y(model, set5)
        after_steps.append(info)
        print(f"  step {step}: {params(model):,} params, fine-tuned {info['iterations']} it "
              f"({info['seconds']:.0f} s), Set5 Y {info['set5_psnr_y']:.3f} dB")
        return info

    t0 = time.perf_counter()
    it = prune.l2_filter_prune(net, example, ratio, steps=args.steps, schedule="agp", finetune=finetune,
                               progress=False, importance=criteria[args.importance])
    final = sr_finetune(loader, 10**6, lr=args.lr / 2, max_seconds=args.budget * args.final_share, progress=False)
    info = final(it, args.steps + 1)
    t_it = time.perf_counter() - t0
    p2 = profile(it)
    result["iterative"] = {"importance": args.importance, "params": p2.params, "flops": p2.flops, "steps": args.steps,
                           "schedule": it.pruning_report.schedule, "per_step": after_steps,
                           "final_finetune": info, "set5_psnr_y": set5_y(it, set5), "wall_seconds": t_it,
                           "train_images": len(pairs),
                           "finetune_iterations": sum(s["iterations"] for s in after_steps) + info["iterations"]}
    print(f"iterative ({args.steps} AGP steps + fine-tune, {result['iterative']['finetune_iterations']} it "
          f"x batch {args.batch}): Set5 Y {result['iterative']['set5_psnr_y']:.3f} dB, {t_it:.0f} s")
    prune.save(it, out / "rfdn_pruned_l2.safetensors")
    it.pruning_report.save(out / "prune_report.json")
    result["total_seconds"] = time.perf_counter() - t_start
    (out / "prune_rfdn.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'prune_rfdn.json'} ({result['total_seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
