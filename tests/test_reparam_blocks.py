"""Block-specific properties: independent reference forwards written with plain ``F.conv2d`` /
``F.avg_pool2d`` (zeros padding), the edge cases of each block's options, and every invalid configuration.

The generic contract (fused == branches in float64/float32, online == branches, ``from_conv``) is checked
for every block by the one generator in ``test_reparam_contract.py``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import reparam
from reparam import ACB, DBB, ECB, EDBB, MobileOneBlock, RepConv, RepLKConv, RepVGGBlock

NAMES = ["dbb", "repconv", "acb", "repvgg", "mobileone", "replk", "edbb"]
BN_BLOCKS = {"dbb", "acb", "repvgg", "mobileone", "replk"}


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


def max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    assert a.shape == b.shape
    return (a - b).abs().max().item(), max(1.0, a.abs().max().item())


def images(channels: int, h: int, w: int) -> st.SearchStrategy[torch.Tensor]:
    """A batch of 2 float64 images whose values hypothesis draws."""
    return arrays(np.float64, (2, channels, h, w), elements=st.floats(-3, 3, allow_nan=False)).map(torch.from_numpy)


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
def test_from_conv_bn_fold_is_bitwise_exact() -> None:
    for dtype in (torch.float32, torch.float64):
        conv = nn.Conv2d(4, 6, 3, padding=1, dtype=dtype)
        for name in ("dbb", "acb", "repvgg", "mobileone", "replk"):
            w, b = reparam.get_block(name).from_conv(conv).eval().fused_kernel()
            assert torch.equal(w, conv.weight), name
            assert torch.equal(b, conv.bias), name


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


@given(geo=reference_geometry, bn=st.booleans(), data=st.data())
def test_dbb_matches_reference(geo: tuple, bn: bool, data: st.DataObject) -> None:
    (g, cin, cout), k, s, bias, seed = geo
    block = randomize(DBB(cin, cout, k, s, groups=g, bias=bias, bn=bn).double(), seed).eval()
    x = data.draw(images(cin, data.draw(st.integers(5, 11)), data.draw(st.integers(5, 11))))
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


@given(geo=reference_geometry, bn=st.booleans(), d=st.sampled_from([1, 2]), data=st.data())
def test_acb_matches_reference(geo: tuple, bn: bool, d: int, data: st.DataObject) -> None:
    (g, cin, cout), k, s, bias, seed = geo
    block = randomize(ACB(cin, cout, k, s, d, g, bias, bn=bn).double(), seed).eval()
    x = data.draw(images(cin, data.draw(st.integers(5, 13)), data.draw(st.integers(5, 13))))
    p = d * (k - 1) // 2
    with torch.no_grad():
        ref = ref_unit(block.square, x, p) + ref_unit(block.hor, x, (0, p)) + ref_unit(block.ver, x, (p, 0))
        err, scale = max_err(ref, block(x))
        assert err <= 1e-12 * scale
        assert max_err(ref, block.fuse()(x))[0] <= 1e-10 * scale


@given(geo=reference_geometry, bn=st.booleans(), d=st.sampled_from([1, 2]), n=st.integers(1, 3), data=st.data())
def test_repvgg_and_mobileone_match_reference(geo: tuple, bn: bool, d: int, n: int, data: st.DataObject) -> None:
    (g, cin, cout), k, s, bias, seed = geo
    x = data.draw(images(cin, data.draw(st.integers(5, 12)), data.draw(st.integers(5, 12))))
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


@given(k=st.sampled_from([5, 7, 9]), small=st.sampled_from([1, 3]), d=st.sampled_from([1, 2]),
       s=st.sampled_from([1, 2]), bn=st.booleans(), depthwise=st.booleans(), seed=st.integers(0, 10**6),
       data=st.data())
def test_replk_matches_reference(k: int, small: int, d: int, s: int, bn: bool, depthwise: bool, seed: int,
                                 data: st.DataObject) -> None:
    g, cin, cout = (4, 4, 4) if depthwise else (2, 4, 6)
    block = randomize(RepLKConv(cin, cout, k, s, d, g, small_kernel=small, bn=bn).double(), seed).eval()
    x = data.draw(images(cin, data.draw(st.integers(5, 14)), data.draw(st.integers(5, 14))))
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
    assert block.use_identity and block.edges == ("sobel_x", "sobel_y", "laplacian")
    assert isinstance(block.conv_1x1, reparam.ConvBN) and block.conv_1x1.conv.kernel_size == (1, 1)
    assert not EDBB(4, 6).use_identity and not EDBB(4, 4, stride=2).use_identity
    assert not EDBB(4, 4, use_identity=False).use_identity
    # the identity branch adds exactly x; the 1x1 branch adds exactly conv_1x1(x)
    torch.manual_seed(0)
    a = randomize(EDBB(4, 4, groups=2).double(), 5).eval()
    b = EDBB(4, 4, groups=2, use_identity=False).double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert (a(x) - b(x) - x).abs().max() <= 1e-12
        ecb = reparam.ECB(4, 4, groups=2, use_identity=False).double().eval()
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
    ("dbb even", lambda: DBB(4, 4, 4, padding=1), ValueError, "kernel_size=4 is even"),
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
    ("edbb identity in!=out", lambda: EDBB(4, 6, use_identity=True), ValueError, "use_identity"),
    ("edbb identity stride", lambda: EDBB(4, 4, stride=2, use_identity=True), ValueError, "use_identity"),
    ("ecb identity in!=out", lambda: ECB(4, 8, use_identity=True), ValueError, "use_identity"),
    ("ecb identity stride", lambda: ECB(4, 4, stride=2, use_identity=True), ValueError, "use_identity"),
    ("ecb identity type", lambda: ECB(4, 4, use_identity="no"), TypeError, "use_identity"),
    ("edbb identity type", lambda: EDBB(4, 4, use_identity=0), TypeError, "use_identity"),
    ("mobileone identity type", lambda: MobileOneBlock(4, 4, use_identity="yes"), TypeError, "use_identity"),
    ("ecb old identity name", lambda: ECB(4, 4, with_idt=True), TypeError, "use_identity"),
    ("edbb old identity name", lambda: EDBB(4, 4, with_idt=False), TypeError, "use_identity"),
    ("ecb sobel k=1", lambda: ECB(4, 4, 1), ValueError, "kernel_size"),
    ("ecb multiplier bool", lambda: ECB(4, 4, depth_multiplier=True), ValueError, "depth_multiplier"),
    ("rrrb in!=out", lambda: reparam.RRRB(4, 8), ValueError, "in_channels == out_channels"),
    ("rrrb stride", lambda: reparam.RRRB(4, 4, stride=2), ValueError, "stride"),
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


# ------------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("out,dm,mid", [(25, 1.5, 37), (50, 2.0, 100), (16, 0.9, 14), (10, 1.25, 12)])
def test_ecb_hidden_width_is_int_of_out_times_multiplier_as_in_ecbsr(out: int, dm: float, mid: int) -> None:
    """ECBSR's own code uses ``int(out_planes * depth_multiplier)``: the same width, so its checkpoints load."""
    for cls in (ECB, EDBB):
        block = cls(out, out, depth_multiplier=dm)
        assert block.expand.conv.out_channels == mid and block.expand_kxk.conv.in_channels == mid
    assert ECB(12, 12, groups=4, depth_multiplier=1.5).expand.conv.out_channels == 16  # 18 -> multiple of 4


