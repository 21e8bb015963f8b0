"""``FeatureHooks``: capture the outputs (or inputs) of named submodules during a forward pass.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
>>> with FeatureHooks(net, ["0", "2"]) as hooks:
...     _ = net(torch.zeros(1, 3, 8, 8))
...     hooks["0"].shape
torch.Size([1, 8, 8, 8])
>>> len(net[0]._forward_hooks)   # removed on exit
0
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureHooks", "resolve_module"]

CAPTURES = ("output", "input")


def resolve_module(model: nn.Module, name: str, argname: str = "names") -> nn.Module:
    """``model``'s submodule called ``name`` (dotted, as in ``named_modules()``; ``""`` is the model itself).

    Raises ``KeyError`` listing the closest existing names when there is no such module.
    """
    if not isinstance(name, str):
        raise TypeError(f"{argname}: module names must be str, got {type(name).__name__}")
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"; close matches: {close}" if close else f"; the model has {len(modules) - 1} named submodules"
    raise KeyError(f"{argname}: no module named {name!r} in {type(model).__name__}{hint}")


class FeatureHooks:
    """Forward hooks on ``model``'s submodules ``names``; after a forward, ``hooks[name]`` is that module's output.

    ``capture="input"`` stores the first positional input instead. Features keep their autograd graph unless
    ``detach=True``. Use as a context manager or call :meth:`close`, which removes every hook it registered
    (idempotent). A name that is not a submodule raises ``KeyError`` with close matches. A name repeated in
    ``names`` is hooked once.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], capture: str = "output", detach: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(names, str):
            raise TypeError("names must be a list of module names, not a single str (wrap it in a list)")
        if capture not in CAPTURES:
            raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
        self.names: list[str] = list(dict.fromkeys(names))
        if not self.names:
            raise ValueError("names must name at least one module")
        modules = [resolve_module(model, n) for n in self.names]  # validate all before registering any
        self.capture = capture
        self.detach = bool(detach)
        self.features: dict[str, Any] = {}
        self._handles: list[RemovableHandle] = []
        for name, module in zip(self.names, modules):
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            value = output if self.capture == "output" else (args[0] if args else None)
            if self.detach and isinstance(value, Tensor):
                value = value.detach()
            self.features[name] = value
        return hook

    # ------------------------------------------------------------------ access
    def __getitem__(self, name: str) -> Any:
        if name not in self.features:
            if name in self.names:
                raise KeyError(f"no feature captured for {name!r} yet (run a forward pass first)")
            raise KeyError(f"{name!r} is not hooked; hooked names: {self.names}")
        return self.features[name]

    def __contains__(self, name: object) -> bool:
        return name in self.features

    def clear(self) -> None:
        """Forget captured features (frees their memory/graphs)."""
        self.features.clear()

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    # --------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Remove every hook and drop captured features."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.features.clear()

    def __enter__(self) -> "FeatureHooks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; explicit close() is the contract
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"FeatureHooks(names={self.names}, capture={self.capture!r}, active={self.active})"
