"""Property tests for decompose: Tucker-2 convs, rank selection, model-level decomposition, recompose."""
from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from decompose import (RankError, TuckerConv, TuckerReport, conv_params, evbmf_rank, ranks_for_fraction,
                       recompose, recompose_model, tucker_conv, tucker_model, tucker_params)


def seeded_conv(cin: int, cout: int, k=3, seed: int = 0, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, **kw)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def weight_error(conv: nn.Conv2d, seq: nn.Sequential) -> float:
    return rel(recompose(seq).weight.double(), conv.weight.double())


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


geometry = st.fixed_dictionaries({
    "cin": st.integers(1, 12), "cout": st.integers(1, 12), "k": st.sampled_from([1, 3, (1, 3), 5]),
    "stride": st.sampled_from([1, 2]), "padding": st.sampled_from([0, 1, 2]), "dilation": st.sampled_from([1, 2]),
    "bias": st.booleans(), "padding_mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    "seed": st.integers(0, 1000),
})


def make(g: dict) -> nn.Conv2d:
    return seeded_conv(g["cin"], g["cout"], g["k"], g["seed"], stride=g["stride"], padding=g["padding"],
                       dilation=g["dilation"], bias=g["bias"], padding_mode=g["padding_mode"])


# ---------------------------------------------------------------------------------------------- tucker_conv
@settings(max_examples=25)
@given(geometry)
def test_full_rank_reproduces_the_conv(g):
    conv = make(g)
    seq = tucker_conv(conv, (g["cout"], g["cin"]))
    assert isinstance(seq, nn.Sequential) and len(seq) == 3
    assert weight_error(conv, seq) <= 1e-5
    torch.manual_seed(g["seed"])
    x = torch.randn(2, g["cin"], 21, 23)
    with torch.no_grad():
        y, z = conv(x), seq(x)
    assert z.shape == y.shape
    assert rel(z, y) <= 1e-5


@settings(max_examples=20)
@given(geometry, st.data())
def test_parameter_counts_are_exact(g, data):
    conv = make(g)
    r_out = data.draw(st.integers(1, g["cout"]))
    r_in = data.draw(st.integers(1, g["cin"]))
    seq = tucker_conv(conv, (r_out, r_in))
    kh, kw = conv.kernel_size
    expected = g["cin"] * r_in + r_in * r_out * kh * kw + r_out * g["cout"] + (g["cout"] if g["bias"] else 0)
    assert n_params(seq) == expected == tucker_params(g["cout"], g["cin"], kh, kw, g["bias"], r_out, r_in)
    assert seq.ranks == (r_out, r_in)
    assert [m.weight.shape for m in seq] == [(r_in, g["cin"], 1, 1), (r_out, r_in, kh, kw), (g["cout"], r_out, 1, 1)]
    assert seq[0].bias is None and seq[1].bias is None and (seq[2].bias is not None) == g["bias"]
    if g["bias"]:
        assert torch.equal(seq[2].bias, conv.bias)


@settings(max_examples=20)
@given(geometry, st.data())
def test_recompose_equals_the_sequence(g, data):
    conv = make(g)
    seq = tucker_conv(conv, (data.draw(st.integers(1, g["cout"])), data.draw(st.integers(1, g["cin"]))))
    fused = recompose(seq)
    assert isinstance(fused, nn.Conv2d)
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode", "in_channels", "out_channels"):
        assert getattr(fused, attr) == getattr(conv, attr), attr
    torch.manual_seed(1)
    x = torch.randn(2, g["cin"], 22, 20)
    with torch.no_grad():
        a, b = fused(x), seq(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()) + 1e-7)


@pytest.mark.parametrize("kw", [dict(stride=2, padding=0), dict(stride=2, padding=1), dict(dilation=2, padding=2),
                                dict(dilation=3, padding=0, stride=2), dict(padding="same"),
                                dict(padding=1, padding_mode="reflect")])
