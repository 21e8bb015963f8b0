"""Tests for the prune package: SR-aware structured L2 filter pruning."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch_pruning.pruner import function as F

import prune
import reparam
from effsr import models
from prune.graph import PixelShuffleIndexError, build_graph, channel_atoms, locked_reason

CHECKPOINTS = {"rfdn": "rfdn_aim2020.pth", "rlfn": "rlfn_ntire2022.pth", "imdn": "imdn_aim2019.pth",
               "fmen": "fmen_ntire2022.pth"}
SMALL = {"rfdn": dict(nf=16, num_blocks=2), "rlfn": dict(nf=16, mid_channels=16, num_blocks=2),
         "imdn": dict(nf=16, num_blocks=2), "fmen": dict(nf=16, num_blocks=2, mid_channels=8, warmup_mid_channels=8)}
TRACE = (1, 3, 24, 24)        # ESA needs >= 15 px (strided conv + 7x7 max-pool)
FLOPS_IN = None               # FLOPs are counted only where a test checks them


def _seed(s: int = 0) -> None:
    torch.manual_seed(s)


def _input(model: nn.Module, shape=TRACE, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype) * float(getattr(model, "input_range", 1.0))


def _prune(model: nn.Module, ratio: float, **kw) -> nn.Module:
    kw.setdefault("progress", False)
    kw.setdefault("flops_input_size", FLOPS_IN)
    return prune.l2_filter_prune(model, _input(model, dtype=next(model.parameters()).dtype), ratio, **kw)


def _small(name: str, **kw) -> nn.Module:
    _seed(0)
    return models.build(name, **{**SMALL[name], **kw}).eval()


def _masked_equivalent(model: nn.Module, root: nn.Module, fn, idxs: list[int]) -> tuple[nn.Module, nn.Module]:
    """(pruned copy, masked copy): the masked copy zeroes the consumers' input slices of the group."""
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    name = {m: n for n, m in model.named_modules()}[root]
    dg = build_graph(pruned, _input(pruned, dtype=torch.float64))
    group = dg.get_pruning_group(dict(pruned.named_modules())[name], fn, idxs)
    by_name = dict(masked.named_modules())
    pruned_names = {m: n for n, m in pruned.named_modules()}
    for item in group:
        layer = item.dep.layer
        if isinstance(layer, nn.Conv2d) and item.dep.pruning_fn == F.prune_conv_in_channels:
            with torch.no_grad():
                by_name[pruned_names[layer]].weight[:, item.idxs] = 0
    group.prune()
    return pruned, masked


# ------------------------------------------------------------------------------------ validation
def test_validation_errors_name_the_argument():
    net = _small("rfdn")
    x = _input(net)
    with pytest.raises(ValueError, match="ratio"):
        prune.l2_filter_prune(net, x, 1.0)
    with pytest.raises(ValueError, match="ratio"):
        prune.l2_filter_prune(net, x, -0.1)
    with pytest.raises(TypeError, match="ratio"):
        prune.l2_filter_prune(net, x, "0.5")
    with pytest.raises(ValueError, match="steps"):
        prune.l2_filter_prune(net, x, 0.5, steps=0)
    with pytest.raises(TypeError, match="steps"):
        prune.l2_filter_prune(net, x, 0.5, steps=2.0)
    with pytest.raises(ValueError, match="schedule"):
        prune.l2_filter_prune(net, x, 0.5, schedule="cosine")
    with pytest.raises(ValueError, match="schedule"):
        prune.l2_filter_prune(net, x, 0.5, steps=2, schedule=lambda r, s: [0.5, 0.2])
    with pytest.raises(ValueError, match="schedule"):
        prune.l2_filter_prune(net, x, 0.5, steps=2, schedule=lambda r, s: [0.1, 0.3])
    with pytest.raises(ValueError, match="round_to"):
        prune.l2_filter_prune(net, x, 0.5, round_to=0)
    with pytest.raises(TypeError, match="example_inputs"):
        prune.l2_filter_prune(net, [x], 0.5)
    with pytest.raises(TypeError, match="model"):
        prune.l2_filter_prune("rfdn", x, 0.5)
    with pytest.raises(ValueError, match="ignored_layers"):
        prune.l2_filter_prune(net, x, 0.5, ignored_layers=["no.such.layer"])
    with pytest.raises(TypeError, match="finetune"):
        prune.l2_filter_prune(net, x, 0.5, finetune=3)


