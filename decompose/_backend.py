"""A tensorly backend scope that never changes the user's (global or per-thread) backend.

Why not ``tensorly.backend_context``? In tensorly 0.10 it restores the previous backend with
``set_backend(old)``, i.e. *globally*, even when entered with ``local_threadsafe=True``: a user who had
set a backend only for their own thread would find it promoted to the process-wide default afterwards.
:func:`numpy_backend` sets the numpy backend for the calling thread only and restores that thread's
exact previous state (including "no thread-local backend"), so neither the global default nor other
threads ever see a change.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import tensorly as tl

__all__ = ["numpy_backend"]


@contextmanager
def numpy_backend() -> Iterator[None]:
    """Run the body with tensorly's numpy backend for this thread only; restore the previous state."""
    manager = sys.modules.get("tensorly.backend")
    local = getattr(manager, "_THREAD_LOCAL_DATA", None)
    if local is None:  # a tensorly without per-thread backends: fall back to its own context manager
        with tl.backend_context("numpy"):
            yield
        return
    missing = object()
    previous = local.__dict__.get("backend", missing)
    tl.set_backend("numpy", local_threadsafe=True)
    try:
        yield
    finally:
        if previous is missing:
            local.__dict__.pop("backend", None)
        else:
            local.backend = previous
