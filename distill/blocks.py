"""``block_layers``: where to distil features in a network nobody described: the outputs of its repeated blocks.

Efficient SR networks are a head, a body of repeated blocks (RFDB, RLFB, SPAB, ...) and an upsampler. The body
is found as the largest group (by parameters) of two or more sibling submodules of one class; their outputs,
at the input's resolution, are the feature distillation points. A student made from the teacher by pruning or
decomposition keeps the block names, so the points are matched by name.

>>> import torch
>>> from torch import nn
>>> class Net(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.head = nn.Conv2d(3, 8, 3, padding=1)
...         self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(3)])
...         self.tail = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.PixelShuffle(2))
...     def forward(self, x):
...         return self.tail(self.body(self.head(x)))
>>> block_layers(Net(), example=torch.zeros(1, 3, 16, 16))
['body.0', 'body.1', 'body.2']
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["block_layers"]


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


#: Generic containers: siblings of these classes are one kind of block only when built alike.
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _kind(m: nn.Module) -> Any:
    """What makes two siblings "the same block": their class; for a generic container, also the classes of
    its children (a head, a body and a tail that are all ``nn.Sequential`` are not repeated blocks)."""
    if isinstance(m, CONTAINERS):
        return (type(m), tuple(type(c) for c in m.children()))
    return type(m)


def _groups(model: nn.Module) -> list[list[str]]:
    """Every group of >= 2 sibling submodules of one kind that have parameters (dotted names, in order)."""
    out = []
    for parent_name, parent in model.named_modules():
        by_kind: dict[Any, list[str]] = {}
        for name, child in parent.named_children():
            if _n_params(child) > 0 and not isinstance(child, (nn.Conv2d, nn.Linear)):
                by_kind.setdefault(_kind(child), []).append(f"{parent_name}.{name}" if parent_name else name)
        out.extend(names for names in by_kind.values() if len(names) >= 2)
    return out


def block_layers(teacher: nn.Module, student: nn.Module | None = None, example: torch.Tensor | None = None
                 ) -> list[str]:
    """Names of ``teacher``'s repeated blocks (the largest group by parameters of >= 2 sibling submodules of
    one class (containers: built alike), plain convs excluded) that ``student`` also has; with ``example`` (an
    input batch), only those whose output is one 4-D tensor at the input's height and width. ``[]`` when there
    is none."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if student is not None and not isinstance(student, nn.Module):
        raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    modules = dict(teacher.named_modules())
    groups = _groups(teacher)
    if not groups:
        return []
    best = max(groups, key=lambda names: (sum(_n_params(modules[n]) for n in names), -names[0].count(".")))
    if student is not None:
        have = dict(student.named_modules())
        best = [n for n in best if n in have]
    if example is None or not best:
        return best
    return _at_input_resolution(teacher, best, example)


def _at_input_resolution(model: nn.Module, names: list[str], example: torch.Tensor) -> list[str]:
    shapes: dict[str, Any] = {}
    handles = []
    for n in names:
        def hook(_m: nn.Module, _i: Any, out: Any, _n: str = n) -> None:
            shapes[_n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, t in flags.items():
            m.training = t
    hw = tuple(example.shape[-2:])
    return [n for n in names if shapes.get(n) is not None and len(shapes[n]) == 4 and shapes[n][-2:] == hw]
