"""``Distiller``: multi-level feature + output knowledge distillation for SR networks (DIPNet-style).

The loss, for pairs ``(teacher_name, student_name, weight)``::

    loss = sum_i weight_i * feature_loss(adapter_i(F_S[student_name_i]), F_T[teacher_name_i])
         + output_weight * output_loss(S(lr), T(lr))        # teacher output as pseudo ground truth
         + gt_weight     * gt_loss(S(lr), hr)               # real ground truth (needs hr)

Ranges: ``lr``/``hr`` are float tensors in [0, 1]. Each network gets ``lr * distill.input_range(net)``
(its ``input_range``, 1.0 when it declares none) and its output is divided by the same factor, so outputs are
compared in [0, 1] whatever range each model was trained in (e.g. an IMDN teacher in 0-1 with an RFDN student in
0-255). Features are compared in the units the networks produce them in: the adapter maps student features to
teacher features, scale included.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import Tensor, nn

from reparam.utils.device import model_device

from .hooks import CAPTURES, FeatureHooks
from .losses import LossSpec, get_loss
from .ranges import input_range

__all__ = ["Distiller", "Pair", "make_adapter", "ADAPTERS"]

Pair = tuple[str, str, float]
AdapterSpec = Union[str, Callable[[int, int], nn.Module]]
ADAPTERS = ("conv1x1", "identity")


def make_adapter(spec: AdapterSpec, student_channels: int, teacher_channels: int) -> nn.Module:
    """The module mapping a student feature (``student_channels``) to the teacher's (``teacher_channels``)."""
    if spec == "conv1x1":
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=True)
    if spec == "identity":
        if student_channels != teacher_channels:
            raise ValueError(
                f"adapter='identity' needs equal channels, got student {student_channels} "
                f"vs teacher {teacher_channels}; "
                "use adapter='conv1x1'"
            )
        return nn.Identity()
    if isinstance(spec, str):
        raise ValueError(f"adapter must be one of {ADAPTERS} or a callable(student_ch, teacher_ch), got {spec!r}")
    if callable(spec):
        module = spec(student_channels, teacher_channels)
        if not isinstance(module, nn.Module):
            raise TypeError(f"adapter callable must return an nn.Module, got {type(module).__name__}")
        return module
    raise TypeError(f"adapter must be a name in {ADAPTERS} or a callable, got {type(spec).__name__}")


