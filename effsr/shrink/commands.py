"""``effsr shrink`` and ``effsr demo`` (registered with :func:`effsr.cli_core.command` when imported)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effsr.cli_core import CLIError, command, error_line
from effsr.cli_model import add_model_args, model_config

from .config import CALIB_PATCH, CALIB_ROWS, COSINE_FLOOR, LR_SCHEDULES, REFINE_LR, REFINE_STEPS, TUCKER_REFINE

__all__: list[str] = []


def _shrink_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, model_required=True, weights="required", what="teacher network")
    p.add_argument("--train-data", required=True, metavar="DIR",
                   help="training images: HR/ [+ LR_bicubic/X4/], HR-only, or 'default' (scikit-image photos)")
    p.add_argument("--eval-data", required=True, action="append", metavar="DIR",
                   help="evaluation set: a folder as for --train-data, or 'default' (repeat for several)")
    p.add_argument("--prune", type=float, default=0.0, metavar="RATIO",
                   help="fraction of filters to remove, in [0, 1) (default 0: no pruning)")
    p.add_argument("--prune-steps", type=int, default=1, metavar="K",
                   help="pruning rounds (AGP schedule), distillation after each (default 1)")
    p.add_argument("--tucker", type=float, default=None, metavar="FRACTION",
                   help="Tucker-2: keep this fraction of each 3x3 conv's parameters, in (0, 1] (default: off)")
    p.add_argument("--tucker-min-channels", type=int, default=16, metavar="N",
                   help="skip convs with fewer channels than this (default 16)")
    p.add_argument("--repify", default=None, metavar="BLOCK",
                   help="turn the student's 3x3 convs into this rep block first (ecb, rrrb, dbb, ...; "
                        "default: no repify)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="distillation steps after repify, each pruning step and Tucker, or after the data-aware "
                        "compression (0: training-free) (default 100, or no cap with --train-minutes)")
    p.add_argument("--train-minutes", type=float, default=None, metavar="M",
                   help="time budget of each distillation fine-tune: it ends after M minutes of training or "
                        "--steps steps, whichever comes first (the steps done depend on the machine)")
    p.add_argument("--target-params", type=int, default=None, metavar="N",
                   help="data-aware path: the student's parameter budget (<= N): calibration, one-shot "
                        "compression in closed form, then --steps of distillation (default: off)")
    p.add_argument("--target-flops", type=float, default=None, metavar="G",
                   help="data-aware path: a FLOPs budget instead, in G MACs on 3x256x256 (challenge convention)")
    p.add_argument("--target-speedup", type=float, default=None, metavar="X",
                   help="runtime budget: a student X times faster than the teacher, timed on --device at "
                        "--runtime-size (met by pruning)")
    p.add_argument("--target-runtime", type=float, default=None, metavar="MS",
                   help="runtime budget: milliseconds per forward on --device at --runtime-size (met by pruning)")
    p.add_argument("--runtime-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="LR input size of the runtime budget's timings (default 256 256)")
    p.add_argument("--method", default="auto", metavar="prune|tucker|auto",
                   help="data-aware method: channel pruning + least-squares reconstruction, data-aware Tucker-2, "
                        "or auto: both one-shot, keep the better on held-out calibration patches (see --objective)")
    p.add_argument("--importance", default="recon", metavar="l2|activation|recon",
                   help="which filters data-aware pruning removes: the reconstruction-error greedy selection, "
                        "activation energy, or L2 norm (weight norms alone ruin the official RFDN: 20 dB)")
    _calibration_args(p)
    _refine_args(p)
    p.add_argument("--allocation", default="uniform", metavar="uniform|sensitivity",
                   help="data-aware pruning: one ratio for every group with the unused budget given back where "
                        "the calibration error falls most, or per-group ratios from the calibration sensitivity "
                        "(prune.prune_to_budget; measured worse on RFDN)")
    p.add_argument("--objective", default="psnr", metavar="psnr|runtime",
                   help="--method auto keeps the best held-out PSNR-Y, or with 'runtime' the fastest measured "
                        "student within --objective-tolerance dB of it")
    p.add_argument("--objective-tolerance", type=float, default=0.1, metavar="DB",
                   help="PSNR-Y tolerance of --objective runtime")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="training patches per step")
    p.add_argument("--patch-size", type=_patch_size, default=48, metavar="N|auto",
                   help="LR training patch side (default: 48; images smaller than N are left out and the log "
                        "says how many and which; 'auto' = the smallest LR side of the training images, at "
                        "most 48, uses every image but trained RFDN to below bicubic on T91 (19 px))")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (Adam, default 1e-4)")
    p.add_argument("--lr-schedule", default="constant", metavar="|".join(LR_SCHEDULES),
                   help="learning-rate schedule of each distillation fine-tune: constant, or cosine down to "
                        f"{COSINE_FLOOR:g} x --lr over its steps (default: constant)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="distil with weights and batches in channels-last (NHWC) memory format, faster on CPU "
                        "(default: on; --no-channels-last: NCHW)")
    p.add_argument("--feature-layers", default="auto", metavar="auto|blocks|none|NAME,NAME",
                   help="feature distillation points: auto (the zoo's B1..Bn blocks; a user's network: the output "
                        "only), blocks (the network's repeated blocks), none (output only) or module names")
    p.add_argument("--feature-weight", type=float, default=0.1,
                   help="weight of the block-feature distillation terms (default 0.1; 0: output only)")
    p.add_argument("--ema-decay", type=float, default=None, metavar="D",
                   help="end each distillation fine-tune at an exponential moving average of the student's "
                        "weights with decay D in (0, 1), e.g. 0.999 (default: off, the last step's weights)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default: auto, cuda if available)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every random choice in the run")
    p.add_argument("--out", default=None, metavar="RUN_DIR", help="output folder (default runs/shrink_<model>)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (completed stages are reloaded, an interrupted "
                        "one continues from its last checkpoint)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="checkpoint distillation every N steps inside a stage (an interrupt always checkpoints)")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure the official checkpoints (default: when the shared data is found)")
    p.add_argument("--peers-dir", default=None, metavar="DIR",
                   help="folder of the official checkpoints (default: $EFFSR_DATA/checkpoints or "
                        "../shared/data/checkpoints)")
    p.add_argument("--max-train-images", type=int, default=None, metavar="N",
                   help="use at most N training images (default: all)")
    p.add_argument("--max-eval-images", type=int, default=None, metavar="N",
                   help="use at most N images of each eval set (default: all)")
    p.add_argument("--runtime-trials", type=int, default=3, metavar="N", help="timed passes per model in the report")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--y-float", action="store_true",
                   help="report PSNR-Y/SSIM-Y on unrounded luma (default: off: Y rounded to integers, as the "
                        "NTIRE evaluation code and MATLAB's rgb2ycbcr do)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _patch_size(text: str) -> int | None:
    """``--patch-size``: ``auto`` (None) or an int."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {text!r}") from None