def test_identity_option_has_one_name_and_one_meaning() -> None:
    for cls in (ECB, EDBB, RepVGGBlock, MobileOneBlock):
        assert cls(4, 4, use_identity=None).use_identity            # None: whenever it exists
        assert not cls(4, 6, use_identity=None).use_identity
        assert not cls(4, 4, stride=2, use_identity=None).use_identity
        assert cls(4, 4, use_identity=True).use_identity
        assert not cls(4, 4, use_identity=False).use_identity
        with pytest.raises(ValueError, match="use_identity"):
            cls(4, 6, use_identity=True)
        with pytest.raises(TypeError, match="use_identity"):
            cls(4, 4, use_identity=1)
        with pytest.raises(TypeError, match="with_idt.*use_identity"):
            cls(4, 4, with_idt=True)
    assert not ECB(4, 4).use_identity                              # ECBSR's default: no identity
    assert EDBB(4, 4).use_identity and RepVGGBlock(4, 4).use_identity and MobileOneBlock(4, 4).use_identity


def test_dbb_training_mode_border_uses_batch_statistics() -> None:
    """Documented deviation: in training mode the 1x1-BN border is the BN's response to a zero pixel with the
    batch statistics (those the interior is normalised with); in eval mode, with the running statistics."""
    torch.manual_seed(0)
    block = randomize(DBB(3, 4, 3, bias=True).double(), 2).train()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    unit = block.seq_1x1
    t = unit.conv(x)
    var, mean = torch.var_mean(t, dim=(0, 2, 3), unbiased=False)
    bn = unit.bn
    inv = bn.weight / torch.sqrt(var + bn.eps)
    assert unit.conv.bias is None  # conv-BN: a zero pixel gives a zero conv output
    border_batch = (0 - mean) * inv + bn.bias
    padded = unit.forward_padded(x, 1, "zeros")
    assert torch.allclose(padded[:, :, 0, 0], border_batch.expand(2, -1), atol=1e-12)
    inv_run = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    border_running = (0 - bn.running_mean) * inv_run + bn.bias
    assert not torch.allclose(border_batch, border_running)
    block.eval()
    padded = unit.forward_padded(x, 1, "zeros")
    assert torch.allclose(padded[:, :, 0, 0], border_running.expand(2, -1), atol=1e-12)


@pytest.mark.parametrize("name", sorted(set(reparam.BLOCKS) - {"erb"}))
def test_load_kernel_switches_every_other_branch_off(name: str) -> None:
    """``load_kernel`` (derived from the branch declaration): the block equals the conv, exactly, and every
    non-main branch outputs zero."""
    cls = reparam.get_block(name)
    kw = {"kernel_size": 5} if name == "replk" else {}
    block = randomize(cls(4, 4, **kw).double(), 4).eval()
    w = torch.randn(4, 4, block.kernel_size, block.kernel_size, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    with torch.no_grad():
        block.load_kernel(w, b)
        fw, fb = block.fused_kernel()
    assert torch.allclose(fw, w, atol=1e-12) and torch.allclose(fb, b, atol=1e-12)
    if name == "rrrb":
        return
    from reparam.base import ChannelVector
    for br in block.branches():
        if br.main or not br.units:
            continue
        for u in br.tail:
            if isinstance(u, ChannelVector) and u.neutral == 0.0:
                assert not u.param.any()


def test_rrrb_bias_free_rejects_a_bias() -> None:
    block = reparam.RRRB(4, 4, bias=False).double()
    with pytest.raises(ValueError, match="bias"), torch.no_grad():
        block.load_kernel(torch.randn(4, 4, 3, 3, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