def _check_weight(name: str, value: object, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _check_pairs(pairs: Iterable[Sequence[object]]) -> list[Pair]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError("pairs must be a list of (teacher_name, student_name, weight) tuples")
    out: list[Pair] = []
    for i, p in enumerate(pairs):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or len(p) != 3:
            raise TypeError(f"pairs[{i}] must be a (teacher_name, student_name, weight) tuple, got {p!r}")
        t, s, w = p
        if not isinstance(t, str) or not isinstance(s, str):
            raise TypeError(f"pairs[{i}]: module names must be str, got {type(t).__name__} and {type(s).__name__}")
        out.append((t, s, _check_weight(f"pairs[{i}] weight", w, positive=True)))
    return out


class Distiller(nn.Module):
    """Teacher -> student distillation loss as a module; ``forward(lr, hr=None) -> (loss, parts)``.

    Args:
        teacher: the trained network. It is frozen (``requires_grad=False``, kept in eval mode even when the
            Distiller is put in training mode, run under ``torch.no_grad``) and *not registered* as a submodule:
            ``parameters()``, ``state_dict()`` and DDP see only the student and the adapters. ``.to()`` /
            ``.cuda()`` / ``.double()`` on the Distiller move it too. :meth:`close` restores its flags.
        student: the network being trained (trained in place; its hooks are removed by :meth:`close`).
        pairs: ``[(teacher_name, student_name, weight), ...]`` -- dotted module names (``named_modules()``) whose
            outputs (or inputs, ``capture="input"``) are matched; ``weight > 0`` is the per-level lambda_i.
        adapter: ``"conv1x1"`` (trainable 1x1 conv student->teacher channels, DIPNet's psi), ``"identity"`` (equal
            channels only) or ``callable(student_channels, teacher_channels) -> nn.Module``. Channel counts come
            from a dry run on a ``probe_size`` input at construction.
        feature_loss / output_loss / gt_loss: loss specs for :func:`distill.losses.get_loss` (``"l1"``, ``"l2"``,
            ``"charbonnier"``, ``"fft"``, ``"wavelet"``, sums like ``"l1+0.1*fft"``, modules or callables).
        output_weight: weight of the teacher-output (pseudo ground truth) term, >= 0.
        gt_weight: weight of the ground-truth term, >= 0; ``forward`` then needs ``hr``.

    ``parts`` maps ``"feat{i}:{student_name}"``, ``"out"`` and ``"gt"`` to the detached *weighted* terms; they sum to
    ``loss``. ``unused_parameters`` lists student parameters that get no gradient from this loss (found in the dry
    run; e.g. the upsampler when only features are distilled) -- :func:`distill.ddp.wrap` then turns on
    ``find_unused_parameters``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        pairs: Iterable[Sequence[object]] = (),
        adapter: AdapterSpec = "conv1x1",
        feature_loss: LossSpec = "l1",
        output_weight: float = 1.0,
        gt_weight: float = 0.0,
        output_loss: LossSpec = "l1",
        gt_loss: LossSpec = "l1",
        capture: str = "output",
        probe_size: tuple[int, int, int] = (3, 32, 32),
    ) -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if teacher is student:
            raise ValueError("teacher and student must be different modules")
        if capture not in CAPTURES:
            raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
        if (not isinstance(probe_size, (tuple, list)) or len(probe_size) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in probe_size)):
            raise ValueError(f"probe_size must be a (C, H, W) tuple of positive ints, got {probe_size!r}")
        self.pairs: list[Pair] = _check_pairs(pairs)
        self.output_weight = _check_weight("output_weight", output_weight, positive=False)
        self.gt_weight = _check_weight("gt_weight", gt_weight, positive=False)
        if not self.pairs and self.output_weight == 0 and self.gt_weight == 0:
            raise ValueError("nothing to optimize: give pairs, or output_weight > 0, or gt_weight > 0")
        if model_device(teacher) != model_device(student):
            raise ValueError(
                f"teacher is on {model_device(teacher)} but student on {model_device(student)}; "
                "move both (or the Distiller) first"
            )
        self.teacher_range = input_range(teacher, "teacher")
        self.student_range = input_range(student, "student")
        self.capture = capture

        self.student = student
        self.feature_loss = get_loss(feature_loss, "feature_loss")
        self.output_loss = get_loss(output_loss, "output_loss")
        self.gt_loss = get_loss(gt_loss, "gt_loss")

        # Teacher: outside the module registry (a tuple), frozen; remember what to restore in close().
        self._teacher_box = (teacher,)
        self._teacher_state = (teacher.training, [p.requires_grad for p in teacher.parameters()])
        teacher.requires_grad_(False)
        teacher.eval()

        self._t_hooks: FeatureHooks | None = None
        self._s_hooks: FeatureHooks | None = None
        self._closed = False
        self.adapters = nn.ModuleList()
        self.unused_parameters: list[str] = []
        try:
            if self.pairs:
                self._t_hooks = FeatureHooks(teacher, [t for t, _, _ in self.pairs], capture, detach=True)
                self._s_hooks = FeatureHooks(student, [s for _, s, _ in self.pairs], capture)
            self._dry_run(adapter, probe_size)
        except Exception:
            self.close()
            raise
        self.train(student.training)

    # ---------------------------------------------------------------- teacher
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a registered submodule)."""
        return self._teacher_box[0]

    def train(self, mode: bool = True) -> "Distiller":
        """Set the student/adapters' mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .double(), ... also move the teacher
        if recurse:
            self.teacher._apply(fn)
        return super()._apply(fn, recurse)

    def _restore_teacher(self) -> None:
        training, flags = self._teacher_state
        for p, flag in zip(self.teacher.parameters(), flags):
            p.requires_grad_(flag)
        self.teacher.train(training)

    # ---------------------------------------------------------------- dry run
    def _dry_run(self, adapter: AdapterSpec, probe_size: tuple[int, int, int]) -> None:
        """Find feature channels, build adapters, check shapes, and find student parameters without gradient."""
        device = model_device(self.student)
        dtype = next((p.dtype for p in self.student.parameters() if p.is_floating_point()), torch.float32)
        x = torch.rand(1, *probe_size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
        was_training = self.student.training
        self.student.eval()  # no BatchNorm statistics updates from the probe
        try:
            t_out, s_out, t_feats, s_feats = self._run(x)
            if t_out.shape != s_out.shape:
                raise ValueError(
                    f"teacher and student outputs differ in shape: {tuple(t_out.shape)} vs {tuple(s_out.shape)}"
                )
            for i, ((t_name, s_name, _), tf, sf) in enumerate(zip(self.pairs, t_feats, s_feats)):
                module = make_adapter(adapter, int(sf.shape[1]), int(tf.shape[1])).to(device=device, dtype=dtype)
                self.adapters.append(module)
                mapped = module(sf)
                if mapped.shape != tf.shape:
                    raise ValueError(
                        f"pairs[{i}]: student feature {s_name!r} {tuple(sf.shape)} maps to {tuple(mapped.shape)} but "
                        f"teacher feature {t_name!r} is {tuple(tf.shape)} (spatial sizes must match)"
                    )
            total = self._combine(t_out, s_out, t_feats, s_feats, None, probe=True)[0]
            named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
            if not named:
                raise ValueError("student has no parameters that require grad")
            grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
            self.unused_parameters = [n for (n, _), g in zip(named, grads) if g is None]
        finally:
            self.student.train(was_training)
            self._clear()

    def _features(self, hooks: FeatureHooks | None, which: str) -> list[Tensor]:
        if hooks is None:
            return []
        feats = []
        for i, name in enumerate(hooks.names):
            if name not in hooks:
                raise RuntimeError(
                    f"{which} module {name!r} did not run in the forward pass (an FX GraphModule calls only leaf "
                    "modules: hook a leaf such as its last conv/activation instead of a container)"
                )
            f = hooks[name]
            if not isinstance(f, Tensor) or f.dim() < 2:
                raise TypeError(f"{which} feature {name!r} must be a tensor with a channel dim (N, C, ...), got "
                                f"{type(f).__name__ if not isinstance(f, Tensor) else tuple(f.shape)}")
            feats.append(f)
        return feats

    def _run(self, lr: Tensor) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        self._clear()
        with torch.no_grad():
            t_out = self.teacher(lr * self.teacher_range) / self.teacher_range
        s_out = self.student(lr * self.student_range) / self.student_range
        t_map: dict[str, Tensor] = {}
        s_map: dict[str, Tensor] = {}
        if self._t_hooks is not None and self._s_hooks is not None:
            t_map = dict(zip(self._t_hooks.names, self._features(self._t_hooks, "teacher")))
            s_map = dict(zip(self._s_hooks.names, self._features(self._s_hooks, "student")))
        t_feats = [t_map[t] for t, _, _ in self.pairs]
        s_feats = [s_map[s] for _, s, _ in self.pairs]
        return t_out, s_out, t_feats, s_feats

    def _combine(self, t_out: Tensor, s_out: Tensor, t_feats: list[Tensor], s_feats: list[Tensor],
                 hr: Tensor | None, probe: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        parts: dict[str, Tensor] = {}
        terms: list[Tensor] = []
        for i, ((_, s_name, w), tf, sf, ad) in enumerate(zip(self.pairs, t_feats, s_feats, self.adapters)):
            term = w * self.feature_loss(ad(sf), tf)
            terms.append(term)
            parts[f"feat{i}:{s_name}"] = term.detach()
        if probe:  # the output path is used if either image term is on
            if self.output_weight > 0 or self.gt_weight > 0:
                terms.append(self.output_loss(s_out, t_out))
        else:
            if self.output_weight > 0:
                term = self.output_weight * self.output_loss(s_out, t_out)
                terms.append(term)
                parts["out"] = term.detach()
            if self.gt_weight > 0:
                assert hr is not None
                term = self.gt_weight * self.gt_loss(s_out, hr)
                terms.append(term)
                parts["gt"] = term.detach()
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total, parts

    def _clear(self) -> None:
        for h in (self._t_hooks, self._s_hooks):
            if h is not None:
                h.clear()

    # ---------------------------------------------------------------- forward
    def forward(self, lr: Tensor, hr: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its weighted terms for a batch: ``lr`` (N, C, h, w) and ``hr`` (N, C, H, W) in [0, 1]."""
        if self._closed:
            raise RuntimeError("this Distiller was closed (its hooks are removed); build a new one")
        if not isinstance(lr, Tensor) or lr.dim() != 4:
            got = tuple(lr.shape) if isinstance(lr, Tensor) else type(lr).__name__
            raise TypeError(f"lr must be an (N, C, H, W) tensor, got {got}")
        if self.gt_weight > 0 and hr is None:
            raise ValueError("hr is required when gt_weight > 0")
        self.teacher.eval()  # even if someone called teacher.train() directly
        try:
            t_out, s_out, t_feats, s_feats = self._run(lr)
            if hr is not None and self.gt_weight > 0 and hr.shape != s_out.shape:
                raise ValueError(f"hr has shape {tuple(hr.shape)} but the student output is {tuple(s_out.shape)}")
            return self._combine(t_out, s_out, t_feats, s_feats, hr)
        finally:
            self._clear()

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Remove every hook from teacher and student and restore the teacher's requires_grad flags and mode."""
        if self._closed:
            return
        for h in (self._t_hooks, self._s_hooks):
            if h is not None:
                h.close()
        self._restore_teacher()
        self._closed = True

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{t}<-{s}*{w:g}" for t, s, w in self.pairs)
        return (f"pairs=[{pairs}], output_weight={self.output_weight:g}, gt_weight={self.gt_weight:g}, "
                f"teacher={type(self.teacher).__name__}(input_range={self.teacher_range:g}), "
                f"student_range={self.student_range:g}")
