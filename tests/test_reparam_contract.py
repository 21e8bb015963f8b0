"""The contract every rep block honours, checked by ONE per-block generator.

Each test is parametrized over block *variants* (every registered block; BN blocks both with and without
BatchNorm), so every block gets the profile's full number of examples in float64, float32, online mode
and ``from_conv``. Hypothesis draws the geometry (channels, in != out, groups / depthwise, kernel size,
stride, dilation, bias, padding mode, image size), the block options (identity, internal widths,
branch counts, edges, small kernel, ratio), the input tensor's values and the parameters' scale.

Tolerances: fused vs branches max abs error <= 1e-10 (float64) / 1e-5 (float32) relative to the output
scale; online vs branches outputs and gradients equal to 1e-10 relative (float64).

Set ``EFFSR_REPARAM_ERRLOG=/path/file.jsonl`` to log every measured error (``benchmarks``-style worst-case
numbers for reports); the tests never depend on it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import reparam
from reparam import RepBlock
from reparam.base import PADDING_MODES

#: Every block the package ships. A block that goes missing from the registry fails here (never a skip).
EXPECTED_BLOCKS = ("acb", "dbb", "ecb", "edbb", "erb", "mobileone", "repconv", "replk", "repvgg", "rrrb")
BN_BLOCKS = ("acb", "dbb", "mobileone", "replk", "repvgg")

#: (id, block name, fixed options): BN blocks appear with and without BatchNorm, so both get examples.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = []
for _name in EXPECTED_BLOCKS:
    if _name in BN_BLOCKS:
        VARIANTS += [(f"{_name}-bn", _name, {"bn": True}), (f"{_name}-nobn", _name, {"bn": False})]
    else:
        VARIANTS.append((_name, _name, {}))
ONLINE_VARIANTS = [v for v in VARIANTS if v[2].get("bn") is not True]
SINGLE_CONV_VARIANTS = [v for v in VARIANTS if v[1] != "erb"]


def test_every_block_is_registered_and_covered() -> None:
    assert set(reparam.BLOCKS) == set(EXPECTED_BLOCKS)
    for name in EXPECTED_BLOCKS:
        assert reparam.get_block(name).name == name


# ---------------------------------------------------------------------------------------- generator
@dataclass
class Case:
    name: str
    cin: int
    cout: int
    kw: dict[str, Any]
    x: np.ndarray
    seed: int
    scale: float
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, dtype: torch.dtype) -> RepBlock:
        block = reparam.get_block(self.name)(self.cin, self.cout, **self.kw, **self.options)
        return randomize(block.to(dtype), self.seed, self.scale)

    def input(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(self.x).to(dtype)


def randomize(model: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Every parameter and BN running statistic random (no branch trivially zero), in the model's dtype."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=torch.float64) * 2 + 0.1)
    return model


def _block_options(draw: Any, name: str, cin: int, cout: int, k: int, stride: int, groups: int) -> dict[str, Any]:
    identity_possible = cin == cout and stride == 1
    identity = st.sampled_from([None, False, True] if identity_possible else [None, False])
    opts: dict[str, Any] = {}
    if name in ("ecb", "edbb"):
        opts["use_identity"] = draw(identity)
        opts["depth_multiplier"] = draw(st.sampled_from([0.5, 1.0, 1.5, 2.0]))
        edges = [(), ("laplacian",), ("sobel_x", "sobel_y", "laplacian")] if k >= 3 else [()]
        opts["edges"] = draw(st.sampled_from(edges))
    elif name in ("repvgg", "mobileone"):
        opts["use_identity"] = draw(identity)
        if name == "mobileone":
            opts["num_branches"] = draw(st.integers(1, 3))
    elif name in ("dbb", "repconv"):
        if draw(st.booleans()):
            opts["internal_channels"] = groups * draw(st.integers(1, 3))
    elif name == "replk":
        opts["small_kernel"] = draw(st.sampled_from([s for s in (1, 3, 5) if s < k]))
    elif name in ("rrrb", "erb"):
        opts["ratio"] = draw(st.integers(1, 3))
    return opts


@st.composite
def cases(draw: Any, name: str, fixed: dict[str, Any], padding_modes: tuple[str, ...] = PADDING_MODES) -> Case:
    cls = reparam.get_block(name)
    square = not cls.allows_in_ne_out
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "depthwise":
        groups = cin = cout = draw(st.integers(1, 4))
    else:
        groups = 1 if kind == "dense" else draw(st.integers(2, 3))
        cin = groups * draw(st.integers(1, 3))
        cout = cin if square or draw(st.booleans()) else groups * draw(st.integers(1, 3))
    k = draw(st.sampled_from([3, 5, 7] if name == "replk" else [1, 3, 3, 5]))
    stride = 1 if name in ("rrrb", "erb") else draw(st.sampled_from([1, 1, 2]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    pad = dilation * (k - 1) // 2
    kw = dict(kernel_size=k, stride=stride, dilation=dilation, groups=groups, bias=draw(st.booleans()),
              padding_mode=draw(st.sampled_from(padding_modes)))
    h, w = draw(st.integers(pad + 1, pad + 9)), draw(st.integers(pad + 1, pad + 9))  # reflect needs pad < size
    x = draw(arrays(np.float64, (2, cin, h, w), elements=st.floats(-3, 3, allow_nan=False, allow_infinity=False)))
    options = {**_block_options(draw, name, cin, cout, k, stride, groups), **fixed}
    return Case(name, cin, cout, kw, x, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([0.1, 0.5, 1.0])),
                options)


def _log(kind: str, case: Case, value: float) -> None:
    path = os.environ.get("EFFSR_REPARAM_ERRLOG")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"test": kind, "block": case.name, "options": repr(case.options), "err": value}) + "\n")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the output scale (``b``'s max magnitude, floored at 1e-6)."""
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _ids(variants: list) -> list[str]:
    return [v[0] for v in variants]


