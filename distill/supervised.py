"""``Supervised``: the plain (no-teacher) training loss with the same interface as :class:`Distiller`.

It lets :func:`distill.train_steps` train a baseline for comparison, and the ``effsr shrink`` pipeline fine-tune
without a teacher, through one code path.
"""
from __future__ import annotations

from torch import Tensor, nn

from .ranges import input_range
from .losses import LossSpec, get_loss

__all__ = ["Supervised"]


class Supervised(nn.Module):
    """``forward(lr, hr) -> (loss(student(lr), hr), {"gt": loss})`` with ``lr``/``hr`` in [0, 1].

    The student gets ``lr * student.input_range`` and its output is divided by it, as in :class:`Distiller`.
    """

    def __init__(self, student: nn.Module, loss: LossSpec = "l1") -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        self.student = student
        self.student_range = input_range(student, "student")
        self.loss = get_loss(loss, "loss")
        self.unused_parameters: list[str] = []
        self.train(student.training)

    def forward(self, lr: Tensor, hr: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if hr is None:
            raise ValueError("hr is required for supervised training")
        sr = self.student(lr * self.student_range) / self.student_range
        if sr.shape != hr.shape:
            raise ValueError(f"hr has shape {tuple(hr.shape)} but the student output is {tuple(sr.shape)}")
        loss = self.loss(sr, hr)
        return loss, {"gt": loss.detach()}