def _feature_layers(text: str) -> list[str] | str | None:
    """``--feature-layers``: ``auto`` (None), ``blocks``, ``none`` ([]) or comma-separated names."""
    key = text.strip().lower()
    if key == "auto":
        return None
    if key == "blocks":
        return "blocks"
    if key == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CLIError(f"--feature-layers: expected auto, none or module names, got {text!r}")
    return names


def _run_name(model: str) -> str:
    """A folder name for ``--model``: the zoo name, or the class/factory of a user's network."""
    return model.rsplit(":", 1)[-1] if ":" in model else model


def _calibration_args(p: argparse.ArgumentParser) -> None:
    """The calibration options ``shrink`` and ``frontier`` share."""
    p.add_argument("--calib-images", type=int, default=64, metavar="N",
                   help="calibration LR patches (--calib-patch px) cut from every training image that "
                        "fits one")
    p.add_argument("--calib-patch", type=int, default=CALIB_PATCH, metavar="PX",
                   help=f"LR side of the calibration patches (default {CALIB_PATCH}; smaller when no "
                        "training image is that large)")
    p.add_argument("--calib-rows", type=int, default=CALIB_ROWS, metavar="N",
                   help="output pixels per calibration batch of 8 patches each layer's statistics use "
                        "(a seeded subsample; 0: all, 18,432 for 48 px patches)")
    p.add_argument("--tucker-refine", type=int, default=TUCKER_REFINE, metavar="N",
                   help="alternating refinement rounds of each data-aware Tucker factorization (0: none)")


def _refine_args(p: argparse.ArgumentParser) -> None:
    """Block refinement of the one-shot students (``shrink``)."""
    p.add_argument("--refine-steps", type=int, default=REFINE_STEPS, metavar="N",
                   help="Adam steps per block fitting each one-shot student's blocks to the teacher's block outputs "
                        "on the calibration patches, kept when the held-out PSNR-Y rises (0: off)")
    p.add_argument("--refine-lr", type=float, default=REFINE_LR, metavar="LR",
                   help="learning rate of the block refinement")


def _rows(n: int) -> int | None:
    return None if n == 0 else n


