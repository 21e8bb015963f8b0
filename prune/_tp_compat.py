"""Every use of torch-pruning's internals, in one module, checked against the versions it was tested on.

``prune`` builds on torch-pruning's ``DependencyGraph`` and needs a few names and attributes that are not
its public API: the index type of its channel mappings and the unwrapped-parameter record (both in
``torch_pruning._helpers``), the base class of its layer pruners, and the graph's handler sets, module
names and pruning history. They are reached here only, so a torch-pruning release that moves them breaks
this one module -- and importing ``prune`` with a version outside :data:`SUPPORTED` fails at once with an
error naming the range, instead of deep inside a pruning step.
"""
from __future__ import annotations

from importlib import metadata
from typing import Any

import torch_pruning as tp
from packaging.version import InvalidVersion, Version

#: torch-pruning versions ``prune`` is tested with: ``>= SUPPORTED[0]`` and ``< SUPPORTED[1]``
#: (keep in step with the pin in pyproject.toml).
SUPPORTED = ("1.6", "1.7")

__all__ = ["SUPPORTED", "installed_version", "check_version", "HybridIndex", "UnwrappedParameters",
           "BasePruningFunc", "pruning_functions", "add_channel_pruning_fns", "set_module_name",
           "module_name", "reset_pruning_history"]


def installed_version() -> str:
    """The installed torch-pruning version (its distribution's, else ``torch_pruning.__version__``)."""
    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:  # pragma: no cover - e.g. a source checkout on sys.path
        return str(getattr(tp, "__version__", "0"))


def check_version(version: str | None = None) -> str:
    """Raise ``ImportError`` naming the supported range unless ``version`` (default: installed) is in it."""
    v = installed_version() if version is None else version
    lo, hi = SUPPORTED
    try:
        ok = Version(lo) <= Version(v) < Version(hi)
    except InvalidVersion:
        ok = False
    if not ok:
        raise ImportError(f"prune needs torch-pruning >={lo},<{hi} (it uses internals of that release); found "
                          f"torch-pruning {v}. Install a supported one: pip install 'torch-pruning>={lo},<{hi}'")
    return v


check_version()

from torch_pruning._helpers import UnwrappedParameters  # noqa: E402 - only after the version check
from torch_pruning._helpers import _HybridIndex as HybridIndex  # noqa: E402
from torch_pruning.pruner import function as pruning_functions  # noqa: E402
from torch_pruning.pruner.function import BasePruningFunc  # noqa: E402


def add_channel_pruning_fns(dg: tp.DependencyGraph, pruner: BasePruningFunc) -> None:
    """Make ``dg`` recognise ``pruner``'s in/out-channel functions as such (``is_*_channel_pruning_fn``)."""
    dg._in_channel_pruning_fn.add(pruner.prune_in_channels)
    dg._out_channel_pruning_fn.add(pruner.prune_out_channels)


def set_module_name(dg: tp.DependencyGraph, obj: Any, name: str) -> None:
    """Name ``obj`` (a module or a traced input tensor) ``name`` in ``dg``'s messages and history."""
    dg._module2name[obj] = name


def module_name(dg: tp.DependencyGraph, obj: Any, default: str | None = None) -> str:
    """``obj``'s name in ``dg`` (``default``, else ``str(obj)``, when it has none)."""
    return dg._module2name.get(obj, str(obj) if default is None else default)


def reset_pruning_history(dg: tp.DependencyGraph) -> None:
    """Forget the pruning steps ``dg`` recorded (so ``dg.pruning_history()`` lists only later ones)."""
    dg._pruning_history = []
