"""Distil a half-width RFDN from the official RFDN (AIM 2020) on T91 and compare it with plain L1 training.

Both runs start from the same random initialization, see the same patches in the same order and run the same
number of Adam steps; only the loss differs:

* distilled: ``gt_weight * L1(S, HR) + output_weight * L1(S, T)`` (teacher output as pseudo ground truth)
  ``+ feature_weight * sum_i L1(conv1x1_i(S.Bi), T.Bi)`` for the four RFDB outputs ``B1..B4`` (DIPNet-style);
* plain: ``L1(S, HR)``.

Then both students (and the teacher, for reference) are evaluated on Set5 (RGB and Y PSNR, shave 4) and the
numbers, the settings, the loss history and the wall times go to a JSON file::

    python examples/distill_rfdn.py --steps 600 --out runs/distill_rfdn/result.json
    torchrun --nproc_per_node 2 examples/distill_rfdn.py --steps 600   # the same under DDP (batch is per process)

Checkpoints are written to ``--workdir`` (interrupt with Ctrl-C and re-run to resume). A short CPU run is far from
converged: it shows whether distillation speeds up early training, not the final quality of either student.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import distill
from effsr import models
from effsr.data import PatchDataset, SRFolder
from effsr.inference import evaluate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default=str(data / "checkpoints" / "rfdn_aim2020.pth"))
    p.add_argument("--train", default=str(data / "t91"), help="HR-only training folder (LR by MATLAB bicubic)")
    p.add_argument("--test", default=str(data / "set5"))
    p.add_argument("--nf", type=int, default=25, help="student width (the teacher has 50)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--patch", type=int, default=32, help="LR patch size (HR is 4x)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--feature-weight", type=float, default=0.01,
                   help="per-level weight of the B1..B4 feature terms (features are in the teacher's 0-255 units)")
    p.add_argument("--output-weight", type=float, default=1.0)
    p.add_argument("--gt-weight", type=float, default=1.0)
    p.add_argument("--runs", default="distill,plain", help="comma list of: distill, plain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared, loaded CPU")
    p.add_argument("--workdir", default="runs/distill_rfdn", help="checkpoints (resume after an interruption)")
    p.add_argument("--out", default="runs/distill_rfdn/result.json")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ctx = distill.ddp.init_from_env()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in ("distill", "plain") for r in runs):
        raise ValueError(f"--runs must list 'distill' and/or 'plain', got {args.runs!r}")

    teacher = models.load("rfdn", args.teacher)
    torch.manual_seed(args.seed)
    init = models.build("rfdn", nf=args.nf)  # the same random start for every run
    pairs = [p for p in SRFolder(args.train) if min(p.lr.shape[:2]) >= args.patch]
    data = PatchDataset(pairs, patch_size=args.patch, length=args.steps * args.batch_size * ctx.world_size,
                        seed=args.seed)
    test = SRFolder(args.test)

    result: dict = {
        "settings": {**vars(args), "train_images": len(pairs), "world_size": ctx.world_size,
                     "teacher_params": sum(p.numel() for p in teacher.parameters()),
                     "student_params": sum(p.numel() for p in init.parameters()),
                     "device": str(ctx.device), "torch": torch.__version__, "python": platform.python_version(),
                     "threads": torch.get_num_threads()},
        "runs": {},
    }
    if ctx.is_main:
        t0 = time.perf_counter()
        result["teacher_set5"] = _metrics(evaluate(teacher, test, progress=False))
        result["teacher_set5"]["eval_seconds"] = time.perf_counter() - t0

    for run in runs:
        student = copy.deepcopy(init)
        if run == "distill":
            module: torch.nn.Module = distill.Distiller(
                teacher, student, pairs=[(f"B{i}", f"B{i}", args.feature_weight) for i in range(1, 5)],
                feature_loss="l1", output_weight=args.output_weight, gt_weight=args.gt_weight)
        else:
            module = distill.Supervised(student, "l1")
        t0, c0 = time.perf_counter(), time.process_time()
        res = distill.train_steps(
            module, data, args.steps, lambda ps: torch.optim.Adam(ps, lr=args.lr),
            scheduler_fn=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps, args.lr * 0.02),
            batch_size=args.batch_size, checkpoint=Path(args.workdir) / f"{run}.pt", seed=args.seed,
            log_every=max(1, args.steps // 50), progress=not args.no_progress, ctx=ctx)
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        if isinstance(module, distill.Distiller):
            module.close()
        if ctx.is_main:
            t0 = time.perf_counter()
            metrics = _metrics(evaluate(student.eval(), test, progress=False))
            result["runs"][run] = {**metrics, "steps": res.step, "steps_run_now": res.steps_run,
                                   "train_seconds": train_s, "train_cpu_seconds": train_cpu_s,
                                   "load_average_1min": _load(), "eval_seconds": time.perf_counter() - t0,
                                   "history": res.history}
            print(f"{run}: Set5 PSNR RGB {metrics['psnr_rgb']:.3f} dB, Y {metrics['psnr_y']:.3f} dB "
                  f"after {res.step} steps ({train_s:.0f} s)", file=sys.stderr)

    if ctx.is_main and {"distill", "plain"} <= set(result["runs"]):
        d, p = result["runs"]["distill"], result["runs"]["plain"]
        result["gain_db"] = {"psnr_rgb": d["psnr_rgb"] - p["psnr_rgb"], "psnr_y": d["psnr_y"] - p["psnr_y"]}
    if ctx.is_main:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    distill.ddp.cleanup(ctx)
    return result


def _load() -> float | None:
    """1-minute load average (the CPU may be shared: wall times depend on it)."""
    try:
        import os
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _metrics(ev: dict) -> dict:
    return {"psnr_rgb": ev["psnr_rgb"], "psnr_y": ev["psnr_y"], "ssim_y": ev["ssim_y"],
            "per_image": ev["per_image"]}


if __name__ == "__main__":
    main()
