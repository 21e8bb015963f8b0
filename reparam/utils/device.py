"""Devices and dtypes of models, and turning a user's device name into a :class:`torch.device`."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["resolve_device", "model_device", "model_dtype"]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None,
                   arg: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device`, checked to exist on this machine.

    ``"auto"``: CUDA when available, else the CPU; ``None``: the device of ``model`` (the CPU without
    one). Raises ``ValueError`` naming ``arg`` for a name torch does not know, or CUDA where there is none.
    """
    if device is None:
        return model_device(model) if model is not None else torch.device("cpu")
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{arg} must be a device name or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{arg}: unknown device {str(device)!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{arg} {device}: CUDA is not available on this machine")
    return dev