def test_geometry_is_kept(kw):
    conv = seeded_conv(8, 6, 3, seed=3, **kw)
    seq = tucker_conv(conv, 0.6)
    core = seq[1]
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(core, attr) == getattr(conv, attr), attr
    for pw in (seq[0], seq[2]):
        assert pw.kernel_size == (1, 1) and pw.stride == (1, 1) and pw.padding == (0, 0)
    x = torch.randn(1, 8, 17, 13)
    with torch.no_grad():
        assert seq(x).shape == conv(x).shape
        full = tucker_conv(conv, (6, 8))
        assert rel(full(x), conv(x)) <= 1e-5


def test_error_falls_as_rank_grows():
    conv = seeded_conv(20, 24, 3, seed=5)
    errs = [weight_error(conv, tucker_conv(conv, (min(r + 4, 24), r))) for r in range(1, 21)]
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 0.5 and errs[-1] <= 1e-5
    frac_errs = [weight_error(conv, tucker_conv(conv, f)) for f in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert all(b < a for a, b in zip(frac_errs, frac_errs[1:])), frac_errs


def test_planted_tucker_structure_is_recovered_exactly():
    rng = np.random.default_rng(0)
    core = rng.standard_normal((5, 4, 3, 3))
    u_out, u_in = rng.standard_normal((16, 5)), rng.standard_normal((12, 4))
    w = np.einsum("abhw,oa,ib->oihw", core, u_out, u_in)
    conv = nn.Conv2d(12, 16, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
    assert weight_error(conv, tucker_conv(conv, (5, 4))) <= 1e-5
    assert weight_error(conv, tucker_conv(conv, (4, 4))) > 1e-3
    assert tucker_conv(conv, energy=0.999999).ranks == (5, 4)
    # EVBMF finds the planted ranks once a little noise is added
    noisy = w + 0.01 * rng.standard_normal(w.shape)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(noisy))
    assert tucker_conv(conv, "vbmf").ranks == (5, 4)


def test_vbmf_rank_on_low_rank_plus_noise_and_clamp():
    rng = np.random.default_rng(1)
    for true_rank in (1, 3, 7):
        y = (rng.standard_normal((30, true_rank)) @ rng.standard_normal((true_rank, 90))
             + 0.1 * rng.standard_normal((30, 90)))
        assert evbmf_rank(y) == true_rank
        assert evbmf_rank(y.T) == true_rank
    assert evbmf_rank(0.1 * rng.standard_normal((30, 90))) == 0  # pure noise: nothing above the threshold
    conv = nn.Conv2d(10, 10, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(0.1 * rng.standard_normal((10, 10, 3, 3))))
    assert tucker_conv(conv, "vbmf").ranks == (1, 1)  # clamped to at least 1
    with pytest.raises(ValueError):
        evbmf_rank(np.full((3, 4), np.nan))


def test_energy_ranks_grow_with_energy():
    conv = seeded_conv(16, 16, 3, seed=7)
    ranks = [tucker_conv(conv, energy=e).ranks for e in (0.3, 0.6, 0.9, 1.0)]
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(ranks, ranks[1:]))
    assert ranks[-1] == (16, 16) and ranks[0] < (16, 16)


@settings(max_examples=30)
@given(st.integers(2, 64), st.integers(2, 64), st.sampled_from([1, 3, 5]), st.booleans(),
       st.floats(0.05, 1.0))
def test_float_rank_keeps_about_that_fraction(cout, cin, k, bias, f):
    r_out, r_in = ranks_for_fraction(cout, cin, k, k, bias, f)
    assert 1 <= r_out <= cout and 1 <= r_in <= cin
    before = conv_params(cout, cin, k, k, bias)
    after = tucker_params(cout, cin, k, k, bias, r_out, r_in)
    if tucker_params(cout, cin, k, k, bias, 1, 1) <= f * before:
        assert after <= f * before + 1e-6
        # no larger balanced pair fits: growing both ranks by one step in the ratio would exceed the budget
        bigger = (min(cout, r_out + max(1, round(cout / cin))), min(cin, r_in + max(1, round(cin / cout))))
        if bigger != (r_out, r_in):
            assert tucker_params(cout, cin, k, k, bias, *bigger) > f * before
    else:
        assert (r_out, r_in) == (1, 1)