# -------------------------------------------------------------------------------------- fused == branches
def _check_fused(case: Case, dtype: torch.dtype, tol: float) -> None:
    block = case.build(dtype).eval()
    x = case.input(dtype)
    with torch.no_grad():
        y = block(x)
        fused = block.fuse()
        err = rel_err(fused(x), y)
    _log(f"fused-{dtype}", case, err)
    convs = [fused] if case.name != "erb" else [fused[0], fused[2]]
    for c in convs:
        assert type(c) is nn.Conv2d and c.weight.dtype == dtype
        assert (c.padding_mode, c.dilation, c.stride, c.groups) == (
            case.kw["padding_mode"], (case.kw["dilation"],) * 2, (case.kw["stride"],) * 2, case.kw["groups"])
        assert (c.bias is not None) == (case.kw["bias"] or bool(block.has_batchnorm()))  # random BN: a real bias
    assert err <= tol, f"{case.name} {case.options} {case.kw}: fused differs by {err:.3g} (relative)"


@pytest.mark.parametrize("vid,name,fixed", VARIANTS, ids=_ids(VARIANTS))
@given(data=st.data())
def test_fused_equals_branches_float64(vid: str, name: str, fixed: dict, data: st.DataObject) -> None:
    _check_fused(data.draw(cases(name, fixed)), torch.float64, 1e-10)


@pytest.mark.parametrize("vid,name,fixed", VARIANTS, ids=_ids(VARIANTS))
@given(data=st.data())
def test_fused_equals_branches_float32(vid: str, name: str, fixed: dict, data: st.DataObject) -> None:
    _check_fused(data.draw(cases(name, fixed)), torch.float32, 1e-5)


