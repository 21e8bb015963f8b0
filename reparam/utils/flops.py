"""A module-level multiply-accumulate (MAC) counter with its counting convention as a parameter.

:func:`count_macs` runs a model once with forward hooks on the module types a :class:`MacConvention`
names and adds up, per forward call (a module that runs twice counts twice):

* convs (``nn.Conv2d`` / ``nn.ConvTranspose2d`` by default): ``prod(kernel) * in * out / groups`` per
  output position (no bias term; a transposed conv per *output* position); their output elements are the
  "activations" and their calls the "convs";
* linears: ``in_features`` per output element;
* activations: one per output element;
* norms: ``num_features`` per position, two when affine.

Functional calls (``F.conv2d``, ``torch.sigmoid``, additions, pooling, pixel shuffle) are invisible to
hooks and not counted. ``aten_flops`` is PyTorch's own :class:`~torch.utils.flop_counter.FlopCounterMode`
count (2 per MAC of matmul/conv ops, nothing for element-wise ops), an independent second opinion.

:func:`profile_macs` counts for one image of a given size: on a copy of the model on the ``meta`` device
(shapes only, milliseconds), or for real when the model cannot run there. ``effsr.metrics`` configures
this counter with the NTIRE challenge's convention.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import nn

from .device import model_dtype

__all__ = ["MacConvention", "MacCount", "DEFAULT_CONVENTION", "count_macs", "profile_macs", "check_input_size"]


@dataclasses.dataclass(frozen=True)
class MacConvention:
    """Which module types are counted, and as what (see the module docstring)."""

    convs: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.ConvTranspose2d)
    linears: tuple[type[nn.Module], ...] = (nn.Linear,)
    activations: tuple[type[nn.Module], ...] = (nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6)
    norms: tuple[type[nn.Module], ...] = (nn.BatchNorm2d,)
    #: composite modules counted as the one conv they stand for (``in_channels``, ``out_channels``,
    #: ``kernel_size``, ``groups`` attributes, e.g. rep blocks as their fused conv); nothing inside is counted
    blocks: tuple[type[nn.Module], ...] = ()


#: Conv/Linear/ReLU-family/BatchNorm2d: the convention of the NTIRE/AIM efficient-SR counter.
DEFAULT_CONVENTION = MacConvention()


@dataclasses.dataclass(frozen=True)
class MacCount:
    """What one forward pass counted."""

    macs: int
    activations: int
    convs: int
    aten_flops: int


class _Hooks:
    def __init__(self, convention: MacConvention) -> None:
        self.convention = convention
        self.macs = 0
        self.activations = 0
        self.convs = 0
        self.handles: list[Any] = []

    def attach(self, model: nn.Module) -> None:
        c = self.convention
        inside = {id(m) for b in model.modules() if c.blocks and isinstance(b, c.blocks)
                  for m in b.modules() if m is not b}
        for module in model.modules():
            if id(module) in inside:
                continue
            if c.blocks and isinstance(module, c.blocks):
                self.handles.append(module.register_forward_hook(self.conv))
            elif isinstance(module, c.convs):
                self.handles.append(module.register_forward_hook(self.conv))
            elif isinstance(module, c.activations):
                self.handles.append(module.register_forward_hook(self.elementwise))
            elif isinstance(module, c.linears):
                self.handles.append(module.register_forward_hook(self.linear))
            elif isinstance(module, c.norms):
                self.handles.append(module.register_forward_hook(self.norm))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def conv(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        k = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 2
        groups = getattr(module, "groups", 1)
        per_position = math.prod(k) * module.in_channels * (module.out_channels // groups)
        positions = output.shape[0] * math.prod(output.shape[2:])
        self.macs += int(per_position) * int(positions)
        self.activations += output.numel()
        self.convs += 1

    def elementwise(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.macs += output.numel()

    def linear(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.macs += module.in_features * output.numel()

    def norm(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        positions = output.shape[0] * math.prod(output.shape[2:])
        self.macs += module.num_features * int(positions) * (2 if getattr(module, "affine", False) else 1)


def count_macs(model: nn.Module, *inputs: Any, convention: MacConvention = DEFAULT_CONVENTION) -> MacCount:
    """Run ``model(*inputs)`` once without gradients and count it under ``convention``.

    The model's train/eval state is not changed (put it in eval mode first if that matters).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(convention, MacConvention):
        raise TypeError(f"convention must be a MacConvention, got {type(convention).__name__}")
    hooks = _Hooks(convention)
    hooks.attach(model)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as mode:
            model(*inputs)
    finally:
        hooks.detach()
    return MacCount(macs=hooks.macs, activations=hooks.activations, convs=hooks.convs,
                    aten_flops=int(mode.get_total_flops()))


def check_input_size(input_size: Any, arg: str = "input_size") -> tuple[int, ...]:
    """``input_size`` as a tuple of three positive ints ``(C, H, W)``; ``ValueError`` naming ``arg`` else."""
    try:
        size = tuple(input_size)
    except TypeError:
        raise ValueError(f"{arg} must be a sequence (C, H, W), got {input_size!r}") from None
    if len(size) != 3 or any(isinstance(v, bool) or not hasattr(v, "__index__") or int(v) < 1 for v in size):
        raise ValueError(f"{arg} must be three positive ints (C, H, W), got {input_size!r}")
    return tuple(int(v) for v in size)


def profile_macs(model: nn.Module, input_size: Sequence[int], *, convention: MacConvention = DEFAULT_CONVENTION,
                 use_meta: bool = True, scale: float = 1.0) -> MacCount:
    """:func:`count_macs` for one image of ``input_size`` (``C, H, W``), the model left untouched.

    With ``use_meta`` the pass runs on a copy of the model on the ``meta`` device; a model that cannot
    run there is run for real, in eval mode, on its own device with a fixed random input in
    ``[0, scale]`` (its own train/eval state restored afterwards).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = check_input_size(input_size)
    dtype = model_dtype(model)
    if use_meta:
        try:
            meta = copy.deepcopy(model).to("meta").eval()
            return count_macs(meta, torch.empty((1, *size), device="meta", dtype=dtype), convention=convention)
        except Exception:  # noqa: BLE001 - any failure on meta means "run it for real"
            pass
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.rand((1, *size), generator=torch.Generator().manual_seed(0)) * scale
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return count_macs(model, x.to(device=device, dtype=dtype), convention=convention)
    finally:
        for m, flag in states:
            m.training = flag