@pytest.mark.parametrize("rank", [0, (0, 3), (3, 0), (7, 1), (1, 9), -1, 0.0, -0.5, 1.5, float("nan"),
                                  "tucker", "", (1, 2, 3), [2], (1.0, 2), (True, 2), True, None, b"vbmf", {}])
def test_bad_ranks_raise_value_error(rank):
    conv = seeded_conv(8, 6, 3)
    with pytest.raises(ValueError):
        tucker_conv(conv, rank)


def test_wrong_rank_types_are_also_type_errors_and_bad_energy_raises():
    conv = seeded_conv(8, 6, 3)
    for rank in ("tucker", (1.0, 2), [1, 2, 3], object()):
        with pytest.raises(RankError) as info:
            tucker_conv(conv, rank)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    for energy in (0.0, 1.5, -1.0, "0.9", True):
        with pytest.raises(ValueError, match="energy"):
            tucker_conv(conv, energy=energy)
    with pytest.raises(ValueError, match="not both"):
        tucker_conv(conv, 0.5, energy=0.5)


def test_non_convs_and_grouped_convs_are_rejected():
    with pytest.raises(TypeError, match="conv"):
        tucker_conv(nn.Linear(3, 3), 0.5)
    with pytest.raises(TypeError, match="conv"):
        tucker_conv(nn.ConvTranspose2d(4, 4, 3), 0.5)
    with pytest.raises(ValueError, match="groups"):
        tucker_conv(nn.Conv2d(8, 8, 3, groups=2), 0.5)


def test_tensorly_backend_is_never_changed():
    manager = __import__("sys").modules["tensorly.backend"]
    before = tl.get_backend()
    try:
        tl.set_backend("pytorch")
        tucker_conv(seeded_conv(6, 6, 3), 0.5)
        assert tl.get_backend() == "pytorch"
        tucker_model(nn.Sequential(seeded_conv(16, 16, 3)), 0.5, progress=False)
        assert tl.get_backend() == "pytorch"
        assert manager._default_backend == "pytorch"
        # a thread with its own (thread-local) backend keeps it, and the process default is untouched
        seen = {}

        def worker():
            tl.set_backend("numpy", local_threadsafe=True)
            tucker_conv(seeded_conv(6, 6, 3), 0.5)
            seen["thread"] = tl.get_backend()
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert seen["thread"] == "numpy" and tl.get_backend() == "pytorch"
        # tensorly.backend_context would have promoted the thread's numpy backend to the process default here
        assert manager._default_backend == "pytorch" and manager._backend.backend_name == "pytorch"
        assert "backend" in manager._THREAD_LOCAL_DATA.__dict__  # set_backend above set this thread's entry
    finally:
        tl.set_backend(before)
    assert tl.get_backend() == before


def test_conv_is_not_modified_and_dtype_is_kept():
    conv = seeded_conv(8, 8, 3, padding=1).double()
    state = copy.deepcopy(conv.state_dict())
    seq = tucker_conv(conv, 0.5)
    assert all(torch.equal(state[k], v) for k, v in conv.state_dict().items())
    assert all(p.dtype == torch.float64 for p in seq.parameters())
    assert recompose(seq).weight.dtype == torch.float64


