"""Unit and property tests of the kernel algebra (reparam.kernels) against the nn modules it stands for.

Hypothesis draws the shapes and the tensors' values (``tensors``), not a seed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from reparam import kernels as K

torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def tensors(*shape: int, lo: float = -2.0, hi: float = 2.0) -> st.SearchStrategy[torch.Tensor]:
    """A float64 tensor of ``shape`` whose values hypothesis draws (and shrinks)."""
    return arrays(np.float64, shape, elements=st.floats(lo, hi, allow_nan=False)).map(torch.from_numpy)


@given(c=st.integers(1, 6), o=st.integers(1, 6), k=st.sampled_from([1, 3, 5]), bias=st.booleans(), data=st.data())
def test_fold_bn_equals_conv_then_bn(c: int, o: int, k: int, bias: bool, data: st.DataObject) -> None:
    conv = nn.Conv2d(c, o, k, padding=k // 2, bias=bias).double()
    bn = nn.BatchNorm2d(o).double().eval()
    with torch.no_grad():
        conv.weight.copy_(data.draw(tensors(o, c, k, k)))
        if bias:
            conv.bias.copy_(data.draw(tensors(o)))
        bn.running_mean.copy_(data.draw(tensors(o)))
        bn.running_var.copy_(data.draw(tensors(o, lo=0.05, hi=3.0)))
        bn.weight.copy_(data.draw(tensors(o)))
        bn.bias.copy_(data.draw(tensors(o)))
    x = data.draw(tensors(2, c, data.draw(st.integers(3, 9)), data.draw(st.integers(3, 9))))
    w, b = K.fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    assert rel_err(F.conv2d(x, w, b, padding=k // 2), bn(conv(x))) <= 1e-12


def test_fold_bn_without_affine() -> None:
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    bn = nn.BatchNorm2d(4, affine=False).double().eval()
    bn.running_var.fill_(2.0)
    fw, fb = K.fold_bn(w, None, bn.running_mean, bn.running_var, None, None, bn.eps)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    assert rel_err(F.conv2d(x, fw, fb, padding=1), bn(F.conv2d(x, w, padding=1))) <= 1e-12


@given(k_small=st.sampled_from([1, 3]), k_big=st.sampled_from([3, 5, 7]), dil=st.integers(1, 3),
       stride=st.integers(1, 2), data=st.data())
def test_padded_small_kernel_equals_small_conv(k_small: int, k_big: int, dil: int, stride: int,
                                               data: st.DataObject) -> None:
    if k_small > k_big:
        k_small = k_big
    w = data.draw(tensors(3, 2, k_small, k_small))
    x = data.draw(tensors(1, 2, data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))))
    small = F.conv2d(x, w, stride=stride, padding=dil * (k_small // 2), dilation=dil)
    big = F.conv2d(x, K.pad_kernel(w, k_big), stride=stride, padding=dil * (k_big // 2), dilation=dil)
    assert rel_err(big, small) <= 1e-12


def test_pad_kernel_errors() -> None:
    w = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ValueError, match="size"):
        K.pad_kernel(w, 1)
    with pytest.raises(ValueError, match="size"):
        K.pad_kernel(w, 4)


@given(groups=st.sampled_from([1, 2, 3]), cpg=st.integers(1, 3), opg=st.integers(1, 3), data=st.data())
def test_dense_grouped_round_trip_and_conv(groups: int, cpg: int, opg: int, data: st.DataObject) -> None:
    w = data.draw(tensors(groups * opg, cpg, 3, 3))
    dense = K.to_dense(w, groups)
    assert dense.shape == (groups * opg, groups * cpg, 3, 3)
    assert torch.equal(K.to_grouped(dense, groups), w)
    x = data.draw(tensors(1, groups * cpg, data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))))
    assert rel_err(F.conv2d(x, dense, padding=1), F.conv2d(x, w, padding=1, groups=groups)) <= 1e-12


@given(cin=st.integers(1, 5), mid=st.integers(1, 6), cout=st.integers(1, 5), k=st.sampled_from([3, 5]),
       stride=st.integers(1, 2), dil=st.integers(1, 2), data=st.data())
def test_merge_1x1_then_kxk_is_exact_with_bias_padding(cin, mid, cout, k, stride, dil, data) -> None:
    w1 = data.draw(tensors(mid, cin, 1, 1))
    b1 = data.draw(tensors(mid, lo=-6.0, hi=6.0))
    w2 = data.draw(tensors(cout, mid, k, k))
    b2 = data.draw(tensors(cout))
    x = data.draw(tensors(2, cin, data.draw(st.integers(1, 10)), data.draw(st.integers(1, 10))))
    p = dil * (k // 2)
    t = F.conv2d(x, w1, b1)
    t_bias_padded = F.pad(t - b1.view(1, -1, 1, 1), [p] * 4) + b1.view(1, -1, 1, 1)
    ref = F.conv2d(t_bias_padded, w2, b2, stride=stride, dilation=dil)
    w, b = K.merge_sequential((w1, b1), (w2, b2))
    fused = F.conv2d(x, w, b, stride=stride, padding=p, dilation=dil)
    assert rel_err(fused, ref) <= 1e-12
    # Zero-padding the 1x1 output instead (a common mistake) breaks the border whenever the border sees the bias.
    ref_zero_pad = F.conv2d(t, w2, b2, stride=stride, padding=p, dilation=dil)
    assume(rel_err(ref_zero_pad, ref) > 1e-6)
    assert rel_err(fused, ref_zero_pad) > 1e-6


@given(groups=st.sampled_from([1, 2]), cpg=st.integers(1, 3), opg=st.integers(1, 3), data=st.data())
def test_merge_kxk_then_1x1(groups: int, cpg: int, opg: int, data: st.DataObject) -> None:
    c = groups * cpg
    w1 = data.draw(tensors(c, cpg, 3, 3))
    b1 = data.draw(tensors(c))
    w2 = data.draw(tensors(groups * opg, cpg, 1, 1))
    b2 = data.draw(tensors(groups * opg))
    x = data.draw(tensors(1, c, data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))))
    ref = F.conv2d(F.conv2d(x, w1, b1, padding=1, groups=groups), w2, b2, groups=groups)
    w, b = K.merge_sequential((w1, b1), (w2, b2), groups, groups, groups)
    assert rel_err(F.conv2d(x, w, b, padding=1, groups=groups), ref) <= 1e-12


def test_merge_sequential_needs_a_1x1() -> None:
    w = torch.zeros(2, 2, 3, 3)
    with pytest.raises(ValueError, match="1x1"):
        K.merge_sequential((w, None), (w, None))
    with pytest.raises(ValueError, match="channel"):
        K.merge_sequential((torch.zeros(3, 2, 1, 1), None), (w, None))


@given(channels=st.sampled_from([2, 4, 6]), groups=st.sampled_from([1, 2]), k=st.sampled_from([1, 3, 5]),
       data=st.data())
def test_identity_and_avg_kernels(channels: int, groups: int, k: int, data: st.DataObject) -> None:
    x = data.draw(tensors(1, channels, data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))))
    w, b = K.identity_kernel(channels, groups, k, like=x)
    assert w.dtype == torch.float64
    assert torch.equal(F.conv2d(x, w, b, padding=k // 2, groups=groups), x)
    w, b = K.avg_kernel(channels, groups, k, like=x)
    ref = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=True)
    assert rel_err(F.conv2d(x, w, b, padding=k // 2, groups=groups), ref) <= 1e-12


@given(groups=st.sampled_from([1, 2, 3]), cpg=st.integers(1, 3), k=st.sampled_from([1, 3, 5]),
       times=st.integers(1, 2), data=st.data())
def test_subtract_identity_leaves_the_rest_for_the_branches(groups: int, cpg: int, k: int, times: int,
                                                            data: st.DataObject) -> None:
    c = groups * cpg
    w = data.draw(tensors(c, cpg, k, k))
    x = data.draw(tensors(1, c, data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))))
    rest = K.subtract_identity(w, groups, times)
    assert rest.shape == w.shape and not rest.requires_grad
    conv = lambda t, kern: F.conv2d(t, kern, padding=k // 2, groups=groups)  # noqa: E731
    assert rel_err(conv(x, rest) + times * x, conv(x, w)) <= 1e-12


def test_mask_kernel_and_scale() -> None:
    scale = torch.tensor([1.0, -2.0], dtype=torch.float64)
    w, b = K.mask_kernel(torch.tensor(K.SOBEL_X, dtype=torch.float64).view(1, 1, 3, 3), scale, None)
    assert w.shape == (2, 1, 3, 3) and torch.equal(b, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(w[1, 0], -2 * torch.tensor(K.SOBEL_X, dtype=torch.float64))
    sw, sb = K.scale_channels((w, torch.ones(2, dtype=torch.float64)), torch.tensor([3.0, 0.5], dtype=torch.float64))
    assert torch.equal(sw[0], 3 * w[0]) and torch.equal(sb, torch.tensor([3.0, 0.5], dtype=torch.float64))


def test_merge_parallel_sums_centred_branches() -> None:
    a = (torch.ones(1, 1, 3, 3), torch.tensor([1.0]))
    c = (torch.full((1, 1, 1, 1), 5.0), None)
    w, b = K.merge_parallel([a, c])
    assert w[0, 0, 1, 1] == 6 and w[0, 0, 0, 0] == 1 and b.item() == 1
    with pytest.raises(ValueError, match="kernels"):
        K.merge_parallel([])


def test_functions_do_not_modify_inputs() -> None:
    w = torch.randn(4, 2, 3, 3)
    b = torch.randn(4)
    w0, b0 = w.clone(), b.clone()
    K.fold_bn(w, b, torch.zeros(4), torch.ones(4), torch.ones(4), torch.zeros(4), 1e-5)
    K.merge_parallel([(w, b), (K.pad_kernel(torch.randn(4, 2, 1, 1), 3), None)])
    K.scale_channels((w, b), torch.full((4,), 2.0))
    assert torch.equal(w, w0) and torch.equal(b, b0)


# ------------------------------------------------------------------ compositions of two convs into one conv
BIAS_KINDS = ("none", "zeros", "random")


def drawn_bias(kind: str, n: int, data: st.DataObject) -> torch.Tensor | None:
    if kind == "none":
        return None
    return torch.zeros(n, dtype=torch.float64) if kind == "zeros" else data.draw(tensors(n, lo=-3.0, hi=3.0))


def scale_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max deviation relative to the output scale (max |ref|, at least 1: an all-zero output is compared absolutely)."""
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def conv_geometry(data: st.DataObject, k: int, mode: str) -> dict:
    """A drawn stride, dilation, padding (int or "same" at stride 1) and an input size the conv accepts (odd
    sizes included; reflect/circular need the padding below the input size)."""
    stride = data.draw(st.sampled_from([1, 2]), label="stride")
    dil = data.draw(st.sampled_from([1, 2]), label="dilation")
    padding = data.draw(st.sampled_from([0, 1, 2] + (["same"] if stride == 1 else [])), label="padding")
    span = dil * (k - 1) + 1
    size = st.integers(max(span, 3), span + 8)
    return dict(stride=stride, dilation=dil, padding=padding, padding_mode=mode,
                h=data.draw(size, label="h"), w=data.draw(size, label="w"))


