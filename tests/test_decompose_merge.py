"""decompose.merge_factors: exact merges of consecutive convs (Tucker factors into their neighbours)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from decompose import MergeReport, merge_factors, tucker_model


def n_convs(m: nn.Module) -> int:
    return sum(isinstance(c, nn.Conv2d) for c in m.modules())


def scale_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach(), ref.detach()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1.0))


def structure(m: nn.Module) -> list[tuple[str, str, tuple]]:
    """Every module's name and type, and every parameter's and buffer's name and shape."""
    mods = [(n, type(c).__name__, ()) for n, c in m.named_modules()]
    return mods + [(n, "tensor", tuple(t.shape)) for n, t in m.state_dict().items()]


def out_of(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)


class TwoUsers(nn.Module):
    """``pre``'s output feeds the decomposed conv and the residual add: two users, never merged."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 16, 3, padding=1)
        self.pre = nn.Conv2d(16, 16, 1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.tail = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        y = self.pre(torch.relu(self.head(x)))
        return self.tail(torch.relu(self.body(y) + y))


def pre_1x1_net() -> nn.Module:
    """A 1x1 (with bias) directly before a conv that gets decomposed (as "3")."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 1),
                         nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 3, 3, padding=1))


def post_1x1_net() -> nn.Module:
    """A decomposed conv ("2") directly before a 1x1."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
                         nn.Conv2d(24, 8, 1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))


def relu_between_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 1), nn.ReLU(),
                         nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 3, 3, padding=1))


def padded_after_bias_net() -> nn.Module:
    """The decomposed conv's last factor has a bias (the conv had one) and a zero-padded 3x3 follows."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
                         nn.Conv2d(24, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))


# (builder, Tucker ranks, expected merges as (first, second), a kept pair and its reason)
CASES = {
    "1x1 before a Tucker conv": (pre_1x1_net, {"3": (12, 10)}, [("2", "3.0")], ("2", "3.1", "zero-pads")),
    "Tucker conv before a 1x1": (post_1x1_net, {"2": (12, 10)}, [("2.2", "3")], ("2.1", "2.2", "would add work")),
    "ReLU in between": (relu_between_net, {"4": (12, 10)}, [], ("2", "4.0", "3 (ReLU) lies between")),
    "two users": (TwoUsers, {"body": (8, 8)}, [], ("pre", "body.0", "has 2 users")),
    "bias before a padded 3x3": (padded_after_bias_net, {"2": (12, 10)}, [], ("2.2", "3", "zero-pads")),
}


def decomposed(builder, ranks, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net, _ = tucker_model(builder().double(), ranks, progress=False, min_channels=8)
    return net


@pytest.mark.parametrize("case", list(CASES))
def test_merge_factors_on_tucker_nets(case: str) -> None:
    builder, ranks, merges, (kept_a, kept_b, why) = CASES[case]
    net = decomposed(builder, ranks, seed=0)
    before = copy.deepcopy(net.state_dict())
    merged, report = merge_factors(net)
    assert isinstance(report, MergeReport) and not report.notes
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())   # inplace=False: net untouched
    assert [(r.first, r.second) for r in report.merged] == merges
    assert all(r.macs_saved >= 0 and r.merged_shape for r in report.merged)
    assert n_convs(merged) == n_convs(net) - len(merges)
    assert any(r.first == kept_a and r.second == kept_b and why in r.reason for r in report.kept), str(report)
    for _, second in merges:
        assert isinstance(merged.get_submodule(second), nn.Identity)
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    assert scale_err(out_of(merged, x), out_of(net, x)) <= 1e-10

    # replay on a fresh copy with other weights: same structure, and the merged weights load into it
    fresh, again = merge_factors(decomposed(builder, ranks, seed=1))
    assert structure(fresh) == structure(merged)
    assert [(r.first, r.second, r.status, r.reason) for r in again] == [(r.first, r.second, r.status, r.reason)
                                                                        for r in report]
    fresh.load_state_dict(merged.state_dict())
    assert torch.equal(out_of(fresh, x), out_of(merged, x))