def test_recompose_folds_inner_biases_and_refuses_inexact_ones():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(5, 3, 1), nn.Conv2d(3, 4, 3, padding=0, bias=True), nn.Conv2d(4, 6, 1))
    x = torch.randn(2, 5, 9, 9)
    with torch.no_grad():
        assert torch.allclose(recompose(seq)(x), seq(x), atol=1e-5)
    padded = nn.Sequential(nn.Conv2d(5, 3, 1), nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 1))
    with pytest.raises(ValueError, match="bias"):
        recompose(padded)
    reflect = nn.Sequential(nn.Conv2d(5, 3, 1), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                            nn.Conv2d(4, 6, 1))
    with torch.no_grad():
        assert torch.allclose(recompose(reflect)(x), reflect(x), atol=1e-5)
    with pytest.raises(ValueError):
        recompose(nn.Sequential(nn.Conv2d(5, 3, 3), nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 1)))
    with pytest.raises(ValueError):
        recompose(nn.Sequential(nn.Conv2d(5, 3, 1), nn.Conv2d(2, 4, 3), nn.Conv2d(4, 6, 1)))
    with pytest.raises(TypeError):
        recompose(nn.Sequential(nn.Conv2d(5, 3, 1), nn.ReLU(), nn.Conv2d(3, 6, 1)))


# ---------------------------------------------------------------------------------------------- tucker_model
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 24, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1), nn.LeakyReLU(0.05),
                                  nn.Conv2d(24, 32, 3, padding=1), nn.LeakyReLU(0.05))
        self.down = nn.Conv2d(32, 32, 3, stride=2, padding=0)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 24, 1)
        self.small = nn.Conv2d(24, 8, 3, padding=1)

    def forward(self, x):
        return self.small(self.pw(self.dw(self.down(self.body(self.head(x))))))


def test_tucker_model_selects_reports_and_never_mutates_its_input():
    net = Net().eval()
    state = copy.deepcopy(net.state_dict())
    new, report = tucker_model(net, 0.5, progress=False)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(type(m) is not TuckerConv for m in net.modules())
    assert isinstance(report, TuckerReport) and isinstance(report, list)
    by = {r.name: r for r in report}
    assert set(by) == {"head", "body.0", "body.2", "down", "dw", "pw", "small"}
    assert {r.name for r in report.decomposed} == {"body.0", "body.2", "down"}
    assert "min_channels" in by["head"].reason and "min_channels" in by["small"].reason
    assert "groups=32" in by["dw"].reason
    assert by["pw"].reason.startswith("1x1")
    for name in ("body.0", "body.2", "down"):
        row, seq = by[name], new.get_submodule(name)
        assert isinstance(seq, TuckerConv) and seq.ranks == (row.rank_out, row.rank_in)
        assert row.params_after == n_params(seq) <= 0.5 * row.params_before
        assert 0 < row.rel_error < 1
        assert row.rel_error == pytest.approx(weight_error(net.get_submodule(name), seq), rel=1e-6)
    assert report.model_params_before == n_params(net) and report.model_params_after == n_params(new)
    assert n_params(new) == n_params(net) - sum(r.params_before - r.params_after for r in report)
    x = torch.randn(1, 3, 20, 20)
    with torch.no_grad():
        assert new(x).shape == net(x).shape
    # fusing back gives the same function as the decomposed model, with the original structure
    fused = recompose_model(new)
    assert [type(m) for m in fused.modules()] == [type(m) for m in net.modules()]
    with torch.no_grad():
        assert torch.allclose(fused(x), new(x), atol=1e-5)
    assert "body.0" in str(report) and "decomposed" in report.table()
    # the report's ranks rebuild the structure, so a saved state dict of the decomposed model loads strictly
    rebuilt, _ = tucker_model(Net(), report.ranks(), progress=False)
    rebuilt.load_state_dict(new.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), new(x))
    with pytest.raises(TypeError, match="tucker_conv"):
        tucker_model(nn.Conv2d(16, 16, 3), 0.5)


