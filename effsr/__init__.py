"""effsr: efficient super-resolution toolkit.

Submodules are imported on demand, e.g. ``from effsr.quality import psnr`` or
``from effsr.data import open_dataset``; ``import effsr`` alone loads none of them.
"""
from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("cli", "cli_core", "cli_model", "data", "export", "imresize", "inference", "metrics", "models",
               "quality", "shrink", "train")


def __getattr__(name: str) -> Any:
    """``effsr.models`` and the other submodules after a bare ``import effsr``, imported on first use."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
