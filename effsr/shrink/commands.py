"""``effsr shrink`` and ``effsr demo`` (registered with :func:`effsr.cli_core.command` when imported)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effsr.cli_core import CLIError, command, error_line
from effsr.cli_model import add_model_args, model_config

from .config import ShrinkConfig
from .frontier import FrontierConfig
from .options import SettingError, SettingTypeError, add_options, flags, from_args

__all__: list[str] = []


def _shrink_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, model_required=True, weights="required", what="teacher network")
    # every other option is declared once, on its ShrinkConfig field; --out and --threads are the command's
    add_options(p, ShrinkConfig, before={"resume": _shrink_out_arg, "y_round": _threads_arg})


def _shrink_out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, metavar="RUN_DIR", help="output folder (default runs/shrink_<model>)")


def _threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads``: the process's CPU threads, not a setting of the run."""
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")


def _run_name(model: str) -> str:
    """A folder name for ``--model``: the zoo name, or the class/factory of a user's network."""
    return model.rsplit(":", 1)[-1] if ":" in model else model


def _flag_line(err: BaseException, cls: type) -> str:
    """``err``'s message in one line as the command line words it: a setting of ``cls`` named by its flag."""
    if isinstance(err, (SettingError, SettingTypeError)):
        err = CLIError(err.with_flags(flags(cls)))
    return error_line(err)


def _config(args: argparse.Namespace) -> ShrinkConfig:
    try:
        cfg = from_args(ShrinkConfig, args, out=args.out or f"runs/shrink_{_run_name(args.model)}",
                        model_config=model_config(args.model_config))  # --model-config: JSON, as every command's
        return cfg.validate()
    except (ValueError, TypeError) as err:
        raise CLIError(_flag_line(err, ShrinkConfig)) from None


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
        raise CLIError(_flag_line(err, ShrinkConfig)) from err
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
    except (ValueError, TypeError) as err:  # the demo's settings are named as effsr shrink's
        raise CLIError(_flag_line(err, ShrinkConfig)) from err
    _print_summary(args.out, time.perf_counter() - t0)
    sys.stdout.flush()
    return 0


def _frontier_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, model_required=True, weights="required", what="teacher network")
    # every other option is declared once, on its FrontierConfig field; --out and --threads are the command's
    add_options(p, FrontierConfig, before={"resume": _frontier_out_arg, "y_round": _threads_arg})


def _frontier_out_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (frontier.json/.csv/.png)")


@command("frontier", help="one-shot data-aware students at several budgets: frontier.png/.json/.csv",
         arguments=_frontier_args)
def _frontier(args: argparse.Namespace) -> int:
    from .frontier import run_frontier

    try:
        cfg = from_args(FrontierConfig, args, model_config=model_config(args.model_config)).validate()
    except (ValueError, TypeError) as err:
        raise CLIError(_flag_line(err, FrontierConfig)) from None
    _set_threads(args.threads)
    try:
        doc = run_frontier(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(_flag_line(err, FrontierConfig)) from err
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
