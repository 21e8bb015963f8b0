"""Tucker-2 decompose the official RFDN (AIM 2020, deploy form) and measure it before any fine-tuning.

For each requested fraction (default 0.70 and 0.50 of each eligible conv's parameters) the script runs
:func:`decompose.tucker_model` on the official checkpoint and records: the layers decomposed (with ranks and
relative kernel errors), parameters and FLOPs (``effsr.metrics.profile``, NTIRE convention: MACs on a 3x256x256
input), Set5 x4 PSNR (RGB and BT.601 Y, shave 4, ``effsr.inference.evaluate``), the decomposition time and the
Set5 evaluation time; the unmodified RFDN is measured the same way for comparison. It also checks that
:func:`decompose.recompose_model` fuses the decomposed model back into a plain RFDN computing the same output.

    python examples/decompose_rfdn.py --out runs/decompose_rfdn/result.json

Writes ``result.json`` and, per fraction, the layer report as ``report_<fraction>.csv`` next to it.
Only 3x3 convs with >= ``--min-channels`` channels are eligible (1x1 convs, the 3-channel head and the
12-channel ESA convs are skipped; the report says why), so the whole model shrinks less than the fraction.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))  # run from a checkout without relying on how the project was installed


def measure(model: torch.nn.Module, pairs, progress: bool) -> dict:
    from effsr.inference import evaluate
    from effsr.metrics import profile

    prof = profile(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        quality = evaluate(model, pairs, progress=progress)
    return {"params": prof.params, "flops": prof.flops, "gflops": prof.flops / 1e9, "convs": prof.convs,
            "set5_psnr_rgb": quality["psnr_rgb"], "set5_psnr_y": quality["psnr_y"], "set5_ssim_y": quality["ssim_y"],
            "per_image": quality["per_image"], "eval_seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DATA / "checkpoints" / "rfdn_aim2020.pth")
    parser.add_argument("--set5", type=Path, default=DATA / "set5")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--vbmf", action="store_true", help="also decompose with EVBMF-chosen ranks")
    parser.add_argument("--min-channels", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (timings are per thread count)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "decompose_rfdn" / "result.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from effsr.data import SRFolder
    from effsr.models import load

    from decompose import recompose_model, tucker_model

    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pairs = list(SRFolder(args.set5, scale=4))
    base = load("rfdn", args.checkpoint)

    result: dict = {
        "checkpoint": str(args.checkpoint), "set5": str(args.set5), "images": len(pairs),
        "min_channels": args.min_channels, "threads": args.threads,
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "device": "cpu"},
        "flops_convention": ("effsr.metrics.profile: multiply-accumulates of Conv2d/Linear/activation modules, "
                             "3x256x256"),
        "psnr_convention": "Set5 x4, uint8 outputs, shave 4; RGB and BT.601 Y (effsr.inference.evaluate)",
        "baseline": measure(base, pairs, progress),
        "decomposed": [],
    }
    print(f"RFDN: {result['baseline']['params']} params, {result['baseline']['gflops']:.2f} G FLOPs, "
          f"Set5 Y {result['baseline']['set5_psnr_y']:.3f} dB / RGB {result['baseline']['set5_psnr_rgb']:.3f} dB")

    specs: list = list(args.fractions) + (["vbmf"] if args.vbmf else [])
    for spec in specs:
        t0 = time.perf_counter()
        model, report = tucker_model(base, spec, min_channels=args.min_channels, progress=progress)
        seconds = time.perf_counter() - t0
        tag = f"{spec:.2f}" if isinstance(spec, float) else str(spec)
        report.to_csv(args.out.parent / f"report_{tag}.csv")
        row = measure(model, pairs, progress)
        # the decomposed model fuses back into plain RFDN convs computing the same output
        x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * base.input_range
        with torch.no_grad():
            y, z = model(x), recompose_model(model)(x)
        summary = report.summary()
        row.update({
            "rank": spec, "decompose_seconds": seconds,
            "param_fraction_of_model": row["params"] / result["baseline"]["params"],
            "flop_fraction": row["flops"] / result["baseline"]["flops"],
            "decomposed_layers": [{"name": r.name, "shape": f"{r.in_channels}->{r.out_channels} {r.kernel_size}",
                                   "ranks": [r.rank_out, r.rank_in], "params_before": r.params_before,
                                   "params_after": r.params_after, "rel_error": r.rel_error}
                                  for r in report.decomposed],
            "skipped_reasons": sorted({r.reason for r in report.skipped}),
            "report_summary": summary,
            "recompose_max_abs_diff": float((y - z).abs().max()),
        })
        result["decomposed"].append(row)
        print(report.table().splitlines()[-1])
        print(f"  -> {row['params']} params ({row['param_fraction_of_model']:.1%}), {row['gflops']:.2f} G FLOPs "
              f"({row['flop_fraction']:.1%}), Set5 Y {row['set5_psnr_y']:.3f} dB / RGB {row['set5_psnr_rgb']:.3f} dB, "
              f"decomposed in {seconds:.2f} s")
        args.out.write_text(json.dumps(result, indent=2))  # partial results survive an interruption
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
