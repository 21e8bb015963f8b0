"""Progress reporting for long jobs: a tqdm bar on a terminal, occasional plain lines otherwise.

Every long loop of the project (training steps, pruning rounds, Tucker layers, evaluation) reports through
:func:`progress`. On a terminal it is a normal :mod:`tqdm` bar. When the stream is not a terminal (a log
file, CI, ``2> log.txt``) a redrawn bar would fill the file with carriage returns, so it prints a plain line
instead -- at the start, every ``every_percent`` percent or ``every_seconds`` seconds (whichever comes
first), and at the end::

    teacher training: 120/800 (15%) 34.2 s, loss=0.0412

``EFFSR_PROGRESS=plain`` forces plain lines, ``EFFSR_PROGRESS=bar`` forces the bar, ``EFFSR_PROGRESS=off``
hides both. :func:`write` prints a message without breaking a bar. Nothing here imports the project's
other packages.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

__all__ = ["progress", "write", "PlainProgress", "ENV"]

#: Environment variable overriding the choice: ``plain``, ``bar`` or ``off``.
ENV = "EFFSR_PROGRESS"


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or unusual stream
        return False


def _mode(stream: IO[str]) -> str:
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("plain", "bar", "off"):
        return forced
    return "bar" if _is_tty(stream) else "plain"


class PlainProgress:
    """The subset of tqdm's interface the project uses, printing occasional plain lines."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, file: IO[str] | None = None, disable: bool = False,
                 every_percent: float = 10.0, every_seconds: float = 30.0) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = int(initial)
        self.file = file
        self.disable = disable
        self.every_percent = float(every_percent)
        self.every_seconds = float(every_seconds)
        self.postfix: dict[str, Any] = {}
        self._t0 = time.monotonic()
        self._last_time = self._t0
        self._last_pct = -1.0
        self._closed = False
        self.lines = 0  #: plain lines printed so far
        self._emit()

    # -- tqdm-compatible API
    def update(self, n: int = 1) -> None:
        self.n += int(n)
        self._maybe_emit()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = {"": s} if s else {}

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._last_emitted != self.n:
            self._emit()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("PlainProgress: no iterable to iterate over")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- output
    _last_emitted: int = -1

    def _stream(self) -> IO[str]:
        return self.file if self.file is not None else sys.stderr

    def _line(self) -> str:
        elapsed = time.monotonic() - self._t0
        if self.total:
            head = f"{self.n}/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
        else:
            head = f"{self.n} {self.unit}"
        post = ", ".join(f"{k}={v}" if k else str(v) for k, v in self.postfix.items())
        return f"{self.desc + ': ' if self.desc else ''}{head} {elapsed:.1f} s" + (f", {post}" if post else "")

    def _emit(self) -> None:
        self._last_time = time.monotonic()
        self._last_emitted = self.n
        if self.total:
            self._last_pct = 100.0 * self.n / self.total
        if self.disable:
            return
        stream = self._stream()
        print(self._line(), file=stream)
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass
        self.lines += 1

    def _maybe_emit(self) -> None:
        now = time.monotonic()
        due_time = now - self._last_time >= self.every_seconds
        due_pct = bool(self.total) and 100.0 * self.n / self.total - self._last_pct >= self.every_percent
        done = bool(self.total) and self.n >= self.total
        if due_time or due_pct or done:
            self._emit()


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, leave: bool = True, file: IO[str] | None = None,
             every_percent: float = 10.0, every_seconds: float = 30.0) -> Any:
    """A progress reporter over ``iterable`` (or ``total`` steps, advanced with ``.update(n)``) named ``desc``.

    A :mod:`tqdm` bar when ``file`` (default ``sys.stderr``) is a terminal, else a :class:`PlainProgress`
    that prints a line every ``every_percent`` % or ``every_seconds`` s. ``disable=True`` shows nothing.
    Both support ``update``, ``set_postfix``, ``set_postfix_str``, ``set_description``, ``close``, iteration
    and ``with``.
    """
    stream = file if file is not None else sys.stderr
    mode = "off" if disable else _mode(stream)
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=stream,
                    dynamic_ncols=True)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream,
                         disable=mode == "off", every_percent=every_percent, every_seconds=every_seconds)


def write(msg: str, file: IO[str] | None = None) -> None:
    """Print ``msg`` on its own line (``file`` default ``sys.stderr``) without breaking a tqdm bar."""
    stream = file if file is not None else sys.stderr
    if _mode(stream) == "bar":
        from tqdm.auto import tqdm

        tqdm.write(msg, file=stream)
    else:
        print(msg, file=stream)
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass
