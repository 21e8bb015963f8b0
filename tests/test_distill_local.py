"""Tests for distill.local.refine_blocks: block-wise fitting of a compressed student to its teacher's blocks."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distill.local import RefineReport, refine_blocks


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.act = nn.LeakyReLU(0.05)
        self.proj = nn.Conv2d(c_out, c_out, 1)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        return self.proj(self.act(self.conv(x))) * gain


class Net(nn.Module):
    def __init__(self, c: int = 8, c_mid: int | None = None) -> None:
        super().__init__()
        mid = c if c_mid is None else c_mid
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.b1 = Block(c, mid)
        self.b2 = Block(mid, c)
        self.unused = Block(c, c)
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(self.b2(self.b1(h), gain=0.5) + h)


class Shared(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        return self.tail(self.b2(self.b1(self.b1(h))))


def _pair(seed: int = 0, **kw) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    teacher = Net(**kw)
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a perturbed copy: what a compression leaves before refinement
        for p in student.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn_like(p))
    return teacher, student


def _inputs(n: int = 16, size: int = 10) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_each_block_loss_falls_in_execution_order_and_nothing_else_changes():
    teacher, student = _pair()
    t0, s0 = copy.deepcopy(teacher), copy.deepcopy(student)
    out, rep = refine_blocks(teacher, student, _inputs(), ["b2", "b1"], steps=60, lr=1e-2)
    assert isinstance(rep, RefineReport) and [b.name for b in rep.blocks] == ["b1", "b2"]
    for b in rep.blocks:
        assert b.skipped is None and b.kept and b.steps == 60 and b.loss_after < 0.7 * b.loss_before, b
    assert _same(teacher, t0) and _same(student, s0) and out is not student  # inplace=False: a copy
    for name in ("head", "tail", "unused"):  # only the named blocks move
        assert _same(out.get_submodule(name), student.get_submodule(name)), name
    assert not _same(out.b1, student.b1) and not _same(out.b2, student.b2)
    assert not out.training and all(p.requires_grad for p in out.parameters())
    x = _inputs(4, 12)
    with torch.no_grad():
        err_before = (student(x) - teacher(x)).pow(2).mean()
        err_after = (out(x) - teacher(x)).pow(2).mean()
    assert err_after < err_before  # the whole network follows the teacher more closely on new inputs


def test_block_input_is_the_refined_students_own_and_kwargs_are_replayed():
    """b2's loss before its steps is measured on the input the already refined b1 gives (not the teacher's),
    called with the keyword argument the network passes (gain=0.5)."""
    teacher, student = _pair()
    out, rep = refine_blocks(teacher, student, _inputs(), ["b1", "b2"], steps=40, lr=1e-2)
    x = _inputs()
    feats = {}
    out.b2.register_forward_hook(lambda m, i, o: feats.__setitem__("s", o))
    teacher.b2.register_forward_hook(lambda m, i, o: feats.__setitem__("t", o))
    with torch.no_grad():
        out(x)
        teacher(x)
    rel = float((feats["s"] - feats["t"]).pow(2).sum() / feats["t"].pow(2).sum())
    assert rel == pytest.approx(rep.blocks[1].loss_after, rel=1e-4)


def test_deterministic_for_a_seed_and_inplace():
    teacher, student = _pair()
    a, _ = refine_blocks(teacher, student, _inputs(), ["b1", "b2"], steps=20, lr=1e-2, seed=3)
    b, _ = refine_blocks(teacher, student, _inputs(), ["b1", "b2"], steps=20, lr=1e-2, seed=3)
    c, _ = refine_blocks(teacher, student, _inputs(), ["b1", "b2"], steps=20, lr=1e-2, seed=4)
    assert _same(a, b) and not _same(a, c)
    same, _ = refine_blocks(teacher, student, _inputs(), ["b1"], steps=5, lr=1e-2, inplace=True)
    assert same is student


def test_no_gain_puts_the_weights_back_and_steps_zero_only_measures():
    teacher, student = _pair()
    out, rep = refine_blocks(teacher, student, _inputs(), ["b1"], steps=5, lr=10.0, max_relative_step=None)
    assert not rep.blocks[0].kept and rep.blocks[0].loss_after >= rep.blocks[0].loss_before
    assert _same(out, student)
    out, rep = refine_blocks(teacher, student, _inputs(), ["b1", "b2"], steps=0)
    assert _same(out, student) and all(b.loss_after == b.loss_before > 0 for b in rep.blocks)
    assert "no gain" not in rep.summary() and "b1" in rep.summary()


def test_pruned_block_needs_its_channel_map():
    """A block whose output lost channels is fitted to the teacher's kept channels, or skipped without them."""
    torch.manual_seed(0)
    teacher = Net(c=8, c_mid=8)
    student = Net(c=8, c_mid=6)
    keep = [0, 2, 3, 5, 6, 7]
    with torch.no_grad():
        for name in ("head", "tail", "b2.proj", "unused"):
            student.get_submodule(name).load_state_dict(teacher.get_submodule(name).state_dict())
        student.b1.conv.weight.copy_(teacher.b1.conv.weight[keep])
        student.b1.conv.bias.copy_(teacher.b1.conv.bias[keep])
        student.b1.proj.weight.copy_(teacher.b1.proj.weight[keep][:, keep] * 0.5)
        student.b1.proj.bias.copy_(teacher.b1.proj.bias[keep])
        student.b2.conv.weight.copy_(teacher.b2.conv.weight[:, keep])
        student.b2.conv.bias.copy_(teacher.b2.conv.bias)
    _, rep = refine_blocks(teacher, student, _inputs(), ["b1", "b2"], steps=30, lr=1e-2)
    assert "differs from the teacher's" in rep.blocks[0].skipped and rep.blocks[1].skipped is None
    _, rep = refine_blocks(teacher, student, _inputs(), ["b1", "b2"], channels={"b1": keep}, steps=30, lr=1e-2)
    assert rep.blocks[0].skipped is None and rep.blocks[0].kept


