"""Helpers shared by the branch blocks: cropping the once-padded input and option checks (no fusion math
lives here, that is :mod:`reparam.kernels`; the parameter surgery behind ``load_kernel`` is in
:mod:`reparam.base`)."""
from __future__ import annotations

from torch import Tensor

from .utils.validate import check_bool  # noqa: F401 - re-exported for the blocks

__all__ = ["crop", "check_bool", "resolve_identity"]


def crop(x: Tensor, ph: int, pw: int) -> Tensor:
    """``x`` with ``ph`` rows removed at top and bottom and ``pw`` columns at left and right.

    A branch with a smaller (or 1 x k / k x 1) kernel runs unpadded on the block's padded input
    cropped by the difference of the "same" paddings, which equals running it on the input padded
    with its own "same" padding, for every padding mode.
    """
    if ph == 0 and pw == 0:
        return x
    return x[..., ph:x.shape[-2] - ph, pw:x.shape[-1] - pw]


def resolve_identity(name: str, value: bool | None, in_channels: int, out_channels: int, stride: int) -> bool:
    """The one meaning of every block's ``use_identity`` option.

    ``None``: an identity branch whenever it exists (``in == out`` and stride 1); ``True``: required
    (``ValueError`` otherwise); ``False``: none. Anything else is a ``TypeError`` naming ``name``.
    """
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None, True or False, got {value!r}")
    possible = in_channels == out_channels and stride == 1
    if value is None:
        return possible
    if value and not possible:
        raise ValueError(
            f"{name}=True needs in_channels == out_channels and stride == 1 "
            f"(got {in_channels}->{out_channels}, stride={stride})"
        )
    return value
