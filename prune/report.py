"""Per-step pruning report: parameters, FLOPs (challenge convention), channels per layer, locked layers."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Tuple

from torch import nn

from reparam import RepBlock
from reparam.utils.flops import profile_macs
from reparam.utils.io import write_json
from reparam.utils.modules import outermost

__all__ = ["StepReport", "PruneReport", "channels_per_layer", "count_flops", "FlopsFn"]


def channels_per_layer(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d / Linear / outermost RepBlock (convs inside rep blocks omitted)."""
    out: dict[str, int] = {}
    for name, m in outermost(model, lambda m: isinstance(m, (RepBlock, nn.Conv2d, nn.Linear))):
        if name:
            out[name] = m.out_features if isinstance(m, nn.Linear) else m.out_channels
    return out


#: ``flops_fn(model, input_size) -> int``: FLOPs of ``model`` for one image of ``input_size`` (C, H, W).
FlopsFn = Callable[[nn.Module, Tuple[int, ...]], int]


def count_flops(model: nn.Module, input_size: Sequence[int] | None,
                flops_fn: FlopsFn | None = None) -> tuple[int | None, str]:
    """FLOPs of ``model`` for one image of ``input_size``; returns ``(flops, source)``.

    ``flops_fn(model, input_size)`` counts them (e.g. ``lambda m, s: effsr.metrics.profile(m, s).flops``);
    by default :func:`reparam.utils.flops.profile_macs` with its default convention: multiply-accumulates
    of Conv2d/ConvTranspose2d/Linear modules plus one per ReLU-family activation output and BatchNorm2d
    (the NTIRE efficient-SR counter's convention). ``(None, "not counted")`` when ``input_size`` is None.
    """
    if input_size is None:
        return None, "not counted"
    size = tuple(int(v) for v in input_size)
    if flops_fn is None:
        return int(profile_macs(model, size).macs), "reparam.utils.flops.profile_macs (module MACs)"
    if not callable(flops_fn):
        raise TypeError(f"flops_fn must be a callable (model, input_size) -> int, got {type(flops_fn).__name__}")
    name = getattr(flops_fn, "__qualname__", type(flops_fn).__name__)
    return int(flops_fn(model, size)), f"{getattr(flops_fn, '__module__', '?')}.{name}"


@dataclass
class StepReport:
    """State after one pruning step (step 0 is the unpruned model)."""

    step: int
    target_ratio: float
    params: int
    flops: int | None
    removed_filters: int
    prunable_filters: int
    channels: dict[str, int]
    finetune: Any = None

    @property
    def removed_fraction(self) -> float:
        return self.removed_filters / self.prunable_filters if self.prunable_filters else 0.0


@dataclass
class PruneReport:
    """What :func:`prune.l2_filter_prune` did, step by step.

    ``locked`` maps a group (named by its root layer) to the reason it was not pruned: it feeds the
    network output (e.g. the conv before the final PixelShuffle), it is coupled to the input, it touches
    a module without a pruner, it is in ``ignored_layers``, ...
    """

    ratio: float
    steps: int
    schedule: list[float]
    flops_input_size: tuple[int, ...] | None
    flops_source: str
    importance: str
    groups: dict[str, int] = field(default_factory=dict)
    locked: dict[str, str] = field(default_factory=dict)
    history: list[StepReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for s, h in zip(d["history"], self.history):
            s["removed_fraction"] = h.removed_fraction
        return d

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON."""
        return write_json(path, self.as_dict(), default=str)

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [f"L2 filter pruning, ratio={self.ratio}, steps={self.steps} "
                 f"(FLOPs: {self.flops_source} at {self.flops_input_size})"]
        for h in self.history:
            fl = "n/a" if h.flops is None else f"{h.flops / 1e9:.3f} G"
            lines.append(f"  step {h.step}: params {h.params:,}  FLOPs {fl}  removed "
                         f"{h.removed_filters}/{h.prunable_filters} filters ({h.removed_fraction:.1%})")
        for name, why in self.locked.items():
            lines.append(f"  not pruned: {name}: {why}")
        return "\n".join(lines)
