"""reparam.fuse_foreign: foreign rep blocks with their own deploy switch are fused when exact, else named."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam import fuse_foreign


class Branches(nn.Module):
    """A 3x3 and a 1x1 conv in parallel; after a deploy switch, one 3x3 conv (``deploy``)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(cin, cout, 3, padding=1)
        self.k1 = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "deploy"):
            return self.deploy(x)
        return self.k3(x) + self.k1(x)

    def merged(self, with_1x1: bool = True) -> nn.Conv2d:
        conv = nn.Conv2d(self.k3.in_channels, self.k3.out_channels, 3, padding=1).to(self.k3.weight)
        conv.weight.copy_(self.k3.weight)
        conv.bias.copy_(self.k3.bias)
        if with_1x1:
            conv.weight[:, :, 1, 1] += self.k1.weight[:, :, 0, 0]
            conv.bias += self.k1.bias
        return conv


class SwitchBlock(Branches):
    def switch_to_deploy(self) -> None:
        self.deploy = self.merged()
        del self.k3, self.k1


class WrongFuseBlock(Branches):
    def fuse(self) -> None:  # forgets the 1x1 branch: a different function
        self.deploy = self.merged(with_1x1=False)
        del self.k3, self.k1


class RaisingBlock(Branches):
    def reparameterize(self) -> None:
        del self.k1  # half done, then fails
        raise RuntimeError("no closed form for this branch")


class KernelGetter(Branches):
    def rep_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        conv = self.merged()
        return conv.weight, conv.bias


class ReturnsConv(Branches):
    def fuse(self) -> nn.Conv2d:
        return self.merged()


class FlagFuse(nn.Module):
    """``fuse`` is a flag, not a method."""

    fuse = True

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ArgFuse(nn.Module):
    """``fuse(other)`` needs an argument: never called."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def fuse(self, other: nn.Module) -> None:
        raise AssertionError("fuse(other) must not be called")


class SubmoduleFuse(nn.Module):
    """A submodule named ``fuse``: calling it would be a forward pass, not a deploy switch."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(x)


def seeded(net: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)
    return net.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def net_with(block: nn.Module, cin: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, cin, 3, padding=1), block, nn.ReLU())


@given(cin=st.integers(1, 6), cout=st.integers(1, 6), h=st.integers(1, 8).map(lambda k: 2 * k + 1),
       w=st.integers(1, 8).map(lambda k: 2 * k + 1), seed=st.integers(0, 2**16), double=st.booleans())
def test_a_correct_switch_to_deploy_is_fused_and_exact(cin, cout, h, w, seed, double) -> None:
    net = seeded(net_with(SwitchBlock(cin, cout), cin), seed)
    dtype = torch.float64 if double else torch.float32
    net = net.to(dtype)
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        before = net(x)
    fused, report = fuse_foreign(net)
    with torch.no_grad():
        after = fused(x)
    assert rel(after, before) <= (1e-10 if double else 1e-5)
    assert [(m.name, m.cls, m.method) for m in report.fused] == [("1", "SwitchBlock", "switch_to_deploy")]
    assert report.unfused == [] and report.fused[0].rel_error <= 1e-5
    assert report.probe_dtype == "float64"  # float32 models are probed on a float64 copy too
    assert set(fused.state_dict()) == {"0.weight", "0.bias", "1.deploy.weight", "1.deploy.bias"}
    assert hasattr(net[1], "k1") and not hasattr(fused[1], "k1")  # the input model is left alone


def test_a_wrong_fuse_is_reverted_and_named() -> None:
    net = seeded(net_with(WrongFuseBlock(4, 5)), 0)
    x = torch.rand(1, 3, 9, 11)
    with torch.no_grad():
        before = net(x)
    fused, report = fuse_foreign(net, inplace=True)
    assert fused is net
    assert report.fused == []
    [entry] = report.unfused
    assert (entry.name, entry.cls, entry.method) == ("1", "WrongFuseBlock", "fuse")
    assert "changed the model's output" in entry.reason and entry.rel_error > 1e-5
    with torch.no_grad():
        assert torch.equal(fused(x), before)  # exactly the network it was
    assert hasattr(fused[1], "k1") and not hasattr(fused[1], "deploy")
    assert "left unfused" in report.summary() and "WrongFuseBlock.fuse" in report.summary()