def test_merged_model_traces_and_exports() -> None:
    net = decomposed(post_1x1_net, {"2": (12, 10)}, seed=0).float().eval()
    merged, report = merge_factors(net)
    assert len(report.merged) == 1
    x = torch.randn(1, 3, 9, 11)
    gm = torch.fx.symbolic_trace(merged)
    assert scale_err(out_of(gm, x), out_of(net, x)) <= 1e-5
    exported = torch.export.export(merged, (x,))
    convs = [n for n in exported.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == n_convs(merged) == n_convs(net) - 1
    assert scale_err(exported.module()(x), out_of(net, x)) <= 1e-5


@pytest.mark.parametrize("bias, padding, mode, merges", [
    (True, 1, "zeros", False),      # the 1x1 bias would be zero-padded at the border: not one conv
    (False, 1, "zeros", True),
    (True, 0, "zeros", True),       # no padding: exact
    (True, 1, "reflect", True),     # reflect padding copies the bias: exact
    (True, 1, "circular", True),
])
def test_bias_before_padding_rule(bias: bool, padding: int, mode: str, merges: bool) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 1, bias=bias), nn.Conv2d(6, 3, 3, padding=padding, padding_mode=mode)).double()
    merged, report = merge_factors(net)
    assert len(report.merged) == int(merges) and len(report) == 1
    if not merges:
        assert "zero-pads" in report[0].reason and report[0].kind == ""
    x = torch.randn(1, 4, 7, 9, dtype=torch.float64)
    assert scale_err(out_of(merged, x), out_of(net, x)) <= 1e-10


def test_a_zero_valued_bias_is_judged_by_structure() -> None:
    """The decision must replay on other weights, so a bias that happens to be zero still blocks the merge."""
    net = nn.Sequential(nn.Conv2d(4, 6, 1), nn.Conv2d(6, 3, 3, padding=1)).double()
    nn.init.zeros_(net[0].bias)
    _, report = merge_factors(net)
    assert not report.merged and "bias" in report[0].reason


def test_chains_merge_into_the_first_name_and_strides_count() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 1, bias=False), nn.Conv2d(6, 8, 1, bias=False),
                        nn.Conv2d(8, 4, 3, stride=2, padding=1), nn.Conv2d(4, 2, 1)).double()
    merged, report = merge_factors(net)
    assert [(r.first, r.second, r.kind) for r in report.merged] == [
        ("0", "1", "1x1 -> conv"), ("0", "2", "1x1 -> conv"), ("0", "3", "conv -> 1x1")]
    # 1x1 2->8 then 3x3/2 8->4: the 1x1 runs on 4 input pixels per output pixel
    assert (report.merged[1].macs_before, report.merged[1].macs_after) == (2 * 8 * 4 + 8 * 4 * 9, 2 * 4 * 9)
    assert [type(m).__name__ for m in merged] == ["Conv2d", "Identity", "Identity", "Identity"]
    assert merged[0].stride == (2, 2) and merged[0].bias is not None and merged[0].weight.shape == (2, 2, 3, 3)
    x = torch.randn(1, 2, 9, 7, dtype=torch.float64)
    assert scale_err(out_of(merged, x), out_of(net, x)) <= 1e-10
    # the other way round the merged 3x3 would be wider than the pair: 8->4 1x1 (x4 pixels) + 4->4 3x3/2 < 8->4 3x3/2
    wide = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    _, report = merge_factors(wide)
    assert not report.merged and report[0].reason == "would add work: 288 > 272 MACs per output pixel"
    assert report[0].macs_saved == -16


def test_shared_grouped_and_hooked_convs_are_kept() -> None:
    shared = nn.Conv2d(4, 4, 1)
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), shared, nn.ReLU(), shared)
    _, report = merge_factors(net)
    assert not report.merged and "registered under several names (1, 3)" in report[0].reason

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(self.a(x)) + self.b(x)

    _, report = merge_factors(Twice())
    assert not report.merged and "b is called 2 times" in report[0].reason
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 4, 1))
    _, report = merge_factors(grouped)
    assert not report.merged and "first_groups" in report[0].reason
    hooked = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    hooked[1].register_forward_hook(lambda *a: None)
    _, report = merge_factors(hooked)
    assert not report.merged and "hooks" in report[0].reason
    _, report = merge_factors(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)), exclude="1")
    assert not report.merged and "not selected" in report[0].reason


