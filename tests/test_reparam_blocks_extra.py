"""Block-specific properties of DBB, RepConv, ACB, RepVGGBlock, MobileOneBlock, RepLKConv and EDBB.

Fused vs. unfused (eval, random BN statistics), online vs. branches (outputs and gradients),
``from_conv`` exactness, independent reference forwards written with plain ``F.conv2d`` /
``F.avg_pool2d`` (zeros padding), and every invalid configuration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reparam
from reparam import ACB, DBB, EDBB, MobileOneBlock, RepConv, RepLKConv, RepVGGBlock
from reparam.base import PADDING_MODES

NAMES = ["dbb", "repconv", "acb", "repvgg", "mobileone", "replk", "edbb"]
BN_BLOCKS = {"dbb", "acb", "repvgg", "mobileone", "replk"}


# ---------------------------------------------------------------------------------------------- configs
@dataclass
class Config:
    name: str
    cin: int
    cout: int
    k: int
    stride: int
    dilation: int
    groups: int
    bias: bool
    padding_mode: str
    options: dict[str, Any]
    hw: tuple[int, int]
    seed: int

    def build(self, dtype: torch.dtype = torch.float64) -> reparam.RepBlock:
        cls = reparam.get_block(self.name)
        block = cls(self.cin, self.cout, self.k, self.stride, self.dilation, self.groups, self.bias,
                    self.padding_mode, **self.options)
        return block.to(dtype)


def _options(draw: Callable, name: str, k: int, bn: bool | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if name in BN_BLOCKS:
        opts["bn"] = draw(st.booleans()) if bn is None else bn
    if name in ("dbb", "repconv") and draw(st.booleans()):
        opts["internal_channels"] = None  # replaced by a multiple of groups in `configs`
    if name == "mobileone":
        opts["num_branches"] = draw(st.integers(1, 3))
    if name in ("repvgg", "mobileone"):
        opts["use_identity"] = draw(st.sampled_from([None, False]))
    if name == "replk":
        opts["small_kernel"] = draw(st.sampled_from([s for s in (1, 3, 5) if s < k]))
    if name == "edbb":
        opts["with_idt"] = draw(st.sampled_from([None, False]))
        opts["depth_multiplier"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
        if k == 1:
            opts["edges"] = ()
        else:
            opts["edges"] = draw(st.sampled_from([("sobel_x", "sobel_y", "laplacian"), ("laplacian",), ()]))
    return opts


@st.composite
def configs(draw: Callable, name: str, bn: bool | None = None) -> Config:
    """A random valid geometry for block ``name`` (``bn`` fixes the BN option when given)."""
    kind = draw(st.sampled_from(["one", "two", "depthwise"]))
    if kind == "depthwise":
        groups = cin = cout = draw(st.integers(2, 4))
    else:
        groups = 1 if kind == "one" else 2
        cin = groups * draw(st.integers(1, 3))
        cout = cin if draw(st.booleans()) else groups * draw(st.integers(1, 3))
    kernels = (3, 5, 7) if name == "replk" else (1, 3, 5)
    k = draw(st.sampled_from(kernels))
    dilation = draw(st.sampled_from([1, 2]))
    pad = dilation * (k - 1) // 2
    hw = (draw(st.integers(max(7, pad + 1), max(13, pad + 3))), draw(st.integers(max(7, pad + 1), max(13, pad + 3))))
    options = _options(draw, name, k, bn)
    if "internal_channels" in options:
        options["internal_channels"] = groups * draw(st.integers(1, 3))
    return Config(name, cin, cout, k, draw(st.sampled_from([1, 2])), dilation, groups, draw(st.booleans()),
                  draw(st.sampled_from(PADDING_MODES)), options, hw, draw(st.integers(0, 2**31 - 1)))


def randomize(block: nn.Module, seed: int) -> nn.Module:
    """Random parameters and random BatchNorm running statistics (so folding is really exercised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) * 1.5 + 0.5)
    return block