def test_a_raising_method_is_reverted_and_named() -> None:
    net = seeded(net_with(RaisingBlock(4, 4)), 1)
    x = torch.rand(1, 3, 7, 5)
    with torch.no_grad():
        before = net(x)
    fused, report = fuse_foreign(net, inplace=True)
    [entry] = report.unfused
    assert entry.name == "1" and entry.method == "reparameterize"
    assert "raised RuntimeError: no closed form" in entry.reason
    assert hasattr(fused[1], "k1")  # the half-done call is undone
    with torch.no_grad():
        assert torch.equal(fused(x), before)


def test_attributes_that_are_not_zero_argument_methods_are_never_called() -> None:
    net = seeded(nn.Sequential(nn.Conv2d(3, 4, 1), FlagFuse(4), ArgFuse(4), SubmoduleFuse(4)), 2)
    x = torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        before = net(x)
    fused, report = fuse_foreign(net)
    assert report.fused == [] and report.unfused == []
    skipped = {m.name: m.reason for m in report.skipped}
    assert set(skipped) == {"1", "2", "3"}
    assert "bool" in skipped["1"] and "needs arguments (other)" in skipped["2"]
    assert "submodule" in skipped["3"]
    with torch.no_grad():
        assert torch.equal(fused(x), before)


def test_a_method_that_changes_nothing_is_named_as_left_unfused() -> None:
    fused, report = fuse_foreign(seeded(net_with(KernelGetter(4, 4)), 3))
    [entry] = report.unfused
    assert entry.method == "rep_params" and "left the module unchanged" in entry.reason
    assert hasattr(fused[1], "k1")


def test_children_first_each_instance_once_and_a_returned_module_replaces_every_place() -> None:
    calls: list[str] = []

    class Leaf(SwitchBlock):
        def switch_to_deploy(self) -> None:
            calls.append("leaf")
            super().switch_to_deploy()

    class Parent(nn.Module):
        def __init__(self, leaf: nn.Module) -> None:
            super().__init__()
            self.a, self.b = leaf, leaf

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(self.a(x)))

        def switch_to_deploy(self) -> None:
            calls.append("parent")

    net = seeded(nn.Sequential(nn.Conv2d(3, 4, 1), Parent(Leaf(4, 4)), Parent(ReturnsConv(4, 4))), 4)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        before = net(x)
    fused, report = fuse_foreign(net)
    assert calls == ["leaf", "parent", "parent"]  # the shared leaf once, before its parent
    assert [(m.name, m.method) for m in report.fused] == [("1.a", "switch_to_deploy"), ("2.a", "fuse")]
    assert {m.name for m in report.unfused} == {"1", "2"}  # the parents' switches change nothing
    assert fused[1].a is fused[1].b and isinstance(fused[2].a, nn.Conv2d) and fused[2].a is fused[2].b
    with torch.no_grad():
        assert rel(fused(x), before) <= 1e-5


def test_rep_blocks_modes_and_float64_probing() -> None:
    ecb = reparam.ECB(4, 4)
    net = seeded(nn.Sequential(nn.Conv2d(3, 4, 1), ecb, SwitchBlock(4, 4)), 5).train()
    fused, report = fuse_foreign(net)
    assert isinstance(fused[1], reparam.ECB)  # RepBlocks are fuse_all's; never visited here
    assert [m.name for m in report.fused] == ["2"]
    assert all(m.training for m in fused.modules())  # train flags kept, the new conv follows the model

    class Float32Only(SwitchBlock):
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.fixed = torch.ones(4, 1, 1, 1)  # a plain attribute: .double() leaves it float32

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + F.conv2d(x, self.fixed, groups=4)

    _, report = fuse_foreign(seeded(net_with(Float32Only()), 6))
    assert report.probe_dtype == "float32" and [m.name for m in report.fused] == ["1"]


def test_bad_arguments() -> None:
    net = net_with(SwitchBlock(4, 4))
    with pytest.raises(TypeError, match="model"):
        fuse_foreign("net")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="example"):
        fuse_foreign(net, example=[1.0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="methods"):
        fuse_foreign(net, methods="fuse")
    with pytest.raises(ValueError, match="rtol"):
        fuse_foreign(net, rtol=-1)

    class Dense(nn.Linear):
        def switch_to_deploy(self) -> None:
            pass

    with pytest.raises(ValueError, match="example: the model has no Conv2d"):
        fuse_foreign(nn.Sequential(Dense(3, 3)))
    with pytest.raises(ValueError, match="example: the model cannot run"):
        fuse_foreign(net, example=torch.rand(1, 5, 8, 8))
