"""The command registry of the ``effsr`` CLI (:class:`CLIError`, :func:`command`, :data:`COMMANDS`) and the
helpers every command shares (output checks, :class:`StagedDir`, :func:`write_json_atomic`, :func:`open_data`).

Command modules (``effsr.cli``'s own, ``effsr.shrink.commands``, ``effsr.export.cli``, ...) import only this
module (and :mod:`effsr.cli_model`), and ``effsr.cli`` imports them to build its parser, so the dependencies
point one way: ``effsr.cli -> command modules -> effsr.cli_core``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["ArgumentParser", "CLIError", "Command", "COMMANDS", "command", "error_line", "HelpFormatter", "model_help",
           "write_json_atomic", "check_output_file", "check_output_dir", "open_data", "StagedDir"]


class CLIError(Exception):
    """An error caused by the user's input: reported as one line on stderr, exit code 2."""


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]
            ) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register ``run(args) -> exit code`` as the subcommand ``name`` with the given argument adder."""
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"name: command {name!r} is already registered")
        COMMANDS[name] = Command(name, help, arguments, run)
        return run
    return register


_HINT = re.compile(r"the checkpoint (looks like the official|fits the default) '([A-Za-z0-9_]+)'")


def error_line(exc: BaseException, limit: int = 600) -> str:
    """The message of ``exc`` as one line of at most ``limit`` characters, the actionable part first.

    ``effsr.models.load`` ends a mismatch message with "the checkpoint looks like the official 'rfdn'
    network"; the key listings before it are long, so that hint is moved to the front (as "try --model
    rfdn") and only the listings may be cut.
    """
    text = str(exc)
    lines = [part.strip() for part in text.splitlines() if part.strip()]
    match = _HINT.search(text)
    if match is not None:
        kind, guess = match.groups()
        hint = (f"it looks like the official {guess!r} network (try --model {guess})" if kind.startswith("looks")
                else f"it fits the default {guess!r} architecture")
        lines = [part for part in lines if match.group(0) not in part]
        arg = re.match(r"--[\w-]+: ", lines[0]) if lines else None  # "--weights: ..." keeps naming its argument
        head = arg.group(0) if arg else ""
        lines = [head + hint + ";"] + ([lines[0][len(head):]] + lines[1:] if lines else [])
    text = " ".join(lines) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (a missing or malformed option) are one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default: ``(default: X)`` is appended unless the text already says it.

    Flags (``store_true``) need none; an option without a default reads ``(default: not set)``.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if text == argparse.SUPPRESS or "default" in text or not action.option_strings:
            return text
        if action.nargs == 0 or action.required:
            return text
        sep = " " if text else ""
        return text + sep + ("(default: not set)" if action.default is None else "(default: %(default)s)")


def model_help(what: str = "network name") -> str:
    """``--model`` help listing the valid names (read from :mod:`effsr.models`)."""
    from effsr import models

    return f"{what}: one of {', '.join(models.names())}"


# ------------------------------------------------------------------------------------------ utilities
def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`reparam.utils.io.write_json`, umask respected)."""
    from reparam.utils.io import write_json

    return write_json(path, obj, default=None)


def check_output_file(path: str | None, what: str) -> None:
    """Fail before any work when ``path`` cannot become a file."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"{what} {path} is a directory, expected a file path")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CLIError(f"{what} {path}: {parent} is not a directory")
            if not os.access(parent, os.W_OK):
                raise CLIError(f"{what} {path}: {parent} is not writable")
            break


def check_output_dir(path: str | None, what: str) -> None:
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{what} {path} exists and is not a directory")
    check_output_file(str(p / "x"), what)


def open_data(spec: str, scale: int) -> Any:
    from effsr import data

    if spec != "default":
        p = Path(spec)
        if not p.exists():
            raise CLIError(f"data not found: {spec}")
        if not p.is_dir():
            raise CLIError(f"data must be a directory (HR/ [+ LR_bicubic/X{scale}/]) or 'default': {spec}")
    try:
        pairs = data.open_dataset(spec, scale=scale)
    except (ValueError, OSError, KeyError) as exc:
        raise CLIError(f"cannot open data {spec}: {error_line(exc)}") from exc
    if len(pairs) == 0:
        raise CLIError(f"no images found in {spec}")
    return pairs


class StagedDir:
    """A hidden staging folder next to ``target``; :meth:`commit` moves its files into ``target``."""

    def __init__(self, target: str | None) -> None:
        self.target = Path(target) if target else None
        self.path: Path | None = None

    def __enter__(self) -> StagedDir:
        if self.target is not None:
            # Stage in the nearest existing ancestor (same file system, so os.replace works) and
            # create nothing else until commit().
            parent = self.target.resolve().parent
            while not parent.exists():
                parent = parent.parent
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=parent))
        return self

    def commit(self) -> None:
        if self.target is None or self.path is None:
            return
        self.target.mkdir(parents=True, exist_ok=True)
        for f in sorted(self.path.iterdir()):
            os.replace(f, self.target / f.name)

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