def test_shared_and_unused_blocks_are_skipped_with_the_reason():
    torch.manual_seed(0)
    teacher = Shared()
    student = copy.deepcopy(teacher)
    _, rep = refine_blocks(teacher, student, _inputs(), ["b1", "b2", "unused"], steps=3)
    why = {b.name: b.skipped for b in rep.blocks}
    assert why["b1"] == "called 2 times per forward (shared)" and why["b2"] is None
    assert why["unused"] == "not called by the student's forward"


def test_inputs_as_batches_or_calibration():
    from prune import Calibration

    teacher, student = _pair()
    x = _inputs()
    a, _ = refine_blocks(teacher, student, list(x.split(8)), ["b1"], steps=10, lr=1e-2)
    b, _ = refine_blocks(teacher, student, x, ["b1"], steps=10, lr=1e-2)
    c, _ = refine_blocks(teacher, student, Calibration(x, batch_size=8), ["b1"], steps=10, lr=1e-2)
    assert _same(a, b) and _same(b, c)


@pytest.mark.parametrize("kw, exc, match", [
    ({"blocks": ["nope"]}, ValueError, "blocks"),
    ({"blocks": "b1"}, TypeError, "blocks"),
    ({"steps": -1}, ValueError, "steps"),
    ({"steps": 1.5}, ValueError, "steps"),
    ({"lr": 0.0}, ValueError, "lr"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"inputs": "x"}, TypeError, "inputs"),
    ({"inputs": torch.zeros(0, 3, 8, 8)}, ValueError, "inputs"),
    ({"teacher": "t"}, TypeError, "teacher"),
])
def test_bad_arguments_name_the_argument(kw, exc, match):
    teacher, student = _pair()
    args = {"teacher": teacher, "student": student, "inputs": _inputs(), "blocks": ["b1"], **kw}
    with pytest.raises(exc, match=match):
        refine_blocks(args.pop("teacher"), args.pop("student"), args.pop("inputs"), args.pop("blocks"), **args)
