"""Data-aware Tucker-2: per-conv math on calibration statistics, the model-level pass, budgets, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from decompose import (LayerChoices, TuckerConv, allocate, conv_macs, data_aware_tucker, data_aware_tucker_model,
                       recompose, recompose_model, tucker_conv, tucker_model)
from decompose.data_aware import stats_error
from prune.calibration import Calibration


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def conv_stats(conv: nn.Conv2d, x: torch.Tensor, teacher: nn.Conv2d | None = None):
    """Statistics of ``conv`` on ``x`` with the teacher conv's output (default its own) as the target."""
    calib = Calibration(x, batch_size=4)
    student = nn.Sequential(conv)
    t = None if teacher is None else nn.Sequential(teacher)
    s = calib.collect(student, ["0"], teacher=t)["0"]
    return s, np64(s.xtx), np64(s.xty), np64(s.yty)


def build(conv: nn.Conv2d, fit) -> TuckerConv:
    r_out, r_in = fit.ranks
    first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False, dtype=torch.float64)
    mid = nn.Conv2d(r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, dtype=torch.float64)
    last = nn.Conv2d(r_out, conv.out_channels, 1, bias=fit.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(fit.first)[:, :, None, None])
        mid.weight.copy_(torch.from_numpy(fit.core))
        last.weight.copy_(torch.from_numpy(fit.last)[:, :, None, None])
        if fit.bias is not None:
            last.bias.copy_(torch.from_numpy(fit.bias))
    return TuckerConv(first, mid, last)


geometry = st.fixed_dictionaries({
    "cin": st.integers(1, 6), "cout": st.integers(1, 7), "k": st.sampled_from([1, 3, (1, 3)]),
    "stride": st.sampled_from([1, 2]), "padding": st.sampled_from([0, 1]), "dilation": st.sampled_from([1, 2]),
    "bias": st.booleans(), "padding_mode": st.sampled_from(["zeros", "reflect", "circular"]),
    "seed": st.integers(0, 1000),
})


def make(g: dict) -> tuple[nn.Conv2d, torch.Tensor]:
    torch.manual_seed(g["seed"])
    conv = nn.Conv2d(g["cin"], g["cout"], g["k"], stride=g["stride"], padding=g["padding"],
                     dilation=g["dilation"], bias=g["bias"], padding_mode=g["padding_mode"]).double()
    # correlated, non-centred inputs with very different channel scales (where whitening matters)
    mix = torch.randn(g["cin"], g["cin"], dtype=torch.float64)
    scale = torch.linspace(0.2, 3.0, g["cin"], dtype=torch.float64)[None, :, None, None]
    x = torch.einsum("ab,nbhw->nahw", mix, torch.randn(8, g["cin"], 20, 20, dtype=torch.float64)) * scale + 0.5
    return conv, x


# ----------------------------------------------------------------------------------------- per-conv math
@settings(max_examples=25)
@given(geometry)
def test_full_rank_data_aware_tucker_equals_the_conv(g):
    conv, x = make(g)
    _, xtx, xty, yty = conv_stats(conv, x)
    fit = data_aware_tucker(np64(conv.weight), None if conv.bias is None else np64(conv.bias), xtx, xty, yty,
                            (g["cout"], g["cin"]), ridge=1e-12)
    w = np64(conv.weight)
    assert np.abs(fit.weight() - w).max() <= 1e-6 * max(1.0, np.abs(w).max())
    seq = build(conv, fit)
    with torch.no_grad():
        assert torch.allclose(seq(x), conv(x), atol=1e-6, rtol=1e-6)
        assert torch.allclose(recompose(seq)(x), conv(x), atol=1e-6, rtol=1e-6)   # recompose stays exact
    assert fit.error <= 1e-8 * float(yty.sum())


