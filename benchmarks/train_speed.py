"""Distillation step time in NCHW against channels-last (NHWC) memory format, measured side by side.

For the teacher RFDN (433,448 params) and two students of MegSR's size -- a plain narrower RFDN (nf=40, what
pruning makes) and a Tucker-2 RFDN (~100 convs, what decomposition makes) -- one :class:`distill.Distiller`
step (teacher forward, student forward + backward, Adam) on ``--batch-size`` LR patches of ``--patch-size``
pixels, with ``distill.train_steps(channels_last=False)`` and ``(channels_last=True)``.

The two formats are interleaved (NCHW, NHWC, NCHW, ...) ``--repeats`` times and the median seconds per step is
used, so the ratio comes from one run under the same conditions. Both formats start from the same weights and
see the same batches; the largest relative difference of the trained weights is reported beside the ratio
(float rounding only). Speed does not depend on the weights' values, so the networks are randomly initialised
and no data is needed. Results are printed and written as JSON.

    python benchmarks/train_speed.py --threads 2 --out bench_results/train_speed.json
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decompose  # noqa: E402
import distill  # noqa: E402
from effsr import models  # noqa: E402
from reparam.utils.io import write_json  # noqa: E402


def students(teacher: nn.Module) -> dict[str, nn.Module]:
    torch.manual_seed(1)
    narrow = models.build("rfdn", nf=40)
    tucker, _ = decompose.tucker_model(teacher, 0.6, progress=False)
    return {"narrow_rfdn_nf40": narrow, "tucker_rfdn": tucker}


def run(teacher: nn.Module, student: nn.Module, data: torch.utils.data.Dataset, steps: int, batch: int,
        channels_last: bool) -> tuple[float, nn.Module]:
    student = copy.deepcopy(student).train()
    d = distill.Distiller(teacher, student, output_weight=1.0, gt_weight=1.0)
    stamps: list[float] = []  # after each step: the first (warm-up) step is left out of the time
    try:
        distill.train_steps(d, data, steps + 1, lr=1e-4, batch_size=batch, seed=0, progress=False,
                            channels_last=channels_last, log_every=steps + 1,
                            on_step=lambda _: stamps.append(time.perf_counter()))
    finally:
        d.close()
    return (stamps[-1] - stamps[0]) / steps, student


def max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    worst = 0.0
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        if x.is_floating_point():
            worst = max(worst, float((x - y).abs().max()) / max(float(x.abs().max()), 1e-12))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--patch-size", type=int, default=48, help="LR patch side")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement (+1 untimed warm-up)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_results/train_speed.json")
    args = ap.parse_args(argv)
    for name in ("threads", "batch_size", "patch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = models.build("rfdn").eval()
    n = args.batch_size * 2
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(n, 3, args.patch_size, args.patch_size, generator=g)
    hr = torch.rand(n, 3, 4 * args.patch_size, 4 * args.patch_size, generator=g)
    data = torch.utils.data.TensorDataset(lr, hr)
    results: dict[str, dict] = {}
    for name, student in students(teacher).items():
        times: dict[bool, list[float]] = {False: [], True: []}
        trained: dict[bool, nn.Module] = {}
        for _ in range(args.repeats):
            for cl in (False, True):
                seconds, trained[cl] = run(teacher, student, data, args.steps, args.batch_size, cl)
                times[cl].append(seconds)
        nchw, nhwc = statistics.median(times[False]), statistics.median(times[True])
        results[name] = {"params": sum(p.numel() for p in student.parameters()),
                         "convs": sum(isinstance(m, nn.Conv2d) for m in student.modules()),
                         "nchw_s_per_step": nchw, "nhwc_s_per_step": nhwc, "speedup": nchw / nhwc,
                         "max_rel_weight_diff": max_rel_diff(trained[False], trained[True]),
                         "samples": {"nchw": times[False], "nhwc": times[True]}}
        r = results[name]
        print(f"{name:18s} {r['params']:>9,d} params {r['convs']:>4d} convs   NCHW {nchw:.3f} s/step   "
              f"NHWC {nhwc:.3f} s/step   speed-up {r['speedup']:.2f}x   weights differ by "
              f"{r['max_rel_weight_diff']:.1e} (relative)", flush=True)
    doc = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                       "torch": torch.__version__},
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    print(f"wrote {write_json(args.out, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
