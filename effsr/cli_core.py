"""The command registry of the ``effsr`` CLI: :class:`CLIError`, :func:`command`, :data:`COMMANDS`.

Command modules (``effsr.cli``'s own, ``effsr.shrink.commands``, ...) import only this module, and
``effsr.cli`` imports them to build its parser, so the dependencies point one way:
``effsr.cli -> command modules -> effsr.cli_core``.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import NoReturn
from collections.abc import Callable

__all__ = ["ArgumentParser", "CLIError", "Command", "COMMANDS", "command", "error_line", "HelpFormatter", "model_help"]


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