# -------------------------------------------------------------------------------------- online == branches
@pytest.mark.parametrize("vid,name,fixed", ONLINE_VARIANTS, ids=_ids(ONLINE_VARIANTS))
@given(data=st.data())
def test_online_matches_branches_outputs_and_gradients(vid: str, name: str, fixed: dict, data: st.DataObject) -> None:
    case = data.draw(cases(name, fixed))
    block = case.build(torch.float64).train()
    assert not block.has_batchnorm()
    x = case.input(torch.float64)
    target = torch.randn(block(x).shape, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64)

    def run(mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        reparam.set_mode(block, mode)
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        ((y - target) ** 2).sum().backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
        grads["<input>"] = xi.grad
        return y.detach(), grads

    y_b, g_b = run("branches")
    y_o, g_o = run("online")
    assert block.mode == "online"
    err = rel_err(y_o, y_b)
    assert err <= 1e-10
    assert g_b.keys() == g_o.keys() and len(g_b) > 1, "parameters must receive gradients in both modes"
    scale = max(g.abs().max().item() for g in g_b.values())
    gerr = max((g_o[n] - g_b[n]).abs().max().item() for n in g_b) / max(scale, 1e-6)
    _log("online", case, max(err, gerr))
    assert gerr <= 1e-10, f"{case.name}: gradients differ by {gerr:.3g} (relative)"


@pytest.mark.parametrize("name", BN_BLOCKS)
def test_bn_blocks_refuse_online_and_accept_it_without_bn(name: str) -> None:
    block = reparam.get_block(name)(4, 4)
    with pytest.raises(ValueError, match="bn=False"):
        block.set_mode("online")
    assert block.mode == "branches"
    assert reparam.get_block(name)(4, 4, bn=False).set_mode("online").mode == "online"


# ---------------------------------------------------------------------------------------------- from_conv
@pytest.mark.parametrize("vid,name,fixed", SINGLE_CONV_VARIANTS, ids=_ids(SINGLE_CONV_VARIANTS))
@given(data=st.data())
def test_from_conv_is_exact_and_fuses_back_to_the_conv_keys(vid: str, name: str, fixed: dict,
                                                            data: st.DataObject) -> None:
    case = data.draw(cases(name, fixed))
    k, d = case.kw["kernel_size"], case.kw["dilation"]
    conv = nn.Conv2d(case.cin, case.cout, k, case.kw["stride"], d * (k - 1) // 2, d, case.kw["groups"],
                     bias=case.kw["bias"], padding_mode=case.kw["padding_mode"], dtype=torch.float64).eval()
    randomize(conv, case.seed, case.scale)
    before = {n: v.clone() for n, v in conv.state_dict().items()}
    block = reparam.get_block(name).from_conv(conv, **case.options)
    assert not block.training and block.bias == (conv.bias is not None)
    x = case.input(torch.float64)
    with torch.no_grad():
        y = conv(x)
        fused = block.fuse()
        err = max(rel_err(block(x), y), rel_err(fused(x), y))
    _log("from_conv", case, err)
    assert err <= 1e-10, f"{case.name} {case.options}: from_conv off by {err:.3g}"
    # bias=False convs come back bias-free: the fused state_dict loads strictly into the original conv
    assert set(fused.state_dict()) == set(conv.state_dict())
    conv.load_state_dict(fused.state_dict(), strict=True)
    # the block owns its parameters: changing them leaves the conv as it was
    with torch.no_grad():
        for p in block.parameters():
            p.add_(1.0)
    fresh = nn.Conv2d(case.cin, case.cout, k, case.kw["stride"], d * (k - 1) // 2, d, case.kw["groups"],
                      bias=case.kw["bias"], padding_mode=case.kw["padding_mode"], dtype=torch.float64)
    fresh.load_state_dict(before)
    assert all(torch.equal(v, fresh.state_dict()[n]) for n, v in before.items())


# ------------------------------------------------------------------------------------------- per block
@pytest.mark.parametrize("name", EXPECTED_BLOCKS)
def test_fuse_twice_state_dict_round_trip_and_modes(name: str) -> None:
    cls = reparam.get_block(name)
    kwargs = {"kernel_size": 7} if name == "replk" else {}
    block = randomize(cls(4, 4, **kwargs).double(), 1).eval()
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    a, b = block.fuse(), block.fuse()
    assert a is not b and torch.equal(a(x), b(x))
    clone = cls(4, 4, **kwargs).double().eval()
    clone.load_state_dict(block.state_dict())
    assert torch.equal(clone(x), block(x))
    with pytest.raises(ValueError, match="mode"):
        block.set_mode("fused")
    assert block.mode == "branches"


@pytest.mark.parametrize("name", EXPECTED_BLOCKS)
def test_invalid_configurations_raise_naming_the_argument(name: str) -> None:
    cls = reparam.get_block(name)
    with pytest.raises(ValueError, match="groups"):
        cls(6, 6, groups=4)
    with pytest.raises(ValueError, match="padding_mode"):
        cls(4, 4, padding_mode="mirror")
    with pytest.raises(TypeError, match="in_channels"):
        cls(4.0, 4)
    with pytest.raises(ValueError, match="stride"):
        cls(4, 4, stride=0)
    with pytest.raises(ValueError, match="padding"):
        cls(4, 4, padding=7)


@pytest.mark.parametrize("name", EXPECTED_BLOCKS)
@pytest.mark.parametrize("padding", [None, 1, 2])
def test_even_kernel_error_is_true_whatever_the_padding(name: str, padding: int | None) -> None:
    """The message must not send the user to pass a padding that is then rejected."""
    with pytest.raises(ValueError, match="kernel_size=4 is even") as err:
        reparam.get_block(name)(4, 4, kernel_size=4, padding=padding)
    assert "pass" not in str(err.value) and "odd kernel_size" in str(err.value)


@pytest.mark.parametrize("name", [n for n in EXPECTED_BLOCKS if n != "rrrb" and n != "erb"])
def test_branch_declaration_covers_every_parameter_and_has_one_main_branch(name: str) -> None:
    """``branches()`` is what load_kernel and the pruner derive from: it must name every parameter."""
    cls = reparam.get_block(name)
    for opts in ({}, {"bn": False} if name in BN_BLOCKS else {"bias": False}):
        block = cls(4, 4, kernel_size=5, **opts)
        declared = {id(p) for br in block.branches() for p in br.parameters()}
        assert declared == {id(p) for p in block.parameters()}, name
        assert sum(br.main for br in block.branches()) == 1
        assert len({br.name for br in block.branches()}) == len(block.branches())


# ------------------------------------------------------------------------------------------ model level
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
    return [(n, type(x).__name__) for n, x in m.named_modules(remove_duplicate=False)]


@pytest.mark.parametrize("block", ["ecb", "dbb", "repvgg", "repconv"])
def test_fuse_all_leaves_the_input_alone_is_idempotent_and_exact(block: str) -> None:
    net = randomize(UserNet(block).double(), 3).eval()
    values = {n: v.clone() for n, v in net.state_dict().items()}
    structure = _names_and_types(net)
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    y = net(x)
    fused = reparam.fuse_all(net)
    # the input keeps its module types and parameter values, and the result owns new storage
    assert _names_and_types(net) == structure
    assert net.state_dict().keys() == values.keys()
    assert all(torch.equal(values[n], v) for n, v in net.state_dict().items())
    assert {p.data_ptr() for p in fused.parameters()}.isdisjoint({p.data_ptr() for p in net.parameters()})
    assert not any(isinstance(m, RepBlock) for m in fused.modules())
    assert rel_err(fused(x), y) <= 1e-10
    with torch.no_grad():
        for p in fused.parameters():
            p.mul_(-1.0)
    assert torch.equal(net(x), y)  # changing the fused model does not reach the input
    again = reparam.fuse_all(fused)
    assert again is not fused and _names_and_types(again) == _names_and_types(fused)
    assert torch.equal(again(x), fused(x))
    inplace = reparam.fuse_all(net, inplace=True)
    assert inplace is net and not any(isinstance(m, RepBlock) for m in net.modules())


def test_fuse_all_fuses_a_shared_block_once_and_keeps_it_shared() -> None:
    b = randomize(reparam.ECB(4, 4, use_identity=True).double(), 7).eval()
    net = nn.Sequential(b, nn.ReLU(), b)
    shared_elsewhere = nn.ModuleDict({"first": net, "again": b})
    x = torch.randn(1, 4, 8, 9, dtype=torch.float64)
    y = net(x)
    for model in (net, shared_elsewhere):
        fused = reparam.fuse_all(model)
        assert not any(isinstance(m, RepBlock) for m in fused.modules(remove_duplicate=False))
        seq = fused if model is net else fused["first"]
        assert type(seq[0]) is nn.Conv2d and seq[0] is seq[2]
        if model is shared_elsewhere:
            assert fused["again"] is seq[0]
        assert rel_err(seq(x), y) <= 1e-10
        twice = reparam.fuse_all(fused)  # nothing left to fuse: the same function, bit for bit
        assert torch.equal((twice if model is net else twice["first"])(x), seq(x))
    assert [n for n, _ in reparam.rep_blocks(net)] == ["0"]
    assert [n for n, _ in reparam.rep_blocks(net, remove_duplicate=False)] == ["0", "2"]


def test_fuse_warns_for_bn_in_training_mode_from_the_block_and_once_from_fuse_all() -> None:
    block = reparam.RepVGGBlock(4, 4)
    with pytest.warns(reparam.FuseModeWarning, match="training mode"):
        block.train().fuse()
    net = nn.Sequential(reparam.RepVGGBlock(4, 4), reparam.DBB(4, 4))
    with pytest.warns(reparam.FuseModeWarning) as record:
        reparam.fuse_all(net.train())
    assert len([w for w in record if issubclass(w.category, reparam.FuseModeWarning)]) == 1
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block.eval().fuse()
        reparam.fuse_all(net.eval())
        reparam.fuse_all(nn.Sequential(reparam.ECB(4, 4)).train())
        reparam.RepVGGBlock(4, 4, bn=False).train().fuse()


def test_fuse_all_on_a_bare_block_and_type_errors() -> None:
    assert type(reparam.fuse_all(reparam.ECB(3, 5).eval())) is nn.Conv2d
    with pytest.raises(TypeError, match="model"):
        reparam.fuse_all("not a model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        reparam.set_mode("not a model", "online")  # type: ignore[arg-type]


def test_set_mode_validates_every_block_before_switching_any() -> None:
    net = nn.Sequential(reparam.ECB(4, 4), reparam.RepConv(4, 4), reparam.DBB(4, 4), reparam.ECB(4, 4))
    with pytest.raises(ValueError, match=r"^2: .*online.*no block was changed"):
        reparam.set_mode(net, "online")
    assert [b.mode for b in net] == ["branches"] * 4
    with pytest.raises(ValueError, match="mode"):
        reparam.set_mode(net, "deploy")
    reparam.set_mode(net[:2], "online")
    assert [b.mode for b in net] == ["online", "online", "branches", "branches"]
    erb = reparam.set_mode(reparam.ERB(4, 4), "online")
    assert erb.rrrb1.mode == erb.rrrb2.mode == "online"


class PlainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2, groups=2))
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=0)  # not 'same': cannot be represented
        self.squeeze = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.tail = nn.Conv2d(4, 12, 3, padding=1)
        self.up = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.tail(self.squeeze(self.down(self.body(self.head(x))))))