def make_input(cfg: Config, dtype: torch.dtype = torch.float64, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randn(batch, cfg.cin, *cfg.hw, generator=gen, dtype=torch.float64).to(dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    assert a.shape == b.shape
    return (a - b).abs().max().item(), max(1.0, a.abs().max().item())


def assert_fused_equal(cfg: Config, dtype: torch.dtype) -> None:
    block = randomize(cfg.build(dtype), cfg.seed).eval()
    x = make_input(cfg, dtype)
    with torch.no_grad():
        y = block(x)
        fused = block.fuse()
        y_fused = fused(x)
    assert isinstance(fused, nn.Conv2d)
    assert (fused.bias is not None) == block.fused_has_bias
    assert fused.weight.dtype == dtype
    err, scale = max_err(y, y_fused)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert err <= tol * scale, f"{cfg}: fused differs by {err} (scale {scale})"


# --------------------------------------------------------------------------------- fused vs unfused
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15)
@given(data=st.data())
def test_fused_equals_branches_float64(name: str, data: st.DataObject) -> None:
    assert_fused_equal(data.draw(configs(name)), torch.float64)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6)
@given(data=st.data())
def test_fused_equals_branches_float32(name: str, data: st.DataObject) -> None:
    assert_fused_equal(data.draw(configs(name)), torch.float32)


# -------------------------------------------------------------------------------- online vs branches
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8)
@given(data=st.data())
def test_online_matches_branches_outputs_and_gradients(name: str, data: st.DataObject) -> None:
    cfg = data.draw(configs(name, bn=False))
    block = randomize(cfg.build(), cfg.seed).train()
    assert not block.has_batchnorm()
    x = make_input(cfg)
    target = torch.randn(block(x).shape, generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float64)

    def run(mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        block.set_mode(mode)
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        (y * target).sum().backward()
        grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
        return y.detach(), grads, xi.grad

    y_b, g_b, gx_b = run("branches")
    y_o, g_o, gx_o = run("online")
    err, scale = max_err(y_b, y_o)
    assert err <= 1e-10 * scale
    assert gx_b is not None and gx_o is not None
    assert (gx_b - gx_o).abs().max() <= 1e-10 * max(1.0, gx_b.abs().max().item())
    assert g_b.keys() == g_o.keys()
    assert g_b, "no parameter received a gradient"
    for n in g_b:
        assert (g_b[n] - g_o[n]).abs().max() <= 1e-10 * max(1.0, g_b[n].abs().max().item()), n


@pytest.mark.parametrize("name", sorted(BN_BLOCKS))
def test_bn_blocks_refuse_online(name: str) -> None:
    block = reparam.get_block(name)(4, 4)
    with pytest.raises(ValueError, match="bn=False"):
        block.set_mode("online")
    reparam.get_block(name)(4, 4, bn=False).set_mode("online")


def test_repconv_online_runs_a_single_conv(monkeypatch: pytest.MonkeyPatch) -> None:
    block = RepConv(4, 6, 3, groups=2, mode="online")
    assert block.mode == "online"
    calls = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    block(torch.randn(1, 4, 8, 8)).sum().backward()
    assert len(calls) == 1
    calls.clear()
    block.set_mode("branches")(torch.randn(1, 4, 8, 8))
    assert len(calls) == 6  # kxk, 1x1, seq 1x1 and kxk, avg 1x1 and the fixed average


def test_repconv_scales_are_per_branch_per_channel() -> None:
    block = randomize(RepConv(3, 5, 3).double(), 1).eval()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        for b in block.scales:
            block.scales[b].zero_()
        assert block(x).abs().max() == 0
        assert block.fused_kernel()[0].abs().max() == 0
        block.scales["1x1"][2] = 1.0
        y = block(x)
        ref = block.conv_1x1(x)
        assert torch.allclose(y[:, 2], ref[:, 2], atol=1e-12)
        assert y[:, [0, 1, 3, 4]].abs().max() == 0


# --------------------------------------------------------------------------------------- from_conv
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10)
@given(data=st.data())
def test_from_conv_is_exact(name: str, data: st.DataObject) -> None:
    cfg = data.draw(configs(name))
    gen = torch.Generator().manual_seed(cfg.seed)
    conv = nn.Conv2d(cfg.cin, cfg.cout, cfg.k, cfg.stride, cfg.dilation * (cfg.k - 1) // 2, cfg.dilation, cfg.groups,
                     bias=cfg.bias, padding_mode=cfg.padding_mode, dtype=torch.float64).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen, dtype=torch.float64))
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    cls = reparam.get_block(name)
    block = cls.from_conv(conv, **cfg.options)
    assert isinstance(block, cls) and not block.training
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in before.items()), "from_conv mutated the conv"
    x = make_input(cfg)
    with torch.no_grad():
        y = conv(x)
        for out in (block(x), block.fuse()(x)):
            err, scale = max_err(y, out)
            assert err <= 1e-12 * scale, f"{cfg}: from_conv off by {err}"