@settings(max_examples=25)
@given(geometry, st.data())
def test_data_aware_error_is_at_most_plain_tucker_error(g, data):
    conv, x = make(g)
    torch.manual_seed(g["seed"] + 1)
    teacher = nn.Conv2d(g["cin"], g["cout"], g["k"], stride=g["stride"], padding=g["padding"],
                        dilation=g["dilation"], bias=g["bias"], padding_mode=g["padding_mode"]).double()
    with torch.no_grad():                                 # the student is a perturbed teacher
        conv.weight.copy_(teacher.weight + 0.1 * torch.randn_like(teacher.weight))
    r_out = data.draw(st.integers(1, g["cout"]), label="r_out")
    r_in = data.draw(st.integers(1, g["cin"]), label="r_in")
    stats, xtx, xty, yty = conv_stats(conv, x, teacher)
    plain = recompose(tucker_conv(conv, (r_out, r_in)))
    plain_err = float(stats.error(plain.weight, plain.bias))
    fit = data_aware_tucker(np64(conv.weight), None if conv.bias is None else np64(conv.bias), xtx, xty, yty,
                            (r_out, r_in), ridge=1e-12)
    assert fit.ranks == (r_out, r_in)
    # the reported error is the true calibration error of the produced layers
    seq = build(conv, fit)
    direct = float(stats.error(recompose(seq).weight, recompose(seq).bias))
    assert fit.error == pytest.approx(direct, rel=1e-6, abs=1e-9 * float(yty.sum()))
    assert fit.error <= plain_err * (1 + 1e-7) + 1e-9 * float(yty.sum())
    refined = data_aware_tucker(np64(conv.weight), None if conv.bias is None else np64(conv.bias), xtx, xty, yty,
                                (r_out, r_in), ridge=1e-12, refine=3)
    assert refined.error <= fit.error
    seq = build(conv, refined)
    assert refined.error == pytest.approx(float(stats.error(recompose(seq).weight, recompose(seq).bias)),
                                          rel=1e-6, abs=1e-9 * float(yty.sum()))


def test_refine_lowers_the_error_where_the_closed_form_is_not_optimal():
    g = {"cin": 6, "cout": 7, "k": 3, "stride": 1, "padding": 1, "dilation": 1, "bias": True,
         "padding_mode": "zeros", "seed": 3}
    conv, x = make(g)
    _, xtx, xty, yty = conv_stats(conv, x)
    args = (np64(conv.weight), np64(conv.bias), xtx, xty, yty, (4, 3))
    base = data_aware_tucker(*args, ridge=1e-12)
    refined = data_aware_tucker(*args, ridge=1e-12, refine=5)
    assert refined.subspace.endswith("+als") and refined.error < base.error


def test_whitening_beats_weight_only_subspace_on_scaled_inputs():
    """A channel with huge input variance but small weights matters more than the weights alone say."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1).double()
    x = torch.randn(8, 8, 16, 16, dtype=torch.float64)
    x[:, :4] *= 30.0
    with torch.no_grad():
        conv.weight[:, :4] *= 0.05
    stats, xtx, xty, yty = conv_stats(conv, x)
    fit = data_aware_tucker(np64(conv.weight), np64(conv.bias), xtx, xty, yty, (8, 4), ridge=1e-12)
    plain = recompose(tucker_conv(conv, (8, 4)))
    assert fit.subspace == "whitened"
    assert fit.error < 0.5 * float(stats.error(plain.weight, plain.bias))


def test_stats_error_matches_the_calibration_module():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    x = torch.rand(4, 3, 10, 10, dtype=torch.float64)
    stats, xtx, xty, yty = conv_stats(conv, x)
    w = torch.randn_like(conv.weight)
    b = torch.randn_like(conv.bias)
    coef = np.concatenate([np64(w).reshape(5, -1).T, np64(b)[None]], axis=0)
    assert stats_error(xtx, xty, yty, coef) == pytest.approx(float(stats.error(w, b)), rel=1e-9)


def test_bad_per_conv_input_names_the_argument():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    _, xtx, xty, yty = conv_stats(conv, torch.rand(2, 4, 8, 8, dtype=torch.float64))
    w, b = np64(conv.weight), np64(conv.bias)
    with pytest.raises(ValueError, match="ranks"):
        data_aware_tucker(w, b, xtx, xty, yty, (7, 2))
    with pytest.raises(ValueError, match="xtx"):
        data_aware_tucker(w, b, xtx[:, :-1, :-1], xty, yty, (3, 2))
    with pytest.raises(ValueError, match="xty"):
        data_aware_tucker(w, b, xtx, xty[:, :, :3], yty, (3, 2))
    with pytest.raises(ValueError, match="empty calibration"):
        data_aware_tucker(w, b, np.zeros_like(xtx), np.zeros_like(xty), yty, (3, 2))


# ---------------------------------------------------------------------------------------- model level
class Net(nn.Module):
    """head conv -> residual body (3x3, 3x3 with more channels, 1x1) -> tail; float64."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.05), nn.Conv2d(c, c + 4, 3, padding=1),
                                  nn.LeakyReLU(0.05), nn.Conv2d(c + 4, c, 1))
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        return self.tail(self.body(f) + f)