def _config(args: argparse.Namespace):  # -> ShrinkConfig
    from .config import ShrinkConfig

    cfg = ShrinkConfig(
        model=args.model, weights=args.weights, train_data=args.train_data, eval_data=list(args.eval_data),
        out=args.out or f"runs/shrink_{_run_name(args.model)}", prune=args.prune, prune_steps=args.prune_steps,
        tucker=args.tucker, repify=args.repify, steps=args.steps, batch_size=args.batch_size,
        patch_size=args.patch_size, lr=args.lr, lr_schedule=args.lr_schedule, feature_weight=args.feature_weight,
        feature_layers=_feature_layers(args.feature_layers),
        ema_decay=args.ema_decay, train_minutes=args.train_minutes, channels_last=args.channels_last,
        device=args.device,
        seed=args.seed, resume=args.resume, peers=args.peers, peers_dir=args.peers_dir,
        max_train_images=args.max_train_images, max_eval_images=args.max_eval_images,
        runtime_trials=args.runtime_trials, tucker_min_channels=args.tucker_min_channels,
        progress=not args.no_progress, model_config=model_config(args.model_config), y_round=not args.y_float,
        input_range=args.input_range, scale=args.scale, weights_key=args.weights_key,
        checkpoint_every=args.checkpoint_every, target_params=args.target_params, target_flops=args.target_flops,
        target_speedup=args.target_speedup, target_runtime=args.target_runtime,
        runtime_size=list(args.runtime_size) if args.runtime_size else None,
        method=args.method, importance=args.importance, calib_images=args.calib_images,
        calib_patch=args.calib_patch, calib_rows=_rows(args.calib_rows), tucker_refine=args.tucker_refine,
        refine_steps=args.refine_steps, refine_lr=args.refine_lr,
        objective=args.objective,
        objective_tolerance=args.objective_tolerance, allocation=args.allocation)
    try:
        return cfg.validate()
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from None


def _set_threads(n: int | None) -> None:
    import torch

    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CLIError(f"--threads must be an int >= 1, got {n!r}")
    torch.set_num_threads(n)


def _print_summary(out: str | Path, seconds: float | None = None) -> None:
    from .report import read_report, summary_table

    data = read_report(out)
    print(summary_table(data, markdown_table=False))
    extra = f" in {seconds:.0f} s" if seconds is not None else ""
    print(f"\nrun folder{extra}: {out} (student.safetensors, report.md, report.json, frontier.png)")


@command("shrink", help="compress a trained network: repify, prune, fuse, Tucker, distil; report",
         arguments=_shrink_args)
def _shrink(args: argparse.Namespace) -> int:
    import time

    from .runner import run_shrink

    cfg = _config(args)  # every argument checked before any work
    _set_threads(args.threads)
    t0 = time.perf_counter()
    try:
        results = run_shrink(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad data / checkpoint found while loading
        raise CLIError(error_line(err)) from err
    if results.get("is_main", True):  # under torchrun only rank 0 wrote the report
        _print_summary(cfg.out, time.perf_counter() - t0)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", metavar="RUN_DIR", help="output folder")
    p.add_argument("--steps", type=int, default=100, metavar="N",
                   help="distillation steps after the data-aware compression (per stage in the plain recipe)")
    p.add_argument("--teacher-steps", type=int, default=800, metavar="N",
                   help="training steps of the demo teacher (default 800)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of every random choice in the run")
    p.add_argument("--nf", type=int, default=24, metavar="N", help="teacher width")
    p.add_argument("--target-fraction", type=float, default=0.5, metavar="F",
                   help="data-aware path: the student keeps at most this fraction of the teacher's params "
                        "(0: off, use --prune/--tucker)")
    p.add_argument("--target-speedup", type=float, default=None, metavar="X",
                   help="data-aware path with a runtime budget instead: a student X times faster than the teacher "
                        "(timed at 256x256 on --threads; replaces --target-fraction)")
    p.add_argument("--method", default="auto", metavar="prune|tucker|auto", help="data-aware method")
    p.add_argument("--prune", type=float, default=0.0, metavar="RATIO",
                   help="plain recipe (with --target-fraction 0): fraction of filters to remove")
    p.add_argument("--tucker", type=float, default=None, metavar="FRACTION",
                   help="plain recipe (with --target-fraction 0): Tucker-2, fraction of each 3x3 conv's params kept")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="train and distil in channels-last (NHWC) memory format, faster on CPU (default: on)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=False,
                   help="also measure the official checkpoints if the shared data is found (default: no)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads (default 1: the demo's small convs gain little from more, and lose a "
                        "lot on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


@command("demo", help="the whole shrink pipeline offline on scikit-image's photos (a few minutes on CPU)",
         arguments=_demo_args)
def _demo(args: argparse.Namespace) -> int:
    import time

    from .demo import run_demo

    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be an int >= 1, got {args.threads}")
    t0 = time.perf_counter()
    _set_threads(args.threads)
    try:
        run_demo(args.out, steps=args.steps, teacher_steps=args.teacher_steps, seed=args.seed, nf=args.nf,
                 prune=args.prune, tucker=args.tucker, device=args.device, resume=args.resume,
                 target_fraction=args.target_fraction or None, target_speedup=args.target_speedup,
                 method=args.method,
                 peers=args.peers, progress=not args.no_progress, channels_last=args.channels_last)
    except (ValueError, TypeError) as err:
        raise CLIError(error_line(err)) from err
    _print_summary(args.out, time.perf_counter() - t0)
    sys.stdout.flush()
    return 0


def _frontier_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, model_required=True, weights="required", what="teacher network")
    p.add_argument("--calib-data", required=True, metavar="DIR",
                   help="calibration images: HR/ [+ LR_bicubic/X4/], HR-only, or 'default' (scikit-image photos)")
    p.add_argument("--eval-data", required=True, action="append", metavar="DIR",
                   help="evaluation set (repeat for several); the plot uses the first")
    p.add_argument("--budgets", default="0.9,0.8,0.67,0.5,0.33", metavar="F,F,...",
                   help="fractions of the teacher's params, each in (0, 1)")
    p.add_argument("--method", default="prune,tucker", metavar="M,M",
                   help="one-shot methods: prune (+ least-squares reconstruction), tucker (data-aware)")
    p.add_argument("--importance", default="recon", metavar="l2|activation|recon", help="pruning importance")
    _calibration_args(p)
    p.add_argument("--tucker-min-channels", type=int, default=16, metavar="N",
                   help="Tucker skips convs with fewer channels")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (frontier.json/.csv/.png)")
    p.add_argument("--resume", action="store_true", help="keep the points already in DIR/frontier.json")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure the official checkpoints (default: when the shared data is found)")
    p.add_argument("--peers-dir", default=None, metavar="DIR", help="folder of the official checkpoints")
    p.add_argument("--max-eval-images", type=int, default=None, metavar="N", help="at most N images per eval set")
    p.add_argument("--runtime-trials", type=int, default=1, metavar="N", help="timed passes per model")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the calibration patches")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--y-float", action="store_true", help="PSNR-Y on unrounded luma")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _floats(text: str, arg: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"{arg}: expected comma-separated numbers, got {text!r}") from None