def test_from_conv_bn_fold_is_bitwise_exact() -> None:
    for dtype in (torch.float32, torch.float64):
        conv = nn.Conv2d(4, 6, 3, padding=1, dtype=dtype)
        for name in ("dbb", "acb", "repvgg", "mobileone", "replk"):
            w, b = reparam.get_block(name).from_conv(conv).eval().fused_kernel()
            assert torch.equal(w, conv.weight), name
            assert torch.equal(b, conv.bias), name


def test_repify_with_new_blocks_keeps_function() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2, groups=8),
                          nn.ReLU(), nn.Conv2d(8, 3, 1)).double().eval()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
        for name in NAMES:
            rep = reparam.repify(model, name)
            blocks = [m for m in rep.modules() if isinstance(m, reparam.get_block(name))]
            assert blocks, name
            assert (rep(x) - y).abs().max() <= 1e-12, name
            assert (reparam.fuse_all(rep)(x) - y).abs().max() <= 1e-12, name


# ------------------------------------------------------------------------------ reference forwards
def ref_unit(unit: reparam.ConvBN, x: torch.Tensor, padding: Any) -> torch.Tensor:
    """A ConvBN branch run with plain ``F.conv2d`` and its own zero padding."""
    c = unit.conv
    y = F.conv2d(x, c.weight, c.bias, c.stride, padding, c.dilation, c.groups)
    return unit.bn(y) if unit.bn is not None else y