@pytest.mark.parametrize("vid,name,fixed", SINGLE_CONV_VARIANTS, ids=_ids(SINGLE_CONV_VARIANTS))
def test_repify_is_exact_and_fuses_back_to_the_original_keys(vid: str, name: str, fixed: dict) -> None:
    net = randomize(PlainNet().double(), 5).eval()
    x = torch.randn(1, 3, 15, 14, dtype=torch.float64)
    rep = reparam.repify(net, name, **fixed)
    assert not any(isinstance(m, RepBlock) for m in net.modules())  # input untouched
    converted = [n for n, m in rep.named_modules() if isinstance(m, RepBlock)]
    assert "down" not in converted and converted, f"{name} converted nothing"
    if reparam.get_block(name).allows_in_ne_out:
        assert "squeeze" in converted and not rep.squeeze.bias  # the bias-free conv: a bias-free block
    assert rel_err(rep.eval()(x), net(x)) <= 1e-10
    back = reparam.fuse_all(rep)
    assert rel_err(back(x), net(x)) <= 1e-10
    net.load_state_dict(back.state_dict(), strict=True)  # bias=False convs come back without a bias


def test_repify_keeps_a_conv_used_twice_shared() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1, dtype=torch.float64)
    net = nn.Sequential(conv, nn.ReLU(), conv)
    net.alias = conv  # and a third place, under another name
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    for include in (None, "2"):
        rep = reparam.repify(net, "ecb", include=include)
        assert isinstance(rep[0], reparam.ECB) and rep[0] is rep[2] is rep.alias
        assert rel_err(rep.eval()(x), net(x)) <= 1e-10
        back = reparam.fuse_all(rep)
        assert type(back[0]) is nn.Conv2d and back[0] is back[2] is back.alias


