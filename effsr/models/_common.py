"""Shared pieces of the network definitions: the ``SRNet`` base class and argument validation."""
from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from reparam.base import check_int  # noqa: F401  (one integer validator for the project)

__all__ = ["SRNet", "conv3", "conv1", "check_int", "check_ratio", "check_bool"]


def conv3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    """A 3x3 conv with bias (``padding=1`` unless told): the slots ``conv=`` can turn into rep blocks."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=padding)


def conv1(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 1x1 conv with bias."""
    return nn.Conv2d(in_channels, out_channels, 1)


def check_ratio(name: str, value: Any) -> float:
    """A fraction in (0, 1), or ``TypeError``/``ValueError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} ({value!r})")
    return value


class SRNet(nn.Module):
    """Base class of the x``scale`` super-resolution networks of :mod:`effsr.models`.

    Attributes every network has: ``arch`` (its registry name), ``scale`` (upscaling factor),
    ``input_range`` (the input and output are float NCHW RGB in ``[0, input_range]``) and ``config``
    (keyword arguments such that ``effsr.models.build(arch, **config)`` rebuilds the same architecture;
    :func:`effsr.models.build` fills in ``config["conv"]``).
    """

    arch: str = ""
    input_range: ClassVar[float] = 255.0

    def __init__(self, scale: int = 4) -> None:
        super().__init__()
        self.scale = check_int("scale", scale)
        self.config: dict[str, Any] = {}

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, scale={self.scale}, input_range={self.input_range}"
