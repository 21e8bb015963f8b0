"""The shrink run's log: one line on stderr (above any progress bar) and in ``RUN_DIR/log.txt``."""
from __future__ import annotations

import sys
import time
from pathlib import Path

__all__ = ["log"]


def log(msg: str, main: bool = True, logfile: Path | None = None) -> None:
    """Print ``[shrink] msg`` on stderr and append it, time-stamped, to ``logfile`` (rank 0 only: ``main``)."""
    if not main:
        return
    from reparam.utils.progress import write

    write(f"[shrink] {msg}", file=sys.stderr)
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