def pad_with_response_to_zero(unit: reparam.ConvBN, t: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad a 1x1 branch's output with what the branch outputs for a zero pixel."""
    zero = torch.zeros(1, unit.conv.in_channels, 1, 1, dtype=t.dtype)
    border = ref_unit(unit, zero, 0).reshape(1, -1, 1, 1)
    return F.pad(t - border, [pad] * 4) + border


reference_geometry = st.tuples(
    st.sampled_from([(1, 4, 4), (1, 3, 5), (2, 4, 6), (4, 4, 4)]),  # groups, in, out
    st.sampled_from([3, 5]), st.sampled_from([1, 2]), st.booleans(), st.integers(0, 10**6),
)


@settings(max_examples=10)
@given(geo=reference_geometry, bn=st.booleans())
def test_dbb_matches_reference(geo: tuple, bn: bool) -> None:
    (g, cin, cout), k, s, bias, seed = geo
    block = randomize(DBB(cin, cout, k, s, groups=g, bias=bias, bn=bn).double(), seed).eval()
    x = torch.randn(2, cin, 9, 8, dtype=torch.float64)
    p = (k - 1) // 2
    with torch.no_grad():
        avg = F.avg_pool2d(pad_with_response_to_zero(block.avg_1x1, ref_unit(block.avg_1x1, x, 0), p), k, s)
        if bn:
            avg = block.avg_bn(avg)
        seq = ref_unit(block.seq_kxk, pad_with_response_to_zero(block.seq_1x1, ref_unit(block.seq_1x1, x, 0), p), 0)
        ref = ref_unit(block.conv_kxk, x, p) + ref_unit(block.conv_1x1, x, 0) + avg + seq
        err, scale = max_err(ref, block(x))
        assert err <= 1e-12 * scale
        assert max_err(ref, block.fuse()(x))[0] <= 1e-10 * scale


@settings(max_examples=10)
@given(geo=reference_geometry, bn=st.booleans(), d=st.sampled_from([1, 2]))
def test_acb_matches_reference(geo: tuple, bn: bool, d: int) -> None:
    (g, cin, cout), k, s, bias, seed = geo
    block = randomize(ACB(cin, cout, k, s, d, g, bias, bn=bn).double(), seed).eval()
    x = torch.randn(2, cin, 11, 10, dtype=torch.float64)
    p = d * (k - 1) // 2
    with torch.no_grad():
        ref = ref_unit(block.square, x, p) + ref_unit(block.hor, x, (0, p)) + ref_unit(block.ver, x, (p, 0))
        err, scale = max_err(ref, block(x))
        assert err <= 1e-12 * scale
        assert max_err(ref, block.fuse()(x))[0] <= 1e-10 * scale


@settings(max_examples=10)
@given(geo=reference_geometry, bn=st.booleans(), d=st.sampled_from([1, 2]), n=st.integers(1, 3))
def test_repvgg_and_mobileone_match_reference(geo: tuple, bn: bool, d: int, n: int) -> None:
    (g, cin, cout), k, s, bias, seed = geo
    x = torch.randn(2, cin, 9, 10, dtype=torch.float64)
    p = d * (k - 1) // 2
    identity = cin == cout and s == 1
    rv = randomize(RepVGGBlock(cin, cout, k, s, d, g, bias, bn=bn).double(), seed).eval()
    mo = randomize(MobileOneBlock(cin, cout, k, s, d, g, bias, num_branches=n, bn=bn).double(), seed).eval()
    assert rv.use_identity == identity and mo.use_identity == identity
    assert len(mo.conv_kxk) == n
    with torch.no_grad():
        idt = (rv.identity(x) if identity else 0)
        ref_rv = ref_unit(rv.conv_kxk, x, p) + ref_unit(rv.conv_1x1, x, 0) + idt
        idt = (mo.identity(x) if identity else 0)
        ref_mo = sum(ref_unit(u, x, p) for u in mo.conv_kxk) + ref_unit(mo.conv_scale, x, 0) + idt
        for block, ref in ((rv, ref_rv), (mo, ref_mo)):
            err, scale = max_err(ref, block(x))
            assert err <= 1e-12 * scale
            assert max_err(ref, block.fuse()(x))[0] <= 1e-10 * scale


@settings(max_examples=10)
@given(k=st.sampled_from([5, 7, 9]), small=st.sampled_from([1, 3]), d=st.sampled_from([1, 2]),
       s=st.sampled_from([1, 2]), bn=st.booleans(), depthwise=st.booleans(), seed=st.integers(0, 10**6))
def test_replk_matches_reference(k: int, small: int, d: int, s: int, bn: bool, depthwise: bool, seed: int) -> None:
    g, cin, cout = (4, 4, 4) if depthwise else (2, 4, 6)
    block = randomize(RepLKConv(cin, cout, k, s, d, g, small_kernel=small, bn=bn).double(), seed).eval()
    x = torch.randn(2, cin, 12, 11, dtype=torch.float64)
    with torch.no_grad():
        ref = ref_unit(block.large, x, d * (k - 1) // 2) + ref_unit(block.small, x, d * (small - 1) // 2)
        err, scale = max_err(ref, block(x))
        assert err <= 1e-12 * scale
        assert max_err(ref, block.fuse()(x))[0] <= 1e-10 * scale


def test_replk_large_kernel_depthwise_fuses() -> None:
    block = randomize(RepLKConv(6, 6, 13, groups=6, padding_mode="reflect").double(), 3).eval()
    assert block.small_kernel == 5 and block.padding == 6
    x = torch.randn(1, 6, 15, 14, dtype=torch.float64)
    with torch.no_grad():
        err, scale = max_err(block(x), block.fuse()(x))
    assert err <= 1e-10 * scale


def test_edbb_branch_list_and_identity() -> None:
    block = EDBB(4, 4)
    assert block.with_idt and block.edges == ("sobel_x", "sobel_y", "laplacian")
    assert isinstance(block.conv_1x1, reparam.ConvBN) and block.conv_1x1.conv.kernel_size == (1, 1)
    assert not EDBB(4, 6).with_idt and not EDBB(4, 4, stride=2).with_idt and not EDBB(4, 4, with_idt=False).with_idt
    # the identity branch adds exactly x; the 1x1 branch adds exactly conv_1x1(x)
    torch.manual_seed(0)
    a = randomize(EDBB(4, 4, groups=2).double(), 5).eval()
    b = EDBB(4, 4, groups=2, with_idt=False).double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert (a(x) - b(x) - x).abs().max() <= 1e-12
        ecb = reparam.ECB(4, 4, groups=2, with_idt=False).double().eval()
        ecb.load_state_dict({k: v for k, v in b.state_dict().items() if not k.startswith("conv_1x1.")})
        assert (b(x) - ecb(x) - b.conv_1x1(x)).abs().max() <= 1e-12


def test_dbb_default_internal_channels() -> None:
    assert DBB(4, 6).internal_channels == 4
    assert DBB(4, 4, groups=4).internal_channels == 8
    assert RepConv(4, 6).internal_channels == 6


def test_kernels_follow_parameter_dtype() -> None:
    for name in NAMES:
        block = reparam.get_block(name)(4, 4, 3, groups=2).double()
        w, b = block.fused_kernel()
        assert w.dtype == torch.float64 and b.dtype == torch.float64, name
        assert w.shape == (4, 2, 3, 3)


def test_bias_false_without_bn_fuses_without_bias() -> None:
    for name in NAMES:
        opts = {"bn": False} if name in BN_BLOCKS else {}
        block = reparam.get_block(name)(4, 4, 3, bias=False, **opts).eval()
        assert block.fuse().bias is None, name
        assert torch.equal(block.fused_kernel()[1], torch.zeros(4)), name
        with pytest.raises(ValueError, match="bias"), torch.no_grad():
            block.load_kernel(torch.randn(4, 4, 3, 3), torch.ones(4))


# ------------------------------------------------------------------------------------------ errors
ERROR_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("dbb groups", lambda: DBB(4, 6, groups=4), ValueError, "groups"),
    ("dbb internal", lambda: DBB(4, 4, groups=2, internal_channels=3), ValueError, "internal_channels"),
    ("dbb internal type", lambda: DBB(4, 4, internal_channels=2.0), TypeError, "internal_channels"),
    ("dbb bn type", lambda: DBB(4, 4, bn=1), TypeError, "bn"),
    ("dbb even", lambda: DBB(4, 4, 4, padding=1), ValueError, "kernel_size"),
    ("dbb padding", lambda: DBB(4, 4, 3, padding=2), ValueError, "padding"),
    ("dbb padding mode", lambda: DBB(4, 4, padding_mode="mirror"), ValueError, "padding_mode"),
    ("repconv internal", lambda: RepConv(4, 4, groups=2, internal_channels=5), ValueError, "internal_channels"),
    ("repconv mode", lambda: RepConv(4, 4, mode="fused"), ValueError, "mode"),
    ("repconv groups", lambda: RepConv(3, 4, groups=2), ValueError, "groups"),
    ("acb bn", lambda: ACB(4, 4, bn="yes"), TypeError, "bn"),
    ("acb groups", lambda: ACB(6, 4, groups=4), ValueError, "groups"),
    ("repvgg identity in!=out", lambda: RepVGGBlock(4, 6, use_identity=True), ValueError, "use_identity"),
    ("repvgg identity stride", lambda: RepVGGBlock(4, 4, stride=2, use_identity=True), ValueError, "use_identity"),
    ("repvgg identity type", lambda: RepVGGBlock(4, 4, use_identity=1), TypeError, "use_identity"),
    ("mobileone branches", lambda: MobileOneBlock(4, 4, num_branches=0), ValueError, "num_branches"),
    ("mobileone branches type", lambda: MobileOneBlock(4, 4, num_branches=1.5), TypeError, "num_branches"),
    ("mobileone identity", lambda: MobileOneBlock(4, 4, stride=2, use_identity=True), ValueError, "use_identity"),
    ("replk small >= big", lambda: RepLKConv(4, 4, 5, small_kernel=5), ValueError, "small_kernel"),
    ("replk small > big", lambda: RepLKConv(4, 4, 5, small_kernel=7), ValueError, "small_kernel"),
    ("replk small even", lambda: RepLKConv(4, 4, 7, small_kernel=4), ValueError, "small_kernel"),
    ("replk small type", lambda: RepLKConv(4, 4, 7, small_kernel=3.0), TypeError, "small_kernel"),
    ("replk kernel 1", lambda: RepLKConv(4, 4, 1), ValueError, "kernel_size"),
    ("replk groups", lambda: RepLKConv(4, 6, 7, groups=4), ValueError, "groups"),
    ("edbb identity in!=out", lambda: EDBB(4, 6, with_idt=True), ValueError, "with_idt"),
    ("edbb identity stride", lambda: EDBB(4, 4, stride=2, with_idt=True), ValueError, "with_idt"),
    ("edbb sobel k=1", lambda: EDBB(4, 4, 1), ValueError, "kernel_size"),
    ("edbb unknown edge", lambda: EDBB(4, 4, edges=("prewitt",)), ValueError, "edges"),
    ("edbb multiplier", lambda: EDBB(4, 4, depth_multiplier=0), ValueError, "depth_multiplier"),
    ("edbb groups", lambda: EDBB(4, 6, groups=3), ValueError, "groups"),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_invalid_configurations_raise(case: tuple) -> None:
    _, make, exc, word = case
    with pytest.raises(exc, match=word):
        make()


@pytest.mark.parametrize("name", ["repvgg", "mobileone"])
def test_identity_blocks_from_conv_accept_in_ne_out(name: str) -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    block = reparam.get_block(name).from_conv(conv).eval()
    assert not block.use_identity
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert (block(x) - conv(x)).abs().max() <= 1e-12
