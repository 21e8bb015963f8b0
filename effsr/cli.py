"""Command-line interface: ``effsr <command> ...`` (also ``python -m effsr``).

Commands are registered with :func:`command`; each one is a pair of functions, one that adds its
arguments to an :class:`argparse.ArgumentParser` and one that runs it and returns an exit code. A new
command (``shrink``, ``demo``, ...) is added by writing those two functions in any module imported
here::

    def _demo_args(p): p.add_argument("--model", required=True)

    @command("demo", help="...", arguments=_demo_args)
    def _demo(args) -> int: ...

User errors (missing files, a checkpoint of another architecture, an unreadable image, LR/HR sizes that
do not match) raise :class:`CLIError`; :func:`main` prints them as one line on stderr and returns 2.
Set ``EFFSR_DEBUG=1`` to get the traceback instead. Result files (JSON, images) are only written
after the command has succeeded, JSON atomically (temporary file + :func:`os.replace`).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "command", "COMMANDS", "CLIError", "build_parser", "write_json_atomic", "error_line",
           "HelpFormatter", "model_help"]


from .cli_core import (COMMANDS, ArgumentParser, CLIError, HelpFormatter, StagedDir,  # noqa: E402
                       check_output_dir, check_output_file, command, error_line, model_help, open_data,
                       write_json_atomic)
from .cli_model import add_model_args, model_label, open_model  # noqa: E402


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("effsr")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _device(name: str) -> str:
    from reparam.utils.device import resolve_device

    try:
        return str(resolve_device(name, arg="--device"))
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from None


def _model_names() -> list[str]:
    from . import models

    return list(models.names())


# ------------------------------------------------------------------------------------------- profile
def _profile_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, what="network name(s), or 'all'")
    p.set_defaults(model=None)
    for action in p._actions:  # several networks may be profiled side by side
        if action.dest == "model":
            action.nargs = "+"
    p.add_argument("--input-size", nargs=3, type=int, default=[3, 256, 256], metavar=("C", "H", "W"),
                   help="input size for the counts (default: 3 256 256, the NTIRE convention)")
    p.add_argument("--json", metavar="OUT", help="write the numbers to this JSON file (default: print only)")


@command("profile", help="parameters, FLOPs, activations and convs (NTIRE ESR conventions)",
         arguments=_profile_args)
def _profile(args: argparse.Namespace) -> int:
    from .metrics import format_table, profile

    check_output_file(args.json, "--json")
    specs = args.model or [None]
    names = _model_names() if specs == ["all"] else list(dict.fromkeys(specs))
    if len(names) > 1 and (args.model_config or args.weights):
        raise CLIError("--model-config/--weights: profile one network at a time with them")
    profiles = {}
    for name in names:
        one = argparse.Namespace(**{**vars(args), "model": name})
        net = open_model(one, weights=args.weights is not None, need_range=False)
        try:
            profiles[model_label(one, net)] = profile(net, tuple(args.input_size))
        except ValueError as exc:
            raise CLIError(error_line(exc)) from exc
    print(format_table(profiles))
    if args.json:
        if len(profiles) == 1:
            (name, prof), = profiles.items()
            payload: dict[str, Any] = {"model": name, **prof.as_dict()}
        else:
            payload = {name: prof.as_dict() for name, prof in profiles.items()}
        write_json_atomic(args.json, payload)
    return 0


# ---------------------------------------------------------------------------------------------- eval
def _common_run_args(p: argparse.ArgumentParser, weights_required: bool) -> None:
    add_model_args(p, weights="required" if weights_required else "optional")
    p.add_argument("--data", default="default", metavar="DIR",
                   help="dataset root (HR/ + LR_bicubic/X4/), an HR-only folder, or 'default' "
                        "(scikit-image's bundled photos); default: %(default)s")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default: auto, cuda if available)")
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="run on N x N LR tiles (default: whole images)")
    p.add_argument("--tile-overlap", type=int, default=8, metavar="N",
                   help="LR pixels of context around each tile (default: %(default)s)")
    p.add_argument("--json", metavar="OUT", help="write the results to this JSON file (default: print only)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check_tile_args(args: argparse.Namespace) -> None:
    if args.tile is not None and args.tile < 1:
        raise CLIError(f"--tile must be a positive integer, got {args.tile}")
    if args.tile_overlap < 0:
        raise CLIError(f"--tile-overlap must be >= 0, got {args.tile_overlap}")


def _eval_args(p: argparse.ArgumentParser) -> None:
    _common_run_args(p, weights_required=True)
    p.add_argument("--save-images", metavar="DIR",
                   help="also write the SR images as PNG into DIR (default: not saved)")
    p.add_argument("--y-float", action="store_true",
                   help="measure PSNR-Y/SSIM-Y on unrounded luma (default: off: Y rounded to integers "
                        "before measuring, as the NTIRE evaluation code and MATLAB's rgb2ycbcr do)")
    p.add_argument("--gray-channel", action="store_true",
                   help="measure a gray source image (Set14's bridge) on its gray channel, as the MATLAB papers "
                        "do (default: off: read as three identical channels, as the NTIRE evaluation code does)")


@command("eval", help="PSNR (RGB, Y) and SSIM (Y) of a trained network on a dataset", arguments=_eval_args)
def _eval(args: argparse.Namespace) -> int:
    from .inference import evaluate

    check_output_file(args.json, "--json")
    check_output_dir(args.save_images, "--save-images")
    _check_tile_args(args)
    device = _device(args.device)
    model = open_model(args)
    label = model_label(args, model)
    pairs = open_data(args.data, model.scale)
    with StagedDir(args.save_images) as staged:
        try:
            result = evaluate(model, pairs, progress=not args.no_progress, save_dir=staged.path,
                              tile=args.tile, tile_overlap=args.tile_overlap, device=device,
                              y_round=not args.y_float, gray_channel=args.gray_channel)
        except (ValueError, OSError) as exc:
            raise CLIError(error_line(exc)) from exc
        staged.commit()
    width = max([len("image")] + [len(r["name"]) for r in result["per_image"]])
    y_note = "unrounded Y" if args.y_float else "integer Y (NTIRE/MATLAB)"
    print(f"{'image'.ljust(width)}  PSNR-RGB  PSNR-Y   SSIM-Y   ({y_note})")
    for r in result["per_image"]:
        print(f"{r['name'].ljust(width)}  {r['psnr_rgb']:8.3f}  {r['psnr_y']:6.3f}  {r['ssim_y']:.4f}")
    print(f"{'mean'.ljust(width)}  {result['psnr_rgb']:8.3f}  {result['psnr_y']:6.3f}  {result['ssim_y']:.4f}"
          f"   ({label}, {len(result['per_image'])} images, {args.data})")
    if args.json:
        payload = {"model": args.model or label, "weights": str(args.weights), "data": str(args.data),
                   "tile": args.tile, "y_round": not args.y_float, "gray_channel": args.gray_channel, **result}
        write_json_atomic(args.json, payload)
    return 0


# ------------------------------------------------------------------------------------------- runtime
def _runtime_args(p: argparse.ArgumentParser) -> None:
    _common_run_args(p, weights_required=False)
    p.add_argument("--trials", type=int, default=3, help="timed passes; the best counts (default: 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forward passes first (default: 2)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")


@command("runtime", help="inference time per image (best of N trials) and peak memory",
         arguments=_runtime_args)
def _runtime(args: argparse.Namespace) -> int:
    import torch

    from .metrics import runtime

    check_output_file(args.json, "--json")
    _check_tile_args(args)
    if args.trials < 1 or args.warmup < 0:
        raise CLIError("--trials must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    model = open_model(args)
    label = model_label(args, model)
    pairs = open_data(args.data, model.scale)
    try:
        images = [p.lr for p in pairs]
        result = runtime(model, images, device=device, trials=args.trials, warmup=args.warmup,
                         tile=args.tile, tile_overlap=args.tile_overlap)
    except (ValueError, OSError) as exc:
        raise CLIError(error_line(exc)) from exc
    mem = result["max_memory_mb"]
    mem_text = "n/a" if mem is None else f"{mem:.1f} MiB ({result['memory_kind']})"
    trials = ", ".join(f"{t:.1f}" for t in result["trials_ms"])
    print(f"{label}: {result['ms_per_image']:.2f} ms/image on {result['device']} "
          f"(best of {len(result['trials_ms'])}: {trials} ms; {result['images']} images), memory {mem_text}")
    if args.json:
        write_json_atomic(args.json, {"model": args.model or label, "weights": args.weights, "data": str(args.data),
                                      **result})
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    import effsr.shrink.commands  # noqa: F401  (registers `shrink` and `demo`; it imports effsr.cli_core only)
    import effsr.export.cli  # noqa: F401  (registers `export`)

    parser = ArgumentParser(
        prog="effsr", formatter_class=HelpFormatter,
        description="Efficient super-resolution toolkit: profile, evaluate, time and shrink SR networks.")
    parser.add_argument("--version", action="version", version=f"effsr {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        cmd.arguments(sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, formatter_class=HelpFormatter))
    return parser


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, or argparse's own usage errors (exit code 2)
        return _exit_code(exc.code)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except CLIError as exc:
        if os.environ.get("EFFSR_DEBUG"):
            raise
        print(f"effsr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"effsr {args.command}: interrupted", file=sys.stderr)
        return 130