def run_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, g: dict) -> torch.Tensor:
    conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[-2:]), stride=g["stride"], padding=g["padding"],
                     dilation=g["dilation"], bias=b is not None, padding_mode=g["padding_mode"]).to(w.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        if b is not None:
            conv.bias.copy_(b)
        return conv(x)


def pads_anything(g: dict, k: int) -> bool:
    return K.pads_input(g["padding"], (k, k))


@pytest.mark.parametrize("mode", PADDING_MODES)
@pytest.mark.parametrize("b1_kind", BIAS_KINDS)
@given(cin=st.integers(1, 5), mid=st.integers(1, 6), cout=st.integers(1, 5), k=st.sampled_from([1, 3, 5]),
       b2_kind=st.sampled_from(BIAS_KINDS), data=st.data())
def test_compose_1x1_then_conv_equals_the_two_convs(b1_kind, mode, cin, mid, cout, k, b2_kind, data) -> None:
    """Exact (float64 1e-10, float32 1e-5 of the output scale) or, for a nonzero bias before zero padding, refused."""
    g = conv_geometry(data, k, mode)
    w1, w2 = data.draw(tensors(mid, cin, 1, 1)), data.draw(tensors(cout, mid, k, k))
    b1, b2 = drawn_bias(b1_kind, mid, data), drawn_bias(b2_kind, cout, data)
    x = data.draw(tensors(2, cin, g["h"], g["w"]))
    call = lambda f, s: K.compose_1x1_then_conv(f, s, second_padding=g["padding"],  # noqa: E731
                                                second_padding_mode=g["padding_mode"])
    if b1_kind == "random" and g["padding_mode"] == "zeros" and pads_anything(g, k) and bool((b1 != 0).any()):
        with pytest.raises(ValueError, match="second_padding"):
            call((w1, b1), (w2, b2))
        return
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        t = lambda v: None if v is None else v.to(dtype)  # noqa: E731
        ref = run_conv(F.conv2d(t(x), t(w1), t(b1)), t(w2), t(b2), g)
        w, b = call((t(w1), t(b1)), (t(w2), t(b2)))
        assert w.shape == (cout, cin, k, k) and w.dtype == dtype and b.dtype == dtype
        assert scale_err(run_conv(t(x), w, b, g), ref) <= tol, dtype


@pytest.mark.parametrize("mode", PADDING_MODES)
@given(cin=st.integers(1, 5), mid=st.integers(1, 6), cout=st.integers(1, 5), k=st.sampled_from([1, 3, 5]),
       b1_kind=st.sampled_from(BIAS_KINDS), b2_kind=st.sampled_from(BIAS_KINDS), data=st.data())
def test_compose_conv_then_1x1_equals_the_two_convs(mode, cin, mid, cout, k, b1_kind, b2_kind, data) -> None:
    """Always exact: float64 to 1e-10 and float32 to 1e-5 of the output scale."""
    g = conv_geometry(data, k, mode)
    w1, w2 = data.draw(tensors(mid, cin, k, k)), data.draw(tensors(cout, mid, 1, 1))
    b1, b2 = drawn_bias(b1_kind, mid, data), drawn_bias(b2_kind, cout, data)
    x = data.draw(tensors(2, cin, g["h"], g["w"]))
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        t = lambda v: None if v is None else v.to(dtype)  # noqa: E731
        ref = F.conv2d(run_conv(t(x), t(w1), t(b1), g), t(w2), t(b2))
        w, b = K.compose_conv_then_1x1((t(w1), t(b1)), (t(w2), t(b2)))
        assert w.shape == (cout, cin, k, k) and w.dtype == dtype and b.dtype == dtype
        assert scale_err(run_conv(t(x), w, b, g), ref) <= tol, dtype


def test_compose_bias_before_zero_padding_is_really_not_one_conv() -> None:
    """The rejected case is rejected for a reason: the plain product is wrong exactly at the border."""
    w1, b1 = torch.ones(1, 1, 1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    w2 = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    ref = F.conv2d(F.conv2d(x, w1, b1), w2, padding=1)            # 4 at a corner, 9 inside
    w, b = K.merge_sequential((w1, b1), (w2, None))
    naive = F.conv2d(x, w, b, padding=1)                          # 9 everywhere
    assert ref[0, 0, 2, 2] == naive[0, 0, 2, 2] == 9 and ref[0, 0, 0, 0] == 4 != naive[0, 0, 0, 0]
    with pytest.raises(ValueError, match="second_padding"):
        K.compose_1x1_then_conv((w1, b1), (w2, None), second_padding=1)
    # the same pair is exact without padding, with a non-zero padding mode, or with a zero bias
    for kw in (dict(second_padding=0), dict(second_padding=1, second_padding_mode="replicate")):
        K.compose_1x1_then_conv((w1, b1), (w2, None), **kw)
    K.compose_1x1_then_conv((w1, torch.zeros(1, dtype=torch.float64)), (w2, None), second_padding="same")


@pytest.mark.parametrize("fn, first, second, kw, arg", [
    ("1x1_then_conv", (2, 3, 3, 3), (4, 2, 3, 3), {}, "first"),
    ("1x1_then_conv", (2, 3, 1, 1), (4, 2, 3, 3), dict(first_stride=2), "first_stride"),
    ("1x1_then_conv", (2, 3, 1, 1), (4, 2, 3, 3), dict(first_stride=(1, 2)), "first_stride"),
    ("1x1_then_conv", (2, 3, 1, 1), (4, 2, 3, 3), dict(first_padding=1), "first_padding"),
    ("1x1_then_conv", (2, 3, 1, 1), (4, 2, 3, 3), dict(first_groups=2), "first_groups"),
    ("1x1_then_conv", (2, 3, 1, 1), (4, 2, 3, 3), dict(second_groups=2), "second_groups"),
    ("1x1_then_conv", (2, 3, 1, 1), (4, 2, 3, 3), dict(second_padding_mode="mirror"), "second_padding_mode"),
    ("1x1_then_conv", (2, 3, 1, 1), (4, 5, 3, 3), {}, "channel"),
    ("conv_then_1x1", (2, 3, 3, 3), (4, 2, 3, 3), {}, "second"),
    ("conv_then_1x1", (2, 3, 3, 3), (4, 2, 1, 1), dict(second_stride=2), "second_stride"),
    ("conv_then_1x1", (2, 3, 3, 3), (4, 2, 1, 1), dict(second_padding=(0, 1)), "second_padding"),
    ("conv_then_1x1", (2, 3, 3, 3), (4, 2, 1, 1), dict(first_groups=3), "first_groups"),
    ("conv_then_1x1", (2, 3, 3, 3), (4, 2, 1, 1), dict(second_groups=2), "second_groups"),
])
def test_compose_rejects_what_is_not_exact(fn, first, second, kw, arg) -> None:
    compose = K.compose_1x1_then_conv if fn == "1x1_then_conv" else K.compose_conv_then_1x1
    with pytest.raises(ValueError, match=arg):
        compose((torch.zeros(first), None), (torch.zeros(second), None), **kw)


def test_pads_input() -> None:
    assert not K.pads_input(0, 3) and not K.pads_input((0, 0), (3, 3)) and not K.pads_input("valid", 5)
    assert K.pads_input((0, 1), 3) and K.pads_input("same", (1, 3)) and not K.pads_input("same", 1)