def test_untraceable_model_is_left_unchanged() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else x

    net = Branchy()
    out, report = merge_factors(net)
    assert out is not net and structure(out) == structure(net) and len(report) == 0
    assert report.notes and "could not trace" in report.notes[0] and "unchanged" in str(report)


def test_a_submodule_fx_cannot_trace_stays_one_call() -> None:
    class Inner(nn.Module):  # shape-dependent control flow: fx cannot trace into it
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(self.a(x)) if x.shape[-1] > 2 else x

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head, self.pre = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
            self.inner, self.post = Inner(), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.inner(self.pre(self.head(x)))
            return self.post(self.inner.a(y))       # a conv of the opaque module, also called from outside

    net = Outer().double()
    merged, report = merge_factors(net)
    assert [(r.first, r.second) for r in report.merged] == [("head", "pre")]
    assert report.notes == [report.notes[0]] and report.notes[0].startswith("inner (Inner) is traced as one call")
    kept = {(r.first, r.second): r.reason for r in report.kept}
    assert kept == {("head", "inner.a"): "inner (Inner) lies between them",
                    ("inner.a", "post"): "inner.a lives inside inner, which is traced as one call"}
    assert type(merged.inner.a) is type(merged.inner.b) is nn.Conv2d
    x = torch.randn(1, 3, 7, 5, dtype=torch.float64)
    assert scale_err(out_of(merged, x), out_of(net, x)) <= 1e-10


def test_inplace_and_repblocks() -> None:
    from reparam import repify

    torch.manual_seed(0)
    net = repify(nn.Sequential(nn.Conv2d(4, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)), "acb",
                 include="1")
    names = [n for n, _ in net.named_modules()]
    same, report = merge_factors(net, inplace=True)
    assert same is net and not report.merged                # the block is one opaque call, never opened
    assert [n for n, _ in net.named_modules()] == names


@given(data=st.data())
def test_random_conv_chains_stay_exact_and_replay(data: st.DataObject) -> None:
    """Random chains of plain convs (kernel 1/3, stride 1/2, padding, padding mode, bias, optional ReLU):
    merged output equal in float64, one conv fewer per merge, replay gives the same structure."""
    n = data.draw(st.integers(2, 4), label="convs")
    specs, ch, size = [], data.draw(st.integers(1, 4), label="c0"), 13
    for i in range(n):
        k = data.draw(st.sampled_from([1, 3]), label=f"k{i}")
        s = {"cin": ch, "cout": data.draw(st.integers(1, 6), label=f"c{i + 1}"), "k": k,
             "stride": data.draw(st.sampled_from([1, 1, 2]), label=f"s{i}"),
             "padding": data.draw(st.sampled_from([0, 1]), label=f"p{i}"),
             "mode": data.draw(st.sampled_from(["zeros", "zeros", "reflect"]), label=f"m{i}"),
             "bias": data.draw(st.booleans(), label=f"b{i}"),
             "relu": data.draw(st.sampled_from([False, False, True]), label=f"relu{i}")}
        size = (size + 2 * s["padding"] - k) // s["stride"] + 1
        assume(size >= 2)
        specs.append(s)
        ch = s["cout"]

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        layers = []
        for s in specs:
            layers.append(nn.Conv2d(s["cin"], s["cout"], s["k"], stride=s["stride"], padding=s["padding"],
                                    padding_mode=s["mode"], bias=s["bias"]))
            if s["relu"]:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers).double()

    net = build(0)
    merged, report = merge_factors(net)
    x = torch.randn(2, specs[0]["cin"], 13, 13, dtype=torch.float64)
    assert scale_err(out_of(merged, x), out_of(net, x)) <= 1e-10
    assert n_convs(merged) == n - len(report.merged)
    assert all(r.macs_after <= r.macs_before for r in report.merged)
    fresh, _ = merge_factors(build(1))
    assert structure(fresh) == structure(merged)
    fresh.load_state_dict(merged.state_dict())
