"""The ``--model`` options every command shares, and :func:`open_model` that turns them into a network.

``--model`` takes a zoo name, ``path/to/file.py:Class`` or ``package.module:factory`` (a user's network, with
``--model-config`` its keyword arguments, ``--input-range`` the range it takes and returns, ``--scale`` its
upscaling factor and ``--weights-key`` the checkpoint entry holding its state_dict). With a student file
written by ``effsr shrink`` as ``--weights``, ``--model`` may be left out: the file carries its recipe.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path
from typing import Any

from .cli_core import CLIError, error_line, model_help

__all__ = ["add_model_args", "open_model", "model_config", "model_label", "ARG_FLAGS", "flag_error", "as_flags"]

#: API argument names in error messages -> the command line's flags.
ARG_FLAGS = {"model": "--model", "config": "--model-config", "input_range": "--input-range", "scale": "--scale",
             "weights_key": "--weights-key", "key": "--weights-key", "path": "--weights", "weights": "--weights"}


def add_model_args(p: argparse.ArgumentParser, *, model_required: bool = False, weights: str = "optional",
                   what: str = "network") -> None:
    """Add ``--model``, ``--model-config``, ``--input-range``, ``--scale``, ``--weights-key`` and (``weights``:
    ``"required"``, ``"optional"`` or ``"none"``) ``--weights`` to ``p``."""
    p.add_argument("--model", required=model_required, default=None, metavar="NAME|FILE.py:CLASS|MODULE:FACTORY",
                   help=model_help(f"{what}") + "; or your own network as path/to/file.py:Class or "
                        "package.module:factory" + ("" if model_required else
                                                    "; may be left out with a student written by effsr shrink"))
    if weights != "none":
        p.add_argument("--weights", required=weights == "required", default=None, metavar="PATH",
                       help="checkpoint (.pth/.pt state_dict, read weights-only, or .safetensors), or a student "
                            "written by `effsr shrink` (its recipe inside)")
    p.add_argument("--model-config", default=None, metavar="JSON",
                   help='constructor keyword arguments of the network, e.g. \'{"feature_channels": 28}\'')
    p.add_argument("--input-range", type=float, default=None, metavar="R",
                   help="the range [0, R] the network takes and returns (1 or 255); required for a network "
                        "that declares none")
    p.add_argument("--scale", type=int, default=None, metavar="N",
                   help="upscaling factor (measured from a forward on a small input; a mismatch is an error)")
    p.add_argument("--weights-key", default=None, metavar="KEY",
                   help="the checkpoint entry holding the state_dict (params_ema, params, state_dict, ... "
                        "are found automatically)")


def model_config(text: str | None) -> dict[str, Any]:
    """``--model-config`` as a dict (``{}`` when not given); ``CLIError`` for anything but a JSON object."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CLIError(f"--model-config: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CLIError(f"--model-config: expected a JSON object like '{{\"nf\": 24}}', got {text!r}")
    return value


def as_flags(text: str) -> str:
    """``text`` with a leading API argument name (``input_range: ...``, ``scale must ...``) given as its flag
    (``--input-range``)."""
    match = re.match(r"([a-z_]+)(?=[: ])", text)
    if match and match.group(1) in ARG_FLAGS:
        return ARG_FLAGS[match.group(1)] + text[match.end():]
    return text


def flag_error(exc: BaseException) -> str:
    """One line of ``exc``'s message, a leading API argument name given as its flag (:func:`as_flags`)."""
    return as_flags(error_line(exc))


def model_label(args: argparse.Namespace, net: Any = None) -> str:
    """What to call the network in output: the zoo name, the class name of a user's network, or the student's arch."""
    if args.model and ":" not in args.model:
        return args.model
    return str(getattr(net, "arch", None) or args.model or "model")


def open_model(args: argparse.Namespace, *, weights: bool = True, need_range: bool = True) -> Any:
    """The network the ``--model`` options of ``args`` name, weights loaded when ``--weights`` is given
    (``weights=False``: never load). ``need_range=False`` (counts): a user's network without ``--input-range``
    is built and loaded but not wrapped. Every failure is a :class:`CLIError` of one line."""
    from . import models

    path = getattr(args, "weights", None) if weights else None
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise CLIError(f"--weights: file not found: {path}")
        if not p.is_file():
            raise CLIError(f"--weights: not a file: {path}")
    if args.model is None and path is None:
        raise CLIError("--model: name the network (a zoo name, path/to/file.py:Class or package.module:factory), "
                       "or give a student written by effsr shrink as --weights")
    try:
        if not need_range and args.input_range is None and models.is_user_spec(args.model):
            net = models.build_network(args.model, model_config(args.model_config) or None)
            if path is not None:
                models.user.load_weights(net, path, key=args.weights_key)
            return net
        return models.open_model(args.model, path, config=model_config(args.model_config) or None,
                                 input_range=args.input_range, scale=args.scale, weights_key=args.weights_key)
    except models.CheckpointMismatchError as exc:
        raise CLIError(f"cannot load {path} as {args.model}: {error_line(exc)}") from exc
    except (ValueError, TypeError, KeyError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise CLIError(flag_error(exc)) from exc