def test_schedules():
    assert prune.linear(0.4, 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    agp = prune.agp(0.4, 4)
    assert agp[-1] == pytest.approx(0.4)
    steps = [b - a for a, b in zip([0.0] + agp[:-1], agp)]
    assert all(s1 > s2 for s1, s2 in zip(steps, steps[1:]))  # AGP removes most early
    # torch-pruning's scheduler convention (steps + 1 values from 0) is accepted
    net = _small("rfdn")
    out = _prune(net, 0.25, steps=2, schedule=tp.pruner.algorithms.scheduler.linear_scheduler)
    assert out.pruning_report.schedule == pytest.approx([0.125, 0.25])


# ----------------------------------------------------------------------------- the five networks
@pytest.fixture(scope="module")
def real_or_random(request):
    """name -> network: the official checkpoint when ../shared/data is present, else random weights."""
    from conftest import shared_data_dir

    root = shared_data_dir()

    def get(name: str) -> nn.Module:
        path = None if root is None else Path(root) / "checkpoints" / CHECKPOINTS[name]
        if path is not None and path.is_file():
            return models.load(name, path)
        _seed(0)
        return models.build(name).eval()

    return get


@pytest.mark.parametrize("name", ["rfdn", "rlfn", "imdn", "fmen"])
def test_pruned_networks_run_on_odd_sizes(name, real_or_random):
    net = real_or_random(name)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = _input(net, shape=(2, 3, 17, 19))
    y0 = net(x)
    pruned = _prune(net, 0.3, steps=2 if name in ("rfdn", "rlfn") else 1)
    y = pruned(x)
    assert y.shape == (2, 3, 68, 76)
    assert torch.isfinite(y).all()
    n0, n1 = (sum(p.numel() for p in m.parameters()) for m in (net, pruned))
    assert n1 < 0.85 * n0
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(net(x), y0)
    # the output conv before PixelShuffle(4) keeps its 48 channels and is reported
    report = pruned.pruning_report
    last = [n for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d)][-1]
    assert dict(pruned.named_modules())[last].out_channels == 48
    assert "output" in report.locked[last]
    assert len(report.history) == report.steps + 1
    assert report.history[0].params == n0 and report.history[-1].params == n1


def test_imdn_split_groups_are_reported_not_pruned():
    net = _small("imdn")
    pruned = _prune(net, 0.5)
    locked = pruned.pruning_report.locked
    assert any("split" in why for why in locked.values())
    for n, m in pruned.named_modules():
        if n.endswith("conv1.0"):
            assert m.out_channels == 16            # split producer untouched
    assert pruned.model[0].out_channels == 8        # the trunk is pruned (64 -> 8 at nf=16 * 0.5)
    assert pruned(_input(pruned, shape=(1, 3, 17, 16))).shape == (1, 3, 68, 64)


