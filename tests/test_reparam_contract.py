"""The contract every block in ``reparam.BLOCKS`` must honour.

Configurations are drawn generically (channels, in != out, kernel size, stride, groups, dilation, bias,
padding mode, BN statistics, odd image sizes); a configuration a block rejects must be rejected with a
ValueError, and every accepted one must fuse exactly. New blocks are covered by registering them.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import reparam
from reparam import RepBlock

SINGLE_CONV = sorted(n for n, c in reparam.BLOCKS.items() if n != "erb")
ALL_BLOCKS = sorted(reparam.BLOCKS)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter and BN statistic a random value (so no branch is trivially zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) * 2 + 0.1)
    return model


@st.composite
def configs(draw, names=SINGLE_CONV):
    name = draw(st.sampled_from(names))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    same = draw(st.booleans())
    cout = cin if same else groups * draw(st.integers(1, 3))
    depthwise = draw(st.integers(0, 4)) == 0
    if depthwise:
        groups = cout = cin
    kw = dict(
        kernel_size=draw(st.sampled_from([3, 3, 5, 1] if name != "replk" else [5, 7])),
        stride=draw(st.sampled_from([1, 1, 2])),
        dilation=draw(st.sampled_from([1, 1, 2])),
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"])),
    )
    hw = (draw(st.integers(5, 13)), draw(st.integers(5, 13)))
    return name, cin, cout, kw, hw, draw(st.integers(0, 2**16))


def build(name: str, cin: int, cout: int, kw: dict) -> RepBlock:
    try:
        return reparam.get_block(name)(cin, cout, **kw)
    except ValueError:
        assume(False)  # a rejected configuration (rejections themselves are tested below)
        raise


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow], max_examples=60)
@given(configs())
def test_fused_equals_branches_float64(cfg) -> None:
    name, cin, cout, kw, hw, seed = cfg
    block = randomize(build(name, cin, cout, kw).double(), seed).eval()
    if kw["padding_mode"] != "zeros":
        assume(min(hw) > block.padding)  # reflect padding needs the pad to be smaller than the image
    x = torch.randn(2, cin, *hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = block(x)
    fused = block.fuse()
    assert type(fused) is nn.Conv2d
    assert fused.weight.dtype == torch.float64
    assert (fused.padding_mode, fused.dilation, fused.stride, fused.groups) == (
        kw["padding_mode"], (kw["dilation"],) * 2, (kw["stride"],) * 2, kw["groups"])
    assert rel_err(fused(x), y) <= 1e-10


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow], max_examples=30)
@given(configs())
def test_fused_equals_branches_float32(cfg) -> None:
    name, cin, cout, kw, hw, seed = cfg
    kw["padding_mode"] = "zeros"
    block = randomize(build(name, cin, cout, kw), seed).eval()
    x = torch.randn(1, cin, *hw, generator=torch.Generator().manual_seed(seed))
    assert rel_err(block.fuse()(x), block(x)) <= 1e-5


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow], max_examples=30)
@given(configs())
def test_online_matches_branches_outputs_and_gradients(cfg) -> None:
    name, cin, cout, kw, hw, seed = cfg
    kw["padding_mode"] = "zeros"
    branches = build(name, cin, cout, kw)
    if branches.has_batchnorm():
        with pytest.raises(ValueError, match="online"):
            branches.set_mode("online")
        return
    branches = randomize(branches.double(), seed).train()
    online = copy.deepcopy(branches).set_mode("online")
    x = torch.randn(2, cin, *hw, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64,
                    requires_grad=True)
    target = torch.randn_like(branches(x))
    outs, grads = [], []
    for m in (branches, online):
        xi = x.detach().clone().requires_grad_(True)
        y = m(xi)
        ((y - target) ** 2).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert rel_err(outs[1], outs[0]) <= 1e-10
    scale = max(g.abs().max().item() for g in grads[0] if g is not None)
    for g_online, g_branch in zip(grads[1], grads[0]):
        assert (g_online is None) == (g_branch is None)
        if g_branch is not None:
            assert (g_online - g_branch).abs().max().item() <= 1e-10 * scale


@settings(suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow], max_examples=30)
@given(configs())
def test_from_conv_is_exact(cfg) -> None:
    name, cin, cout, kw, hw, seed = cfg
    cls = reparam.get_block(name)
    k, d = kw["kernel_size"], kw["dilation"]
    conv = nn.Conv2d(cin, cout, k, kw["stride"], d * (k // 2), d, kw["groups"], bias=kw["bias"],
                     padding_mode="zeros").double()
    randomize(conv, seed)
    try:
        block = cls.from_conv(conv)
    except ValueError:
        assume(False)
        raise
    randomize_shadow = copy.deepcopy(block)  # from_conv must not share storage with the conv
    block.eval()
    x = torch.randn(2, cin, *hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert rel_err(block(x), conv(x)) <= 1e-10
    assert rel_err(block.fuse()(x), conv(x)) <= 1e-10
    assert all(p.data_ptr() != q.data_ptr() for p in randomize_shadow.parameters() for q in conv.parameters())


@pytest.mark.parametrize("name", ALL_BLOCKS)
def test_fuse_twice_state_dict_round_trip_and_modes(name: str) -> None:
    cls = reparam.get_block(name)
    kwargs = {"kernel_size": 7} if name == "replk" else {}
    block = randomize(cls(4, 4, **kwargs).double(), 1).eval()
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    a, b = block.fuse(), block.fuse()  # fusing twice works and gives the same module
    assert rel_err(a(x), b(x)) == 0
    clone = cls(4, 4, **kwargs).double().eval()
    clone.load_state_dict(block.state_dict())
    assert rel_err(clone(x), block(x)) == 0
    with pytest.raises(ValueError, match="mode"):
        block.set_mode("fused")
    assert block.mode == "branches"


@pytest.mark.parametrize("name", ALL_BLOCKS)
def test_invalid_configurations_raise_naming_the_argument(name: str) -> None:
    cls = reparam.get_block(name)
    with pytest.raises(ValueError, match="groups"):
        cls(6, 6, groups=4)
    with pytest.raises(ValueError, match="kernel_size"):
        cls(4, 4, kernel_size=4)
    with pytest.raises(ValueError, match="padding_mode"):
        cls(4, 4, padding_mode="mirror")
    with pytest.raises(TypeError, match="in_channels"):
        cls(4.0, 4)
    with pytest.raises(ValueError, match="stride"):
        cls(4, 4, stride=0)
    with pytest.raises(ValueError, match="padding"):
        cls(4, 4, padding=7)


def test_identity_options_reject_in_ne_out_and_stride() -> None:
    with pytest.raises(ValueError, match="with_idt"):
        reparam.ECB(4, 8, with_idt=True)
    with pytest.raises(ValueError, match="with_idt"):
        reparam.ECB(4, 4, stride=2, with_idt=True)
    with pytest.raises(ValueError, match="kernel_size"):
        reparam.ECB(4, 4, kernel_size=1)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        reparam.RRRB(4, 8)
    with pytest.raises(ValueError, match="stride"):
        reparam.RRRB(4, 4, stride=2)


# ---------------------------------------------------------------------------------------- fuse_all


class UserNet(nn.Module):
    def __init__(self, block: str = "ecb") -> None:
        super().__init__()
        cls = reparam.get_block(block)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.seq = nn.Sequential(cls(8, 8), nn.LeakyReLU(0.05), cls(8, 8))
        self.lst = nn.ModuleList([cls(8, 8)])
        self.dct = nn.ModuleDict({"a": reparam.RRRB(8, 8), "b": reparam.ERB(8, 8)})
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        x = self.seq(x) + x
        x = self.lst[0](x)
        return self.tail(self.dct["b"](self.dct["a"](x)))


def _names_and_types(m: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(x).__name__) for n, x in m.named_modules()]


@pytest.mark.parametrize("block", ["ecb", "dbb", "repvgg", "repconv"])
def test_fuse_all_non_mutating_idempotent_and_exact(block: str) -> None:
    if block not in reparam.BLOCKS:
        pytest.skip(f"{block} not registered")
    net = randomize(UserNet(block).double(), 3).eval()
    before = copy.deepcopy(net.state_dict())
    structure = _names_and_types(net)
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    fused = reparam.fuse_all(net)
    assert _names_and_types(net) == structure  # input untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(isinstance(m, RepBlock) for m in fused.modules())
    assert rel_err(fused(x), net(x)) <= 1e-10
    again = reparam.fuse_all(fused)
    assert again is not fused and _names_and_types(again) == _names_and_types(fused)
    assert rel_err(again(x), fused(x)) == 0
    inplace = reparam.fuse_all(net, inplace=True)
    assert inplace is net and not any(isinstance(m, RepBlock) for m in net.modules())


def test_fuse_all_warns_for_bn_in_training_mode_only() -> None:
    if "repvgg" not in reparam.BLOCKS:
        pytest.skip("repvgg not registered")
    net = nn.Sequential(reparam.get_block("repvgg")(4, 4))
    with pytest.warns(UserWarning, match="training mode"):
        reparam.fuse_all(net.train())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reparam.fuse_all(net.eval())
        reparam.fuse_all(nn.Sequential(reparam.ECB(4, 4)).train())


def test_fuse_all_on_a_bare_block_and_type_errors() -> None:
    block = reparam.ECB(3, 5).eval()
    assert type(reparam.fuse_all(block)) is nn.Conv2d
    with pytest.raises(TypeError, match="model"):
        reparam.fuse_all("not a model")  # type: ignore[arg-type]


def test_set_mode_walks_the_model() -> None:
    net = UserNet("ecb")
    reparam.set_mode(net, "online")
    assert all(b.mode == "online" for b in net.modules() if isinstance(b, RepBlock))
    with pytest.raises(ValueError, match="mode"):
        reparam.set_mode(net, "deploy")


# ------------------------------------------------------------------------------------------ repify


class PlainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2, groups=2))
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=0)  # not 'same': cannot be represented
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.tail = nn.Conv2d(4, 12, 3, padding=1)
        self.up = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.tail(self.squeeze(self.down(self.body(self.head(x))))))


@pytest.mark.parametrize("block", SINGLE_CONV)
def test_repify_is_exact_and_fuses_back(block: str) -> None:
    net = randomize(PlainNet().double(), 5).eval()
    x = torch.randn(1, 3, 15, 14, dtype=torch.float64)
    rep = reparam.repify(net, block)
    assert not any(isinstance(m, RepBlock) for m in net.modules())  # input untouched
    converted = [n for n, m in rep.named_modules() if isinstance(m, RepBlock)]
    assert "down" not in converted
    assert converted, f"{block} converted nothing"
    assert rel_err(rep.eval()(x), net(x)) <= 1e-10
    back = reparam.fuse_all(rep)
    assert rel_err(back(x), net(x)) <= 1e-10
    assert set(back.state_dict()) == set(net.state_dict())


def test_repify_include_patterns_and_explicit_failure() -> None:
    net = PlainNet()
    rep = reparam.repify(net, "ecb", include=["body.*"])
    assert [n for n, m in rep.named_modules() if isinstance(m, RepBlock)] == ["body.0", "body.2"]
    rep = reparam.repify(net, reparam.ECB, include=lambda name, m: name == "tail")
    assert isinstance(rep.tail, reparam.ECB) and not isinstance(rep.head, RepBlock)
    with pytest.raises(ValueError, match="down"):
        reparam.repify(net, "ecb", include="down")
    with pytest.raises(ValueError, match="block"):
        reparam.repify(net, "nonsense")
    with pytest.raises(TypeError, match="include"):
        reparam.repify(net, "ecb", include=[3])


def test_repify_then_online_training_then_fuse_back() -> None:
    """A pretrained plain net is fine-tuned over-parameterized (online) and fused back exactly."""
    torch.manual_seed(0)
    net = PlainNet().double()
    rep = reparam.set_mode(reparam.repify(net, "ecb"), "online")
    opt = torch.optim.SGD(rep.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        rep(x).square().mean().backward()
        opt.step()
    rep.eval()
    assert rel_err(reparam.fuse_all(rep)(x), rep(x)) <= 1e-10
    assert rel_err(rep(x), net(x)) > 0  # training really changed the function


def test_load_kernel_into_bias_free_ecb() -> None:
    block = reparam.ECB(4, 4, bias=False).double().eval()
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        block.load_kernel(w, None)
        fw, fb = block.fused_kernel()
    assert torch.allclose(fw, w, atol=1e-12) and not fb.any()
    with pytest.raises(ValueError, match="bias"), torch.no_grad():
        block.load_kernel(w, torch.ones(4, dtype=torch.float64))