def net_and_calib(seed: int = 0, n: int = 8) -> tuple[Net, Calibration]:
    torch.manual_seed(seed)
    net = Net().double().eval()
    return net, Calibration(torch.rand(n, 3, 12, 12, dtype=torch.float64), batch_size=4)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_nothing_removed_returns_the_same_weights():
    net, calib = net_and_calib()
    out, report = data_aware_tucker_model(net, calib, {}, progress=False)      # no layer decomposed: refit only
    assert not report.decomposed and {r.status for r in report} == {"refit"}
    for (name, p), q in zip(net.state_dict().items(), out.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("schedule", ["block", "layer"])
def test_model_pass_reports_and_refit_never_increases_error(schedule):
    net, calib = net_and_calib(1)
    with torch.no_grad():          # a student that differs from its teacher, so refits have work to do
        student = Net().double().eval()
        student.load_state_dict(net.state_dict())
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out, report = data_aware_tucker_model(student, calib, 0.5, teacher=net, schedule=schedule, progress=False)
    assert [r.name for r in report.decomposed] == ["body.0", "body.2"]
    assert isinstance(out.body[0], TuckerConv) and out.body[0].ranks == (report[1].rank_out, report[1].rank_in)
    refit = [r for r in report if r.status == "refit"]
    assert {r.name for r in refit} == {"head", "body.4", "tail"}
    for r in refit:
        assert r.calib_error_after <= r.calib_error_before
    assert report[0].calib_error_after < report[0].calib_error_before    # head: a real gain toward the teacher
    # head's inputs are the raw inputs: recheck its refit against fresh statistics
    s = calib.collect(out, ["head"], teacher=net)["head"]
    assert s.error(out.head.weight, out.head.bias) <= s.error(student.head.weight, student.head.bias)
    assert report.model_params_after == n_params(out) < n_params(net)
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(recompose_model(out)(x), out(x), atol=1e-9)             # recompose stays exact


def test_data_aware_model_beats_plain_tucker_on_held_out_inputs():
    net, calib = net_and_calib(2, n=16)
    out, report = data_aware_tucker_model(net, calib, 0.4, progress=False)
    plain, _ = tucker_model(net, report.ranks(), progress=False)
    x = torch.rand(4, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        y = net(x)
        assert float((out(x) - y).pow(2).mean()) < float((plain(x) - y).pow(2).mean())


def test_deterministic():
    net, calib = net_and_calib(3)
    a, ra = data_aware_tucker_model(net, calib, target_params=int(0.7 * n_params(net)), progress=False)
    b, rb = data_aware_tucker_model(net, calib, target_params=int(0.7 * n_params(net)), progress=False)
    assert ra.ranks() == rb.ranks()
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


@settings(max_examples=6)
@given(st.floats(0.45, 0.95), st.sampled_from(["noise", "relative"]))
def test_params_budget_is_met(fraction, sensitivity):
    net, calib = net_and_calib(4)
    target = int(fraction * n_params(net))
    out, report = data_aware_tucker_model(net, calib, target_params=target, sensitivity=sensitivity,
                                          progress=False)
    assert n_params(out) <= target
    assert report.budget["kind"] == "params" and report.budget["achieved"] == n_params(out)
    assert report.summary()["budget"]["target"] == target
    assert set(report.ranks()) <= {"body.0", "body.2"}


def total_macs(model: nn.Module, hw: tuple[int, int]) -> float:
    seen: list[float] = []
    hooks = [m.register_forward_pre_hook(lambda m, i: seen.append(conv_macs(m, tuple(i[0].shape[-2:]))))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, *hw, dtype=torch.float64))
    for h in hooks:
        h.remove()
    return sum(seen)


def test_flops_budget_is_met_and_flops_fn_is_used():
    net, calib = net_and_calib(5)
    before = total_macs(net, (32, 32))
    out, report = data_aware_tucker_model(net, calib, target_flops=0.6 * before, flops_input_size=(32, 32),
                                          progress=False)
    assert total_macs(out, (32, 32)) <= 0.6 * before
    assert report.budget["before"] == before and report.budget["achieved"] <= 0.6 * before
    calls = []

    def doubled(conv: nn.Conv2d, hw: tuple[int, int]) -> float:
        calls.append(conv)
        return 2.0 * conv_macs(conv, hw)

    _, rep2 = data_aware_tucker_model(net, calib, target_flops=1.2 * before, flops_fn=doubled,
                                      flops_input_size=(32, 32), progress=False)
    assert calls and rep2.budget["before"] == 2 * before and rep2.budget["achieved"] <= 1.2 * before


def test_bad_model_level_input_names_the_argument():
    net, calib = net_and_calib(6)
    n = n_params(net)
    with pytest.raises(ValueError, match="target_params"):
        data_aware_tucker_model(net, calib, target_params=n, progress=False)          # not below the model
    with pytest.raises(ValueError, match="target_params"):
        data_aware_tucker_model(net, calib, target_params=50, progress=False)         # unreachable
    with pytest.raises(ValueError, match="target_params"):
        data_aware_tucker_model(net, calib, target_params=-3, progress=False)
    with pytest.raises(ValueError, match="target_flops"):
        data_aware_tucker_model(net, calib, target_flops=1e15, progress=False)
    with pytest.raises(ValueError, match="target_flops"):
        data_aware_tucker_model(net, calib, target_flops=10.0, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        data_aware_tucker_model(net, calib, 0.5, target_params=n // 2, progress=False)
    with pytest.raises(ValueError, match="calibration"):
        data_aware_tucker_model(net, [], 0.5, progress=False)                          # empty calibration
    with pytest.raises(ValueError, match="calibration"):
        data_aware_tucker_model(net, None, 0.5, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        data_aware_tucker_model(net, calib, 0.5, schedule="all", progress=False)
    with pytest.raises(ValueError, match="refine"):
        data_aware_tucker_model(net, calib, 0.5, refine=-1, progress=False)
    with pytest.raises(ValueError, match="sensitivity"):
        data_aware_tucker_model(net, calib, 0.5, sensitivity="grad", progress=False)
    with pytest.raises(ValueError, match="rank"):
        data_aware_tucker_model(net, calib, {"body.0": (99, 2)}, progress=False)


# --------------------------------------------------------------------------------------------- allocate
@settings(max_examples=30)
@given(st.lists(st.tuples(st.integers(2, 6), st.integers(2, 6)), min_size=1, max_size=4), st.floats(0.0, 1.0),
       st.integers(0, 100))
def test_allocate_meets_the_budget(shapes, t, seed):
    rng = np.random.default_rng(seed)
    layers = []
    for i, (co, ci) in enumerate(shapes):
        e_in = np.sort(rng.random(ci + 1))[::-1] * np.r_[np.ones(ci), 0.0]
        e_out = np.sort(rng.random(co + 1))[::-1] * np.r_[np.ones(co), 0.0]
        cost = lambda ro, ri, co=co, ci=ci: float(ci * ri + 9 * ri * ro + ro * co)  # noqa: E731
        layers.append(LayerChoices.grid(f"l{i}", co, ci, 9.0 * co * ci, cost, e_in, e_out))
    lo = sum(float(c.cost.min()) for c in layers)
    hi = sum(float(c.cost.max()) for c in layers)
    budget = lo + t * (hi - lo)
    picked = allocate(layers, budget)
    spent = sum(float(c.cost[c.ranks.index(picked[c.name])]) for c in layers)
    assert spent <= budget + 1e-9
    if t == 1.0:
        assert all(r is None for r in picked.values())       # everything fits: nothing is decomposed
    with pytest.raises(ValueError, match="target"):
        allocate(layers, lo - 1.0)


# ------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.data
def test_official_rfdn_block_data_aware_beats_plain(checkpoints, shared_data):
    from effsr import models
    from effsr.data import SRFolder

    torch.manual_seed(0)
    rfdn = models.load("rfdn", str(checkpoints / "rfdn_aim2020.pth")).eval()
    pairs = [p for p in SRFolder(shared_data / "t91") if min(p.lr.shape[:2]) >= 24][:10]
    crops = torch.stack([torch.from_numpy(np.ascontiguousarray(p.lr[:24, :24])).permute(2, 0, 1) for p in pairs])
    crops = crops.float()
    calib = Calibration(crops[:8], batch_size=4, input_range=255.0)
    out, report = data_aware_tucker_model(rfdn, calib, 0.5, include="B1.*", refit=False, progress=False)
    assert [r.name for r in report.decomposed] == ["B1.c1_r", "B1.c2_r", "B1.c3_r", "B1.c4"]
    plain, _ = tucker_model(rfdn, report.ranks(), progress=False)
    held = crops[8:]
    with torch.no_grad():
        y = rfdn(held)
        assert float((out(held) - y).pow(2).mean()) < 0.5 * float((plain(held) - y).pow(2).mean())