@pytest.mark.parametrize("name", ["rfdn", "rlfn", "imdn", "fmen"])
def test_every_group_prunes_like_masking_its_consumers(name):
    """Concat (distillation), residual adds and ESA's x * sigmoid(mask) stay consistent: removing
    channels from every prunable group equals zeroing those channels at all their consumers
    (float64, exact)."""
    net = _small(name).double()
    x = _input(net, shape=(1, 3, 17, 19), dtype=torch.float64, seed=1)
    pruned, masked = copy.deepcopy(net), copy.deepcopy(net)
    dg = build_graph(pruned, _input(net, dtype=torch.float64))
    names = {m: n for n, m in pruned.named_modules()}
    by_name = dict(masked.named_modules())
    plan = []
    for group in dg.get_all_groups(ignored_layers=[], root_module_types=(nn.Conv2d,)):
        if locked_reason(dg, group) is not None:
            continue
        root, fn = group[0].dep.target.module, group[0].dep.handler
        n = len(group[0].idxs)
        idxs = sorted({0, n // 2, n - 1})
        for item in dg.get_pruning_group(root, fn, idxs):   # original index spaces
            if isinstance(item.dep.layer, nn.Conv2d) and item.dep.pruning_fn == F.prune_conv_in_channels:
                with torch.no_grad():
                    by_name[names[item.dep.layer]].weight[:, item.idxs] = 0
        plan.append((root, fn, idxs))
    assert len(plan) >= 3
    for root, fn, idxs in plan:
        dg.get_pruning_group(root, fn, idxs).prune()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
    torch.testing.assert_close(pruned(x), masked(x), rtol=1e-10, atol=1e-8)
    assert not torch.allclose(net(x), masked(x))          # the masking really changed the function


# --------------------------------------------------------------------------------- PixelShuffle
class _ShuffleNet(nn.Module):
    """Intermediate PixelShuffle(2) (EDSR-style upsampler) followed by a final PixelShuffle(2)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.Conv2d(8, 32, 3, padding=1)     # 8 shuffled channels x 4
        self.ps = nn.PixelShuffle(2)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 12, 3, padding=1)   # 3 output channels x 4
        self.ps_out = nn.PixelShuffle(2)

    def forward(self, x):
        y = self.ps(self.up(torch.relu(self.head(x))))
        return self.ps_out(self.tail(torch.relu(self.body(y) + y)))


def test_pixel_shuffle_whole_groups_only():
    _seed(0)
    net = _ShuffleNet().double()
    x = torch.rand(1, 3, 5, 7, dtype=torch.float64)
    dg = build_graph(net, x)
    groups = {dg.module_name(g[0].dep.target.module): g
              for g in dg.get_all_groups(ignored_layers=[], root_module_types=(nn.Conv2d,))}
    full = dg.get_pruning_group(net.up, F.prune_conv_out_channels, list(range(32)))
    assert channel_atoms(full) == [list(range(4 * c, 4 * c + 4)) for c in range(8)]
    assert locked_reason(dg, full) is None
    assert "output" in locked_reason(dg, groups["tail"])
    with pytest.raises(PixelShuffleIndexError):
        dg.get_pruning_group(net.up, F.prune_conv_out_channels, [0, 1, 2])
    # a whole block: removes shuffled channel 1 everywhere it is used (body in/out via the residual)
    pruned, masked = _masked_equivalent(net, net.up, F.prune_conv_out_channels, [4, 5, 6, 7])
    assert pruned.up.out_channels == 28 and pruned.body.in_channels == 7 and pruned.body.out_channels == 7
    torch.testing.assert_close(pruned(x), masked(x))
    # the pruner rounds 'up' to whole blocks and never touches the output
    out = prune.l2_filter_prune(net, x, 0.5, progress=False, flops_input_size=(3, 8, 8))
    assert out.up.out_channels % 4 == 0 and out.up.out_channels == 4 * out.body.in_channels
    assert out.tail.out_channels == 12
    assert out(torch.rand(2, 3, 3, 5, dtype=torch.float64)).shape == (2, 3, 12, 20)


# ------------------------------------------------------------------------------ importance is L2
def test_zeroed_filters_are_the_ones_removed():
    net = _small("rfdn")
    zeroed = [1, 4, 6]                                  # B1.c1_d: 8 distilled channels at nf=16
    with torch.no_grad():
        net.B1.c1_d.weight[zeroed] = 0
    pruned = _prune(net, 0.375)                         # 8 -> 5: exactly three removed
    entries = [idx for name, is_out, idx in pruned.pruning_history if name == "B1.c1_d"]
    assert entries == [zeroed]
    # and the other single-layer groups remove their smallest-L2 filters
    for name in ("B2.c1_d", "B2.c2_d"):
        w = dict(net.named_modules())[name].weight.detach()
        norms = w.flatten(1).norm(dim=1)
        expected = sorted(torch.argsort(norms)[:3].tolist())
        assert [idx for n, _, idx in pruned.pruning_history if n == name] == [expected]


def test_activation_importance_scores_are_output_rms():
    net = _small("rfdn")
    dead = [2, 5]
    with torch.no_grad():                               # B1.c1_d channels 2, 5 output exactly zero
        net.B1.c1_d.weight[dead] = 0
        net.B1.c1_d.bias[dead] = 0
    cal = _input(net, shape=(2, 3, 20, 20), seed=3)
    imp = prune.ActivationImportance(cal)
    dg = build_graph(net, _input(net))
    group = dg.get_pruning_group(net.B2.c1_d, F.prune_conv_out_channels, list(range(8)))
    acts = {}
    h = net.B2.c1_d.register_forward_hook(lambda m, i, o: acts.setdefault("y", o.detach()))
    with torch.no_grad():
        net(cal)
    h.remove()
    torch.testing.assert_close(imp(group), acts["y"].pow(2).mean(dim=(0, 2, 3)).sqrt())
    pruned = _prune(net, 0.25, importance=prune.ActivationImportance(cal))
    assert [idx for n, _, idx in pruned.pruning_history if n == "B1.c1_d"] == [dead]
    with pytest.raises(TypeError, match="inputs"):
        prune.ActivationImportance([cal])


def test_other_torch_pruning_importances_are_accepted():
    net = _small("rlfn")
    out = _prune(net, 0.25, importance=tp.importance.GroupMagnitudeImportance(p=1))
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in net.parameters())
    assert out.pruning_report.importance == "GroupMagnitudeImportance"
    with pytest.raises(TypeError, match="importance"):
        _prune(net, 0.25, importance=3)


@settings(max_examples=4)
@given(name=st.sampled_from(["rfdn", "rlfn", "fmen"]), steps=st.integers(1, 3),
       schedule=st.sampled_from(["agp", "linear"]), seed=st.integers(0, 2**16))
def test_ratio_zero_leaves_the_model_unchanged(name, steps, schedule, seed):
    _seed(seed)
    net = models.build(name, **{**SMALL[name], "nf": 8}).eval()
    out = _prune(net, 0.0, steps=steps, schedule=schedule)
    a, b = net.state_dict(), out.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert out.pruning_history == []
    x = _input(net, shape=(1, 3, 16, 17), seed=seed)
    assert torch.equal(net(x), out(x))


def test_ratio_and_round_to_semantics():
    net = _small("rfdn")
    out = _prune(net, 0.5, round_to=4, flops_input_size=(3, 32, 32))
    report = out.pruning_report
    final = report.history[-1]
    assert 0 < final.flops < report.history[0].flops and report.flops_source.startswith("reparam.utils.flops")
    # the toolkit's default counter uses the challenge's convention: it agrees with effsr.metrics exactly
    from effsr import metrics
    assert final.flops == metrics.profile(out, (3, 32, 32)).flops
    assert report.history[0].flops == metrics.profile(net, (3, 32, 32)).flops
    assert final.removed_fraction == pytest.approx(0.5, abs=0.1)
    for root, n0 in report.groups.items():
        assert final.channels[root] % 4 == 0 or final.channels[root] == n0
    assert out.B1.c1_d.out_channels == 4               # 8 * 0.5
    path = report.save(Path(__import__("tempfile").mkdtemp()) / "r.json")
    assert '"removed_fraction"' in path.read_text()


def test_ignored_layers_by_module_of_the_input_model():
    net = _small("rfdn")
    out = _prune(net, 0.5, ignored_layers=[net.B1.c1_d, "B2.c1_d"])
    assert out.B1.c1_d.out_channels == 8 and out.B2.c1_d.out_channels == 8
    assert out.B2.c2_d.out_channels == 4
    assert "ignored_layers" in out.pruning_report.locked["B1.c1_d"]


def test_inplace_prunes_the_given_model():
    net = _small("rlfn")
    out = _prune(net, 0.25, inplace=True)
    assert out is net and net.pruning_history


# --------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name,conv,suffix", [("rfdn", "conv", ".pth"), ("rfdn", "conv", ".safetensors"),
                                              ("rlfn", "ecb", ".safetensors"), ("imdn", "conv", ".pth")])
def test_save_and_reload_gives_identical_outputs(tmp_path, name, conv, suffix):
    net = _small(name, conv=conv)
    pruned = _prune(net, 0.3, steps=2, schedule="linear")
    path = prune.save(pruned, tmp_path / f"m{suffix}")
    meta = prune.read_history(path)
    assert meta["history"] == pruned.pruning_history and meta["arch"] == name
    _seed(123)                                              # a fresh network with other weights
    fresh = models.build(name, conv=conv, **SMALL[name])
    loaded = prune.load(fresh, path).eval()
    assert not hasattr(fresh, "pruning_history") or not fresh.pruning_history  # fresh left untouched
    x = _input(net, shape=(1, 3, 17, 19))
    assert torch.equal(loaded(x), pruned(x))
    with pytest.raises(ValueError, match="already pruned"):
        prune.load(pruned, path)


def test_save_refuses_unpruned_and_load_refuses_foreign_files(tmp_path):
    net = _small("rfdn")
    with pytest.raises(ValueError, match="history"):
        prune.save(net, tmp_path / "x.pth")
    torch.save(net.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="prune.save"):
        prune.load(net, tmp_path / "plain.pth")


# ---------------------------------------------------------------------------------- rep blocks
class _RepNet(nn.Module):
    """ECB (plain and with identity), RRRB and ERB around a concat, a residual and a PixelShuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.head = reparam.ECB(3, 12)
        self.a = reparam.RRRB(12, 12)
        self.b = reparam.ECB(12, 12, use_identity=True)
        self.c = reparam.ERB(12, 12)
        self.d = reparam.ECB(12, 6)
        self.fuse = nn.Conv2d(18, 12, 1)
        self.tail = reparam.ECB(12, 12)
        self.ps = nn.PixelShuffle(2)

    def forward(self, x):
        h = self.head(x)
        y = self.c(self.b(self.a(h)))
        y = self.fuse(torch.cat([y, self.d(y)], 1)) + h
        return self.ps(self.tail(torch.relu(y)))


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def test_rep_blocks_prune_all_branches_and_still_fuse_exactly(tmp_path):
    _seed(0)
    net = _RepNet().double()
    _randomize(net)
    pruned = prune.l2_filter_prune(net, torch.rand(1, 3, 9, 9, dtype=torch.float64), 0.4, steps=2,
                                   progress=False, flops_input_size=(3, 8, 8)).eval()
    assert pruned.head.out_channels < 12 and pruned.a.in_channels == pruned.head.out_channels
    assert pruned.c.rrrb1.expand.conv.out_channels == 2 * pruned.c.in_channels   # RRRB width stays ratio*C
    assert pruned.head.edge_scale["sobel_x"].shape == (pruned.head.out_channels,)
    assert pruned.tail.out_channels == 12                                     # feeds the output
    x = torch.rand(2, 3, 7, 9, dtype=torch.float64)
    y = pruned(x)
    assert y.shape == (2, 3, 14, 18)
    fused = reparam.fuse_all(pruned).eval()
    assert not list(reparam.rep_blocks(fused))
    torch.testing.assert_close(fused(x), y, rtol=1e-9, atol=1e-9)
    # training-form round trip through save/load
    path = prune.save(pruned, tmp_path / "rep.safetensors")
    _seed(5)
    loaded = prune.load(_RepNet().double(), path).eval()
    assert torch.equal(loaded(x), y)


def test_rep_effsr_networks_fuse_after_pruning():
    """FMEN with RRRB slots (float64, exact) and RLFN with ECB slots (float32: ECB's depthwise edge
    convs are very slow in float64 on CPU; the float64 ECB check is the _RepNet test above)."""
    for name, conv, dtype, tol in (("fmen", "rrrb", torch.float64, 1e-9), ("rlfn", "ecb", torch.float32, 1e-4)):
        net = _small(name, conv=conv, nf=8, num_blocks=2).to(dtype)
        _randomize(net)
        pruned = _prune(net, 0.3).eval()
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())
        x = _input(net, shape=(1, 3, 17, 16), dtype=dtype)
        y = pruned(x)
        torch.testing.assert_close(reparam.fuse_all(pruned).eval()(x), y, rtol=tol, atol=tol * y.abs().max().item())


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("block", sorted(n for n in reparam.BLOCKS if n != "erb"))
def test_every_registered_rep_block_prunes_and_fuses_exactly(block):
    """Each block class: pruned inside a small SR net (plain and identity-capable slots), still a valid
    block whose fused conv equals its training form (float64)."""
    cls = reparam.get_block(block)
    assert prune.get_slicer(cls) is not None, f"no slicer for {cls.__name__}"
    _seed(0)
    def edge(c_in: int, c_out: int) -> nn.Module:   # RRRB needs in == out: plain convs at the ends
        return cls(c_in, c_out) if cls.allows_in_ne_out else nn.Conv2d(c_in, c_out, 3, padding=1)

    net = nn.Sequential(edge(3, 8), nn.ReLU(), cls(8, 8), nn.ReLU(), edge(8, 12), nn.PixelShuffle(2)).double()
    _randomize(net)
    _randomize_bn(net)
    net.eval()
    pruned = prune.l2_filter_prune(net, torch.rand(1, 3, 9, 9, dtype=torch.float64), 0.5, progress=False,
                                   flops_input_size=None).eval()
    assert pruned[0].out_channels == 4 and pruned[2].in_channels == 4 and pruned[4].out_channels == 12
    assert pruned[2].out_channels == 4
    x = torch.rand(1, 3, 7, 8, dtype=torch.float64)
    y = pruned(x)
    assert y.shape == (1, 3, 14, 16)
    torch.testing.assert_close(reparam.fuse_all(pruned).eval()(x), y, rtol=1e-9, atol=1e-9)


class _OpaqueBlock(reparam.RepBlock):
    """A RepBlock the pruner has no slicer for."""

    name = "opaque_test"

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out)
        self.conv = reparam.ConvBN(c_in, c_out, 3)

    def forward_branches(self, x):
        return self.conv(self.pad(x))

    def fused_kernel(self):
        return self.conv.kernel()