@command("frontier", help="one-shot data-aware students at several budgets: frontier.png/.json/.csv",
         arguments=_frontier_args)
def _frontier(args: argparse.Namespace) -> int:
    from .frontier import FrontierConfig, run_frontier

    cfg = FrontierConfig(model=args.model, weights=args.weights, calib_data=args.calib_data,
                         eval_data=list(args.eval_data), out=args.out, budgets=_floats(args.budgets, "--budgets"),
                         methods=[m.strip() for m in args.method.split(",") if m.strip()],
                         calib_images=args.calib_images, calib_patch=args.calib_patch,
                         calib_rows=_rows(args.calib_rows),
                         tucker_refine=args.tucker_refine, importance=args.importance,
                         tucker_min_channels=args.tucker_min_channels, seed=args.seed, device=args.device,
                         resume=args.resume, peers=args.peers, peers_dir=args.peers_dir,
                         runtime_trials=args.runtime_trials, max_eval_images=args.max_eval_images,
                         y_round=not args.y_float, progress=not args.no_progress,
                         model_config=model_config(args.model_config), input_range=args.input_range,
                         scale=args.scale, weights_key=args.weights_key)
    try:
        cfg.validate()
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from None
    _set_threads(args.threads)
    try:
        doc = run_frontier(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(error_line(err)) from err
    first = doc["eval_sets"][0]
    for row in doc["models"]:
        flag = "  BELOW BICUBIC" if row.get("below_bicubic") and "BELOW" not in row["label"] else ""
        print(f"{row['label']:<28} {row['params']:>9,} params {row['flops'] / 1e9:7.2f} G  {row['convs']:>4} convs  "
              f"{first} PSNR-Y {row['eval'][first]['psnr_y']:.3f}{flag}")
    print(f"bicubic {first} PSNR-Y {doc['bicubic'][first]['psnr_y']:.3f}")
    print(f"wrote {args.out}/frontier.json, frontier.csv, frontier.png")
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="folders written by effsr frontier (frontier.json) or effsr shrink (report.json)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: compare.json, compare.csv, compare.png")


@command("compare", help="several networks and their compressed students in one quality-vs-size plot",
         arguments=_compare_args)
def _compare(args: argparse.Namespace) -> int:
    from .compare import merge_runs, write_compare

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out: {args.out} exists and is not a directory")
    try:
        doc = merge_runs(args.runs)
    except ValueError as err:
        raise CLIError(error_line(err)) from err
    write_compare(doc, out)
    for m in sorted(doc["models"], key=lambda m: (m["family"], -m["params"])):
        print(f"{m['family']:<16} {m['label']:<22} {m['params']:>9,} params  {doc['eval_set']} PSNR-Y "
              f"{m['psnr_y']:.3f}")
    print(f"wrote {out}/compare.json, compare.csv, compare.png")
    return 0
