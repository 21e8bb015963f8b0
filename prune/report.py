"""Per-step pruning report: parameters, FLOPs (challenge convention), channels per layer, locked layers."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from reparam import RepBlock

__all__ = ["StepReport", "PruneReport", "channels_per_layer", "count_flops"]


def channels_per_layer(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d / Linear / outermost RepBlock (convs inside rep blocks omitted)."""
    out: dict[str, int] = {}

    def walk(m: nn.Module, prefix: str) -> None:
        for name, child in m.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, RepBlock):
                out[full] = child.out_channels
            elif isinstance(child, nn.Conv2d):
                out[full] = child.out_channels
            elif isinstance(child, nn.Linear):
                out[full] = child.out_features
            else:
                walk(child, full)

    walk(model, "")
    return out


def count_flops(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int | None, str]:
    """FLOPs (multiply-accumulates, NTIRE ESR convention) for one image of ``input_size``.

    Uses ``effsr.metrics.profile`` (Conv2d/Linear/activation/BN MACs); falls back to torch-pruning's
    ``count_ops_and_params`` (MACs of its supported layers) if effsr.metrics is unavailable. Returns
    ``(flops, source)``; ``(None, "not counted")`` when ``input_size`` is None.
    """
    if input_size is None:
        return None, "not counted"
    try:
        from effsr.metrics import profile
    except ImportError:  # pragma: no cover - effsr is part of this project
        profile = None
    if profile is not None:
        return int(profile(model, input_size=tuple(input_size)).flops), "effsr.metrics.profile"
    import torch_pruning as tp  # pragma: no cover
    p = next(model.parameters())  # pragma: no cover
    x = torch.zeros((1, *input_size), device=p.device, dtype=p.dtype)  # pragma: no cover
    macs, _ = tp.utils.count_ops_and_params(model, x)  # pragma: no cover
    return int(macs), "torch_pruning.utils.count_ops_and_params"  # pragma: no cover


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
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.as_dict(), indent=2, default=str))
        return p

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
