"""Run numpy's small LAPACK calls single-threaded.

The Tucker factors come from many SVDs of small matrices (e.g. 50 x 450). OpenBLAS parallelises them over all
cores, which gains nothing at this size and, on a loaded machine, costs up to ~100x (threads spin waiting for
each other: 0.13 s instead of 5 ms per SVD, measured on a shared 2-core box). :func:`single_threaded_blas`
sets the OpenBLAS that numpy loaded to one thread for the duration of the call and restores the previous
count (the same ``openblas_set_num_threads`` call that threadpoolctl makes). It is a no-op when numpy does not use
OpenBLAS or the library cannot be found (non-Linux), and its effect is process-wide while it is active.
"""
from __future__ import annotations

import ctypes
import functools
from contextlib import contextmanager
from typing import Iterator

__all__ = ["single_threaded_blas"]

_SYMBOLS = (  # (setter, getter) for the OpenBLAS builds numpy wheels ship, then a plain OpenBLAS
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


@functools.lru_cache(maxsize=1)
def _openblas() -> tuple | None:
    import numpy  # noqa: F401  (make sure numpy's BLAS is loaded before looking for it)

    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({line.split()[-1] for line in fh if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                getter.restype = ctypes.c_int
                setter.argtypes = [ctypes.c_int]
                return setter, getter
    return None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit numpy's OpenBLAS to one thread inside the block (no-op where it cannot be found)."""
    funcs = _openblas()
    if funcs is None:
        yield
        return
    setter, getter = funcs
    previous = int(getter())
    setter(1)
    try:
        yield
    finally:
        setter(max(1, previous))