def test_tucker_model_full_rank_dict_include_exclude_inplace_and_1x1():
    net = Net().eval()
    new, report = tucker_model(net, {"body.0": (24, 24), "down": (20, 20)}, progress=False)
    by = {r.name: r for r in report}
    assert by["body.0"].reason.startswith("would not save")  # full rank costs more than the conv
    assert by["body.2"].reason == "no rank given for this layer"
    assert [r.name for r in report.decomposed] == ["down"] and by["down"].rank_out == 20
    with pytest.raises(ValueError, match="body.0"):
        tucker_model(net, {"body.0": (25, 24)}, progress=False)
    # a global tuple that does not fit a layer skips it instead
    _, rep = tucker_model(net, (28, 10), progress=False)
    assert "does not fit" in {r.name: r for r in rep}["body.0"].reason
    assert {r.name for r in rep.decomposed} == {"body.2", "down"}
    _, rep = tucker_model(net, 0.5, include="body.*", exclude=["body.2"], progress=False)
    assert [r.name for r in rep.decomposed] == ["body.0"]
    assert {r.name: r.reason for r in rep}["down"] == "not included"
    _, rep = tucker_model(net, 0.5, include_1x1=True, min_channels=4, progress=False)
    assert {"pw", "small"} <= {r.name for r in rep.decomposed}
    assert "min_channels=4" in {r.name: r.reason for r in rep}["head"]
    same = Net()
    out, _ = tucker_model(same, 0.5, inplace=True, progress=False)
    assert out is same and isinstance(same.body[0], TuckerConv)
    for bad in (dict(rank=0.5, energy=0.5), dict(), dict(rank="x"), dict(rank=1.5), dict(rank=0.5, min_channels=0),
                dict(rank=(1, 0)), dict(rank={1: 2}), dict(energy=1.5), dict(energy=0.0), dict(energy="0.5")):
        with pytest.raises(ValueError):
            tucker_model(net, progress=False, **bad)


def test_tucker_model_shared_conv_and_energy_and_files(tmp_path):
    shared = seeded_conv(16, 16, 3, padding=1)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    new, report = tucker_model(net, energy=0.8, progress=False)
    assert len(report) == 1 and "shared as 2" in report[0].reason
    assert new[0] is new[2] and isinstance(new[0], TuckerConv)
    report.to_json(tmp_path / "r.json")
    report.to_csv(tmp_path / "r.csv")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["summary"]["decomposed"] == 1 and data["layers"][0]["rank_out"] == report[0].rank_out
    back = TuckerReport.from_json(tmp_path / "r.json")
    assert back == report and back.summary() == report.summary()
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("name,status")


def test_model_decomposition_is_deterministic():
    net = Net()
    a, ra = tucker_model(net, "vbmf", progress=False)
    b, rb = tucker_model(net, "vbmf", progress=False)
    assert ra == rb
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_is_kept():
    conv = seeded_conv(8, 8, 3, padding=1).cuda()
    seq = tucker_conv(conv, (8, 8))
    assert all(p.is_cuda for p in seq.parameters())
    x = torch.randn(1, 8, 12, 12, device="cuda")
    assert rel(seq(x), conv(x)) <= 1e-4
    assert recompose(seq).weight.is_cuda


def test_rfdn_checkpoint_decomposes_and_fuses_back(checkpoints):
    from effsr import models

    path = checkpoints / "rfdn_aim2020.pth"
    if not path.exists():
        pytest.skip("rfdn checkpoint absent")
    net = models.load("rfdn", path)
    new, report = tucker_model(net, 0.7, progress=False)
    names = {r.name for r in report.decomposed}
    assert len(names) == 18 and "LR_conv" in names and "upsampler.0" in names
    assert all(n.endswith(("_r", "c4")) for n in names - {"LR_conv", "upsampler.0"})
    assert 0.6 < report.summary()["decomposed_fraction"] <= 0.7
    half, half_report = tucker_model(net, 0.5, progress=False)
    assert {r.name for r in half_report.decomposed} == names
    assert half_report.summary()["model_params_after"] < report.summary()["model_params_after"]
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        assert torch.allclose(recompose_model(new)(x), new(x), rtol=1e-4, atol=1e-2)
        y = net(x)
        assert 0 < rel(new(x), y) < rel(half(x), y) < 1