def test_unknown_rep_block_is_reported_and_left_alone():
    _seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _OpaqueBlock(8, 8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1),
                        nn.PixelShuffle(2))
    out = prune.l2_filter_prune(net, torch.rand(1, 3, 8, 8), 0.5, progress=False, flops_input_size=(3, 8, 8))
    locked = out.pruning_report.locked
    assert any("no channel pruner for _OpaqueBlock" in why for why in locked.values())
    assert out[0].out_channels == 8 and out[2].out_channels == 8
    assert out[4].out_channels == 4                      # the free group is still pruned
    assert out(torch.rand(1, 3, 5, 5)).shape == (1, 3, 10, 10)


# ----------------------------------------------------------------------------------- fine-tuning
def test_flops_fn_is_injected():
    net = _small("rfdn")
    seen = []

    def flops_fn(model, size):
        seen.append(size)
        return 7

    out = _prune(net, 0.5, flops_input_size=(3, 16, 16), flops_fn=flops_fn)
    assert [h.flops for h in out.pruning_report.history] == [7, 7] and seen == [(3, 16, 16)] * 2
    assert out.pruning_report.flops_source.endswith("flops_fn")


def test_finetune_is_called_after_each_step_with_a_fresh_optimizer():
    from effsr.train import sr_finetune

    net = _small("rfdn", nf=8, num_blocks=1)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.rand(3, 16, 16, generator=g), torch.rand(3, 64, 64, generator=g)) for _ in range(2)]
    ft = sr_finetune(pairs, 1, lr=1e-3, batch_size=1, progress=False)  # the SR callback lives in effsr
    calls = []

    def finetune(model, step):
        before = model.B1.c1_d.weight.detach().clone()
        info = ft(model, step)
        calls.append((step, model.B1.c1_d.out_channels, torch.equal(before, model.B1.c1_d.weight)))
        return info

    out = _prune(net, 0.5, steps=3, finetune=finetune)
    assert [c[0] for c in calls] == [1, 2, 3]
    assert [c[1] for c in calls] == sorted([c[1] for c in calls], reverse=True)
    assert not any(c[2] for c in calls)                  # the current parameters really were trained
    assert out.pruning_report.history[1].finetune["iterations"] == 1
    with pytest.raises(ValueError, match="optimizer"):
        prune.fresh_optimizer(net, "lbfgs-ish")