def test_repify_leaves_existing_blocks_alone() -> None:
    net = nn.Sequential(reparam.ECB(4, 4), nn.Conv2d(4, 4, 3, padding=1))
    rep = reparam.repify(net, "acb")
    assert type(rep[0]) is reparam.ECB and type(rep[1]) is reparam.ACB
    assert all(type(m.conv) is nn.Conv2d for m in rep[0].modules() if isinstance(m, reparam.ConvBN))


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
    back = reparam.fuse_all(rep)
    assert rel_err(back(x), rep(x)) <= 1e-10
    assert rel_err(rep(x), net(x)) > 0  # training really changed the function
    net.load_state_dict(back.state_dict(), strict=True)


def test_bias_free_bn_block_keeps_a_learnt_bias() -> None:
    """Rule: a bias=False block drops the bias only while it is exactly zero; a bias BN has learnt stays."""
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False, dtype=torch.float64)
    block = reparam.RepVGGBlock.from_conv(conv).eval()
    assert not block.fused_has_bias and block.fuse().bias is None
    with torch.no_grad():
        block.conv_kxk.bn.bias.add_(0.5)
    assert block.fused_has_bias
    fused = block.fuse()
    assert fused.bias is not None and torch.allclose(fused.bias, torch.full((4,), 0.5, dtype=torch.float64))
