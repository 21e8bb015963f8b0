"""The command registry of the ``effsr`` CLI: :class:`CLIError`, :func:`command`, :data:`COMMANDS`.

Command modules (``effsr.cli``'s own, ``effsr.shrink.commands``, ...) import only this module, and
``effsr.cli`` imports them to build its parser, so the dependencies point one way:
``effsr.cli -> command modules -> effsr.cli_core``.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

__all__ = ["CLIError", "Command", "COMMANDS", "command"]


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
