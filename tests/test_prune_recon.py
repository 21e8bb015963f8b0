"""Calibration statistics, closed-form reconstruction, reconstruction importance and budgets (prune)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prune
import reparam
from prune.calibration import Calibration, ConvStats, im2col
from prune.importance import _GreedyLS


class Net(nn.Module):
    """Residual add, concat, multiply gate and PixelShuffle."""

    def __init__(self, conv: type | None = None) -> None:
        super().__init__()
        c3 = (lambda i, o: conv(i, o, 3)) if conv is not None else (lambda i, o: nn.Conv2d(i, o, 3, padding=1))
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = c3(8, 8)
        self.dist = nn.Conv2d(8, 4, 1)
        self.fuse = nn.Conv2d(12, 8, 1)
        self.gate = nn.Conv2d(12, 8, 1)
        self.mid = c3(8, 8)
        self.up = nn.Conv2d(8, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        r = F.relu(self.body(h) + h)
        c = torch.cat([r, F.relu(self.dist(h))], 1)
        y = self.fuse(c) * torch.sigmoid(self.gate(c))
        y = F.relu(self.mid(y))
        return self.shuffle(self.up(y))


def _net(seed: int = 0, conv: type | None = None) -> nn.Module:
    torch.manual_seed(seed)
    return Net(conv).double().eval()


def _calib(n: int = 16, size: int = 12, seed: int = 1, **kw) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.rand(n, 3, size, size, generator=g, dtype=torch.float64), batch_size=8, **kw)


def _convs(m: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: c for n, c in m.named_modules() if isinstance(c, nn.Conv2d)}


# --------------------------------------------------------------------------------------- im2col
@settings(max_examples=40, deadline=None)
@given(cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), groups=st.integers(1, 3),
       k=st.tuples(st.integers(1, 4), st.integers(1, 4)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       dil=st.tuples(st.integers(1, 2), st.integers(1, 2)), pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       hw=st.tuples(st.integers(7, 11), st.integers(7, 11)),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_im2col_rows_times_weight_equal_the_conv(cin_g, cout_g, groups, k, stride, dil, pad, mode, hw, bias, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin_g * groups, cout_g * groups, k, stride, pad, dil, groups, bias=bias,
                     padding_mode=mode).double()
    x = torch.randn(2, cin_g * groups, *hw, dtype=torch.float64)
    y = conv(x)
    cols = im2col(x, conv)                                                   # [G, N, D]
    w = conv.weight.reshape(groups, cout_g, -1)
    out = torch.einsum("gnd,god->gno", cols, w)                              # [G, N, O/G]
    if bias:
        out = out + conv.bias.view(groups, 1, cout_g)
    direct = y.permute(0, 2, 3, 1).reshape(-1, groups, cout_g).permute(1, 0, 2)
    assert torch.allclose(out, direct, atol=1e-10)
    # statistics of the conv's own output: its weights are an exact fit, with zero residual
    st_ = Calibration(x, batch_size=1).collect(nn.Sequential(conv), ["0"])["0"]
    assert st_.count == y.numel() // y.shape[1]
    assert st_.error(conv.weight, conv.bias) < 1e-9 * max(float(st_.yty.sum()), 1.0)


def test_stats_error_equals_the_direct_residual_and_solve_recovers_the_conv():
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    x = torch.randn(5, 4, 9, 9, dtype=torch.float64)
    st_ = Calibration(x, batch_size=2).collect(nn.Sequential(conv), ["0"])["0"]
    w2, b2 = conv.weight * 0.7 + 0.01, conv.bias - 0.3
    with torch.no_grad():
        direct = float((F.conv2d(x, w2, b2, 1, 1, 1, 2) - conv(x)).pow(2).sum())
    assert st_.error(w2, b2) == pytest.approx(direct, rel=1e-9)
    w, b = st_.solve(ridge=1e-12)
    assert torch.allclose(w, conv.weight, atol=1e-7) and torch.allclose(b, conv.bias, atol=1e-7)
    # merge of two halves == stats of everything
    a = Calibration(x[:2], batch_size=2).collect(nn.Sequential(conv), ["0"])["0"]
    c = Calibration(x[2:], batch_size=2).collect(nn.Sequential(conv), ["0"])["0"]
    m = a.merge(c)
    assert torch.allclose(m.xtx, st_.xtx) and torch.allclose(m.xty, st_.xty) and m.count == st_.count
    cov = st_.channel_covariance()
    assert cov.shape == (2, 2, 2) and torch.allclose(cov, cov.transpose(1, 2))


@settings(max_examples=30, deadline=None)
@given(cin=st.integers(2, 6), cout=st.integers(1, 4), k=st.sampled_from([1, 2, 3]), stride=st.integers(1, 2),
       dil=st.integers(1, 2), bias=st.booleans(), data=st.data(), seed=st.integers(0, 2**16))
def test_refit_without_is_the_least_squares_fit_on_the_kept_inputs(cin, cout, k, stride, dil, bias, data, seed):
    """The local refit of a conv that loses input channels: exactly the least-squares fit of the conv's own
    output on the kept im2col columns (and the constant, with a bias), computed here directly by lstsq."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding=dil * (k // 2), dilation=dil, bias=bias).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
        if bias:
            conv.bias.copy_(torch.randn(cout, generator=g, dtype=torch.float64))
    x = torch.rand(4, cin, 9, 9, generator=g, dtype=torch.float64) + 0.5     # non-zero means
    stats = Calibration(x, batch_size=2).collect(nn.Sequential(conv), ["0"])["0"]
    b0 = conv.bias if bias else None
    w_same, b_same = stats.refit_without(conv.weight, b0, [])
    assert torch.equal(w_same, conv.weight.detach()) and (b_same is None) == (not bias)
    if bias:
        assert torch.equal(b_same, conv.bias.detach())
    gone = data.draw(st.lists(st.integers(0, cin - 1), min_size=1, max_size=cin - 1, unique=True), label="gone")
    w, b = stats.refit_without(conv.weight, b0, gone, ridge=0.0)
    assert w.dtype == torch.float64 and bool((w[:, gone] == 0).all()) and (b is None) == (not bias)
    # direct: lstsq of the conv's output rows on the kept im2col columns
    cols = im2col(x, conv)[0]                                               # [N, C*k*k], channel-major
    with torch.no_grad():
        y = conv(x).permute(0, 2, 3, 1).reshape(-1, cout)
    kept = [c for c in range(cin) if c not in gone]
    idx = torch.tensor([c * k * k + t for c in kept for t in range(k * k)])
    design = cols[:, idx]
    if bias:
        design = torch.cat([design, torch.ones(design.shape[0], 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, y).solution                            # [|K| (+1), O]
    want = torch.zeros_like(conv.weight)
    want[:, kept] = sol[:len(idx)].T.reshape(cout, len(kept), k, k)
    scale = float(conv.weight.detach().abs().max())
    assert float((w - want).abs().max()) <= 1e-8 * scale
    if bias:
        assert float((b - sol[-1]).abs().max()) <= 1e-8 * scale
    # never worse than zeroing the removed inputs, even with their mean folded into the bias
    zeroed = conv.weight.detach().clone()
    zeroed[:, gone] = 0
    comp = None
    if bias:
        mu = stats.mean()[0].view(cin, -1)[gone]
        comp = conv.bias.detach() + (conv.weight.detach()[:, gone].flatten(2) * mu).sum((1, 2))
    assert stats.error(w, b) <= stats.error(zeroed, comp) * (1 + 1e-9) + 1e-12
    with pytest.raises(ValueError, match="channels"):
        stats.refit_without(conv.weight, b0, [cin])
    with pytest.raises(ValueError, match="ridge"):
        stats.refit_without(conv.weight, b0, gone, ridge=-1.0)


def test_ridge_toward_a_prior_shrinks_to_it():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 2, 3, padding=1).double()
    st_ = _calib(4, 8).collect(nn.Sequential(conv), ["0"])["0"]
    prior = (torch.zeros_like(conv.weight) + 0.5, conv.bias)
    w_big, _ = st_.solve(ridge=1e8, prior=prior)
    assert torch.allclose(w_big, prior[0], atol=1e-5)
    w0, _ = st_.solve(ridge=1e8)
    assert float(w0.abs().max()) < 1e-5


# --------------------------------------------------------------------------------- reconstruction
def test_history_gives_the_kept_channels():
    net = _net()
    x = torch.rand(1, 3, 12, 12, dtype=torch.float64)
    small = prune.l2_filter_prune(net, x, ratio=0.4, progress=False)
    keep = prune.kept_channels(net, small.pruning_history, x)
    t, s = _convs(net), _convs(small)
    assert any(len(keep[n][1]) < t[n].in_channels for n in t)
    for n in t:
        ok, ik = keep[n]
        assert torch.equal(s[n].weight, t[n].weight[ok][:, ik])


def test_nothing_removed_returns_the_same_weights():
    net = _net()
    calib = _calib()
    student = prune.l2_filter_prune(net, calib.batches[0][:1], ratio=0.0, progress=False)
    rep = prune.reconstruct(student, net, calib, layers="all", progress=False)
    assert len(rep.layers) == len(_convs(net))
    for n, c in _convs(net).items():
        s = dict(student.named_modules())[n]
        assert torch.allclose(s.weight, c.weight, atol=1e-8, rtol=1e-6), n
        assert torch.allclose(s.bias, c.bias, atol=1e-8, rtol=1e-6), n


def test_reconstruction_never_increases_a_layer_error_and_helps_the_output():
    net = _net()
    calib = _calib(24, 12)
    x = calib.batches[0][:1]
    small = prune.l2_filter_prune(net, x, ratio=0.5, progress=False)
    before = [m.weight.detach().clone() for m in _convs(small).values()]
    held = torch.rand(6, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y, e0 = net(held), float((small(held) - net(held)).pow(2).mean())
    rep = prune.reconstruct(small, net, calib, progress=False)
    assert rep.layers and rep.passes <= len(rep.layers)
    solved = {f.name for f in rep.layers}
    assert {"body", "dist", "fuse", "gate", "mid", "up"} <= solved
    for f in rep.layers:
        assert f.error_after <= f.error_before + 1e-12, f
    # the errors of the report are the errors of the final model, recollected independently
    keep = prune.kept_channels(net, small.pruning_history, x)
    for f in rep.layers:
        st_ = calib.collect(small, [f.name], teacher=net, out_index={f.name: keep[f.name][0]})[f.name]
        m = dict(small.named_modules())[f.name]
        assert st_.relative_error(m.weight, m.bias) == pytest.approx(f.error_after, rel=1e-6, abs=1e-12)
    assert any(not torch.equal(a, m.weight) for a, m in zip(before, _convs(small).values()))
    with torch.no_grad():
        e1 = float((small(held) - y).pow(2).mean())
    assert e1 < 0.5 * e0


def test_bias_compensation_matches_the_teacher_mean():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
                        nn.Conv2d(4, 3, 1)).double()
    calib = _calib(8, 10)
    small = prune.l2_filter_prune(net, calib.batches[0][:1], ratio=0.5, progress=False)
    unc = [m.bias.detach().clone() for m in _convs(small).values()]
    rep = prune.reconstruct(small, net, calib, solve=False, progress=False)
    assert rep.layers == [] and "2" in rep.compensated
    assert not torch.equal(unc[1], small[2].bias)

    def mean_out(m: nn.Module) -> torch.Tensor:
        outs = []
        h = m[2].register_forward_hook(lambda _m, _i, o: outs.append(o.mean((0, 2, 3))))
        for b in calib.batches:
            with torch.no_grad():
                m(b)
        h.remove()
        return torch.stack(outs).mean(0)

    keep = prune.kept_channels(net, small.pruning_history, calib.batches[0][:1])["2"][0]
    assert torch.allclose(mean_out(small), mean_out(net)[keep], atol=1e-9)


def test_rep_blocks_in_training_form_are_reconstructed_through_their_fused_kernel():
    net = _net(conv=lambda i, o, k: reparam.ECB(i, o))
    calib = _calib(16, 12)
    small = prune.l2_filter_prune(net, calib.batches[0][:1], ratio=0.4, progress=False)
    held = calib.batches[0]
    with torch.no_grad():
        e0 = float((small(held) - net(held)).pow(2).mean())
    rep = prune.reconstruct(small, net, calib, layers="all", progress=False)
    assert {"body", "mid"} <= {f.name for f in rep.layers}
    with torch.no_grad():
        e1 = float((small(held) - net(held)).pow(2).mean())
        fused = reparam.fuse_all(small).eval()
        assert torch.allclose(fused(held), small(held), atol=1e-8)
    assert e1 < e0


def test_deterministic_for_a_seed():
    net = _net()
    outs = []
    for _ in range(2):
        calib = _calib(16, 12, rows_per_batch=300, seed=7)
        small = prune.prune_to_budget(net, calib.batches[0][:1], calib, target_params=int(0.7 * sum(
            p.numel() for p in net.parameters())), importance=prune.ReconstructionImportance(calib))
        prune.reconstruct(small, net, calib, progress=False)
        outs.append(torch.cat([p.detach().flatten() for p in small.parameters()]))
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------- importance, budgets
def test_greedy_cost_equals_the_least_squares_error_increase():
    torch.manual_seed(6)
    conv = nn.Conv2d(5, 3, 3, padding=1).double()
    x = torch.randn(6, 5, 8, 8, dtype=torch.float64)
    st_ = Calibration(x, batch_size=3).collect(nn.Sequential(conv), ["0"])["0"]
    y = F.conv2d(x, conv.weight, conv.bias, padding=1).detach()
    g = _GreedyLS(st_, {c: [c] for c in range(5)}, ridge=0.0)
    costs = g.costs([[c] for c in range(5)])
    for c in range(5):       # brute force: least squares without channel c, residual / ||Y||^2
        keep = [i for i in range(5) if i != c]
        small = nn.Conv2d(4, 3, 3, padding=1).double()
        s2 = Calibration(x[:, keep], batch_size=3).collect(nn.Sequential(small), ["0"], teacher=nn.Sequential(conv),
                                                           teacher_inputs=list(x.split(3)))["0"]
        w, b = s2.solve(ridge=0.0)
        r = float((F.conv2d(x[:, keep], w, b, padding=1) - y).pow(2).sum()) / float(y.pow(2).sum())
        assert float(costs[c]) == pytest.approx(r, rel=1e-4, abs=1e-10)


def test_reconstruction_importance_through_the_pruning_entry_point():
    net = _net()
    calib = _calib()
    imp = prune.ReconstructionImportance(calib)
    small = prune.l2_filter_prune(net, calib.batches[0][:1], ratio=0.25, importance=imp, progress=False)
    assert small.pruning_report.importance == "ReconstructionImportance"
    assert imp.curves and all(np.all(np.diff(c) >= -1e-12) for c in imp.curves.values())


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_budget_is_met_and_reported(kind):
    net = _net()
    calib = _calib()
    x = calib.batches[0][:1]
    p0 = sum(p.numel() for p in net.parameters())
    f0 = prune.mac_count(net, (3, 16, 16))
    kw = dict(target_params=int(0.6 * p0)) if kind == "params" else dict(target_flops=int(0.6 * f0))
    small = prune.prune_to_budget(net, x, calib, flops_input_size=(3, 16, 16),
                                  importance=prune.ActivationImportance(calib.batches[0]), **kw)
    rep = small.pruning_report
    if kind == "params":
        assert sum(p.numel() for p in small.parameters()) <= kw["target_params"] == rep.target_params
        assert rep.params == sum(p.numel() for p in small.parameters())
    else:
        assert prune.mac_count(small, (3, 16, 16)) <= kw["target_flops"] and rep.flops <= kw["target_flops"]
    assert rep.groups and sum(g.channels - g.kept for g in rep.groups) > 0
    assert "up" in rep.locked                                 # the output conv is never pruned
    assert small(x).shape == net(x).shape
    again = prune.load(_net(), _save(small))
    assert torch.equal(again(x), small(x))


@settings(max_examples=8, deadline=None)
@given(frac=st.floats(0.4, 0.85), kind=st.sampled_from(["params", "flops"]))
def test_uniform_allocation_fills_the_budget_its_ratio_leaves(frac, kind):
    net = _net()
    calib = _calib()
    x = calib.batches[0][:1]
    size = (3, 16, 16)
    count = (lambda m: sum(p.numel() for p in m.parameters())) if kind == "params" else \
        (lambda m: prune.mac_count(m, size))
    target = int(frac * count(net))
    kw = {"target_" + kind: target}
    small = prune.prune_to_budget(net, x, calib, flops_input_size=size, allocation="uniform", **kw)
    rep = small.pruning_report
    assert rep.allocation == "uniform" and rep.ratio is not None and 0 < rep.ratio <= 0.75
    assert count(small) <= target
    # the ratio alone (pruned the plain way, same L2 ranking) fits too, and the fill only adds back to it
    plain = prune.l2_filter_prune(net, x, rep.ratio, steps=1, flops_input_size=None, progress=False)
    assert count(plain) <= target
    assert count(small) >= count(plain)
    assert (count(small) > count(plain)) == (rep.restored > 0)
    kept_plain = {n: c.out_channels for n, c in _convs(plain).items()}
    for n, c in _convs(small).items():
        assert c.out_channels >= kept_plain[n]
    # every restored atom is measured: the group's curve holds the error where it stopped
    for g in rep.groups:
        assert len(g.grid) == len(g.sensitivity)
    again = prune.prune_to_budget(net, x, calib, flops_input_size=size, allocation="uniform", **kw)
    assert torch.equal(again(x), small(x))
    assert torch.equal(prune.load(_net(), _save(small))(x), small(x))


def test_uniform_allocation_restores_atoms_on_a_budget_between_two_ratios():
    net = _net()
    calib = _calib()
    x = calib.batches[0][:1]
    small = prune.prune_to_budget(net, x, calib, target_params=1507, allocation="uniform")
    rep = small.pruning_report
    assert rep.restored >= 1 and rep.params == sum(p.numel() for p in small.parameters()) <= 1507
    assert "allocation uniform" in rep.summary() and "restored" in rep.summary()


def test_refit_sensitivity_measures_the_error_left_by_the_local_refit():
    """``refit=True`` measures each error with the consumers refit on their kept inputs. The ``mid`` group's
    only consumer is the (linear) output conv, so there the refit is the least-squares optimum of the very
    error measured: never above the bias-compensated zeroing of ``refit=False``, and below it somewhere."""
    net = _net()
    calib = _calib()
    x = calib.batches[0][:1]
    p0 = sum(p.numel() for p in net.parameters())
    curves = {}
    for refit in (True, False):
        small = prune.prune_to_budget(net, x, calib, target_params=int(0.6 * p0), allocation="sensitivity",
                                      refit=refit)
        assert sum(p.numel() for p in small.parameters()) <= int(0.6 * p0)
        curves[refit] = {g.name: np.array(g.sensitivity) for g in small.pruning_report.groups}
    on, off = curves[True]["mid"], curves[False]["mid"]
    assert np.all(on <= off * (1 + 1e-9) + 1e-15) and np.any(on < 0.5 * off)
    # the default: refit errors for the sensitivity allocation, bias-compensated ones for the uniform fill
    default = prune.prune_to_budget(net, x, calib, target_params=int(0.6 * p0), allocation="sensitivity")
    assert default.pruning_report.refit and "refit errors" in default.pruning_report.summary()
    assert [g.sensitivity for g in default.pruning_report.groups if g.name == "mid"][0] == list(on)
    uniform = prune.prune_to_budget(net, x, calib, target_params=int(0.6 * p0), allocation="uniform")
    assert not uniform.pruning_report.refit


def _save(m: nn.Module):
    import tempfile
    from pathlib import Path
    p = Path(tempfile.mkdtemp()) / "m.pth"
    prune.save(m, p)
    return p


def test_bad_inputs_raise_value_errors_naming_the_argument():
    net = _net()
    calib = _calib()
    x = calib.batches[0][:1]
    p0 = sum(p.numel() for p in net.parameters())
    with pytest.raises(ValueError, match="inputs"):
        Calibration(torch.zeros(0, 3, 8, 8))
    with pytest.raises(ValueError, match="inputs"):
        Calibration([])
    with pytest.raises(ValueError, match="inputs"):
        Calibration(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="inputs"):
        Calibration(torch.full((2, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="inputs"):
        Calibration(torch.rand(2, 3, 8, 8), input_range=255.0)          # [0, 1] data for a 0-255 net
    with pytest.raises(ValueError, match="inputs"):
        Calibration(torch.rand(2, 3, 8, 8) * 300, input_range=255.0)
    with pytest.raises(ValueError, match="inputs"):
        Calibration(torch.rand(2, 4, 8, 8), channels=3)
    with pytest.raises(ValueError, match="target_params"):
        prune.prune_to_budget(net, x, calib, target_params=p0)
    with pytest.raises(ValueError, match="target_params"):
        prune.prune_to_budget(net, x, calib, target_params=10)
    with pytest.raises(ValueError, match="target_flops"):
        prune.prune_to_budget(net, x, calib, target_flops=10**12, flops_input_size=(3, 16, 16))
    with pytest.raises(ValueError, match="target"):
        prune.prune_to_budget(net, x, calib)
    with pytest.raises(ValueError, match="allocation"):
        prune.prune_to_budget(net, x, calib, target_params=p0 // 2, allocation="greedy")
    with pytest.raises(ValueError, match="target_params"):
        prune.prune_to_budget(net, x, calib, target_params=10, allocation="uniform")
    with pytest.raises(TypeError, match="refit"):
        prune.prune_to_budget(net, x, calib, target_params=p0 // 2, refit="yes")
    with pytest.raises(TypeError, match="bias_compensation"):
        prune.prune_to_budget(net, x, calib, target_params=p0 // 2, bias_compensation=1)
    small = prune.l2_filter_prune(net, x, ratio=0.3, progress=False)
    with pytest.raises(ValueError, match="ridge"):
        prune.reconstruct(small, net, calib, ridge=-1.0, progress=False)
    with pytest.raises(ValueError, match="layers"):
        prune.reconstruct(small, net, calib, layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="history"):
        prune.reconstruct(small, net, calib, history=[], progress=False)
    with pytest.raises(ValueError, match="calibration"):
        ConvStats.empty(prune.calibration.conv_geometry(net.head), 8).solve()


# ------------------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.data
def test_official_rfdn_reconstruction_recovers_psnr(checkpoints, shared_data):
    from effsr import models
    from effsr.data import SRFolder
    from effsr.inference import evaluate

    torch.manual_seed(0)
    rfdn = models.load("rfdn", str(checkpoints / "rfdn_aim2020.pth")).eval()
    pairs = [p for p in SRFolder(shared_data / "t91") if min(p.lr.shape[:2]) >= 24][:16]
    crops = torch.stack([torch.from_numpy(np.ascontiguousarray(p.lr[:24, :24])).permute(2, 0, 1)
                         for p in pairs]).float()
    calib = Calibration(crops, batch_size=8, input_range=255.0, rows_per_batch=2048)
    small = prune.l2_filter_prune(rfdn, crops[:1], ratio=0.18, progress=False,
                                  importance=prune.ActivationImportance(crops[:8]), flops_input_size=None)
    bird = [p for p in SRFolder(shared_data / "set5")][:1]
    before = float(evaluate(small.eval(), bird, progress=False)["psnr_y"])
    rep = prune.reconstruct(small, rfdn, calib, progress=False)
    after = float(evaluate(small.eval(), bird, progress=False)["psnr_y"])
    assert all(f.error_after <= f.error_before for f in rep.layers)
    assert after > before + 0.3           # measured: 31.73 -> 32.27 dB on "baby"


def test_residual_targets_fit_the_sum_of_conv_and_input():
    net = _net()
    calib = _calib(24, 12)
    x = calib.batches[0][:1]
    small = prune.l2_filter_prune(net, x, ratio=0.5, progress=False)
    prune.reconstruct(small, net, calib, layers=["head"], progress=False, bias_compensation=False)
    small.head.weight.data.add_(0.05 * torch.randn_like(small.head.weight))    # make the trunk input drift
    held = calib.batches[1]
    keep = prune.kept_channels(net, small.pruning_history, x)
    rep = prune.reconstruct(small, net, calib, layers=["body"], residual=True, progress=False)
    assert rep.residual == ["body"]
    with torch.no_grad():        # the student's body(h_s) + h_s now approximates the teacher's sum
        h_t, h_s = net.head(held), small.head(held)
        sum_t = (net.body(h_t) + h_t)[:, keep["body"][0]]
        err_res = float((small.body(h_s) + h_s - sum_t).pow(2).mean())
    plain = prune.l2_filter_prune(net, x, ratio=0.5, progress=False)
    plain.head.load_state_dict(small.head.state_dict())
    prune.reconstruct(plain, net, calib, layers=["body"], residual=False, progress=False)
    with torch.no_grad():
        err_plain = float((plain.body(h_s) + h_s - sum_t).pow(2).mean())
    assert err_res < err_plain


def test_calibration_takes_a_float_numpy_batch_like_the_export_patches():
    import numpy as np

    from prune.calibration import Calibration

    arr = np.random.default_rng(0).random((5, 3, 12, 12), dtype=np.float32)
    calib = Calibration(arr, batch_size=2)
    assert [tuple(b.shape) for b in calib.batches] == [(2, 3, 12, 12), (2, 3, 12, 12), (1, 3, 12, 12)]
    assert torch.equal(torch.cat(calib.batches), torch.from_numpy(arr))
    with pytest.raises(TypeError, match="must be float"):
        Calibration((arr * 255).astype(np.uint8))
