"""Pruning networks of unknown structure: it never crashes and never silently changes the network.

Every network here is a tiny 3 -> 3 channel x2 SR net (random float64 weights, every conv with a bias)
built around one structure that torch-pruning alone gets wrong. For each, ``prune.l2_filter_prune`` and
``prune.prune_to_budget`` finish, the group through the structure is locked and named in the report, and
the pruned network is *exactly* (float64, 1e-10) the original network with the removed channels zeroed
at the convs that produced them -- read independently of the pruner, by matching the pruned convs'
filters and biases against the original ones.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch_pruning.pruner import function as tp_function

import prune
from prune.calibration import Calibration
from prune.graph import GroupPruneError, SRDependencyGraph, build_graph, prune_group


def _conv(i: int, o: int, k: int = 3, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(i, o, k, padding=k // 2, groups=groups)


class _Net(nn.Module):
    """head -> structure -> free bottleneck (b1: c -> 2c -> b2) -> tail -> PixelShuffle(2)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c
        self.head = _conv(3, c)
        self.b1 = _conv(c, 2 * c, 1)
        self.b2 = _conv(2 * c, c, 1)
        self.tail = _conv(c, 12)
        self.ps = nn.PixelShuffle(2)

    def structure(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.structure(self.head(x))
        h = h + self.b2(F.relu(self.b1(h)))
        return self.ps(self.tail(h))


class Plain(_Net):
    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.body = _conv(c, c)

    def structure(self, h):
        return h + self.body(F.relu(h))


class Scaled(Plain):
    """A per-channel scale parameter outside any module (DepGraph prunes it with its group)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.scale = nn.Parameter(torch.ones(1, c, 1, 1))

    def structure(self, h):
        return h + self.body(F.relu(h)) * self.scale


class SplitReorder(_Net):
    """SAFMN++-like: ``a, b = linear_0(x).chunk(2, 1)`` ... ``torch.cat([f(b), a], 1)`` (other order)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.linear_0 = _conv(c, 2 * c, 1)
        self.dw = _conv(c, c, 3, groups=c)
        self.fuse = _conv(2 * c, c, 1)

    def structure(self, h):
        a, b = self.linear_0(h).chunk(2, dim=1)
        return h + self.fuse(torch.cat([F.gelu(self.dw(b)), a], dim=1))


class SplitShared(_Net):
    """SAFMN++'s SimpleSAFM: an uneven split whose first piece is read twice, re-concatenated."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.cd = c // 4
        self.proj = _conv(c, c)
        self.dw = _conv(self.cd, self.cd, 3, groups=self.cd)
        self.out = _conv(c, c, 1)

    def structure(self, h):
        H, W = h.shape[-2:]
        x0, x1 = self.proj(h).split([self.cd, self.c - self.cd], dim=1)
        x2 = self.dw(F.adaptive_max_pool2d(x0, (H // 2, W // 2)))
        x2 = F.gelu(F.interpolate(x2, size=(H, W), mode="bilinear")) * x0
        return h + self.out(F.gelu(torch.cat([x1, x2], dim=1)))


class SplitByShape(SplitShared):
    """The split sizes read the *input's* channel count: pruning the input breaks the forward."""

    def structure(self, h):
        x0, x1 = self.proj(h).split([self.cd, h.shape[1] - self.cd], dim=1)
        return h + self.out(F.gelu(torch.cat([x1, F.gelu(self.dw(x0))], dim=1)))


class InputCat(_Net):
    """QuickSRNet: the input concatenated with itself (or repeated) is a residual of the upsampler."""

    def __init__(self, c: int, repeat: bool = False) -> None:
        super().__init__(c)
        self.repeat = repeat

    def forward(self, x):
        r = x.repeat(1, 4, 1, 1) if self.repeat else torch.cat([x, x, x, x], 1)
        h = F.relu(self.head(x))
        h = h + self.b2(F.relu(self.b1(h)))
        return self.ps(self.tail(h) + r)


class FeatureCat(_Net):
    """An inner feature concatenated with itself."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.body = _conv(2 * c, c)

    def structure(self, h):
        h = F.relu(h)
        return self.body(torch.cat([h, h], 1))


class LayerNorm2d(nn.Module):
    """Channel LayerNorm written by hand (RCN, NAFNet)."""

    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(c))
        self.bias = nn.Parameter(0.1 * torch.randn(c))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + self.eps)
        return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


class HandLayerNorm(_Net):
    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.norm = LayerNorm2d(c)
        self.body = _conv(c, c)

    def structure(self, h):
        return h + self.body(self.norm(h))


class PermutedLayerNorm(_Net):
    """LKFN: ``nn.LayerNorm`` over the channels of a permuted feature map."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.mid = _conv(c, c)
        self.norm = nn.LayerNorm(c)
        self.body = _conv(c, c)

    def structure(self, h):
        m = self.norm(self.mid(F.relu(h)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return h + self.body(m)


class Depthwise(_Net):
    """LKFN-like large-kernel depthwise conv between two pointwise convs (``groups`` 2: a grouped one)."""

    def __init__(self, c: int, groups: int | None = None) -> None:
        super().__init__(c)
        self.pw = _conv(c, c, 1)
        self.dw = _conv(c, c, 5, groups=c if groups is None else groups)
        self.pw2 = _conv(c, c, 1)

    def structure(self, h):
        return h + self.pw2(F.relu(self.dw(F.relu(self.pw(h)))))


class Gates(_Net):
    """A one-channel spatial gate (broadcast over the channels) and a squeeze-excitation channel gate."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.sa = _conv(2 * c, 1, 1)
        self.se1 = _conv(2 * c, 4, 1)
        self.se2 = _conv(4, 2 * c, 1)

    def forward(self, x):
        h = self.head(x)
        y = F.relu(self.b1(h))
        y = y * torch.sigmoid(self.sa(y))
        y = y * torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.ps(self.tail(h + self.b2(y)))


def _make(cls, c: int, seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    net = cls(c, **kw).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return net


def _x(seed: int, h: int = 12, w: int = 12, n: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- the proof property
def _kept(orig: nn.Conv2d, pruned: nn.Conv2d, name: str) -> list[int]:
    """Output channels of ``orig`` that ``pruned`` kept, found by matching biases; checks that the pruned
    filters are exactly the original ones on the kept input channels."""
    b, b2 = orig.bias.detach(), pruned.bias.detach()
    kept = []
    for v in b2:
        hits = (b == v).nonzero().flatten().tolist()
        assert len(hits) == 1, f"{name}: pruned bias {float(v)} is not one original bias"
        kept.append(hits[0])
    assert kept == sorted(kept), f"{name}: filters reordered"
    w = orig.weight.detach()[kept]
    w2 = pruned.weight.detach()
    if orig.groups == 1:
        cols = []
        for j in range(w2.shape[1]):
            hits = [i for i in range(w.shape[1]) if torch.equal(w[:, i], w2[:, j])]
            assert hits, f"{name}: input column {j} is not an original one"
            cols.append(hits[0])
        assert cols == sorted(set(cols)), f"{name}: input columns reordered"
    elif orig.groups == orig.in_channels == orig.out_channels:
        assert pruned.groups == pruned.in_channels == pruned.out_channels == len(kept), name
        assert torch.equal(w, w2), name
    else:
        assert kept == list(range(orig.out_channels)) and torch.equal(w, w2), f"{name}: grouped conv changed"
    return kept


def assert_equals_zeroed_producers(orig: nn.Module, pruned: nn.Module) -> int:
    """``pruned(x)`` equals ``orig(x)`` with every removed output channel zeroed at its conv; returns the
    number of removed output channels."""
    ref = copy.deepcopy(orig).eval()
    pmods = dict(pruned.named_modules())
    removed = 0
    handles = []
    for name, m in ref.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        kept = _kept(m, pmods[name], name)
        gone = sorted(set(range(m.out_channels)) - set(kept))
        removed += len(gone)
        if gone:
            def zero(_m, _i, out, gone=gone):
                out = out.clone()
                out[:, gone] = 0
                return out
            handles.append(m.register_forward_hook(zero))
    x = _x(99, 11, 13, n=2)
    with torch.no_grad():
        got, want = pruned.eval()(x), ref(x)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    return removed


def _l2(net: nn.Module, ratio: float = 0.5) -> nn.Module:
    return prune.l2_filter_prune(net, _x(0), ratio, progress=False, flops_input_size=None)


def _budget(net: nn.Module, frac: float = 0.95) -> nn.Module:
    calib = Calibration(_x(1, n=4), batch_size=4)
    target = int(frac * sum(p.numel() for p in net.parameters()))
    return prune.prune_to_budget(net, _x(0), calib, target_params=target, flops_input_size=(3, 12, 12))


def _both(net: nn.Module) -> list[tuple[nn.Module, dict[str, str]]]:
    out = []
    for pruned in (_l2(net), _budget(net)):
        removed = assert_equals_zeroed_producers(net, pruned)
        assert removed > 0, "nothing was pruned"
        out.append((pruned, pruned.pruning_report.locked))
    return out


def _reason(locked: dict[str, str], needle: str) -> str:
    """The one locked group's reason that mentions ``needle`` (group roots are named by trace order)."""
    hits = [why for why in locked.values() if needle in why]
    assert len(hits) == 1, (needle, locked)
    return hits[0]


CS = st.sampled_from([4, 8])
SEEDS = st.integers(0, 2**16)


# ------------------------------------------------------------------------------------- structures
@settings(max_examples=3, deadline=None)
@given(c=CS, seed=SEEDS)
def test_split_then_reordering_cat_is_locked_not_crashed(c, seed):
    net = _make(SplitReorder, c, seed)
    for pruned, locked in _both(net):
        assert "split" in locked["linear_0"]
        assert pruned.linear_0.out_channels == 2 * c and pruned.fuse.in_channels == 2 * c
        assert pruned.b1.out_channels < 2 * c                      # the free group is pruned


@settings(max_examples=3, deadline=None)
@given(c=CS, seed=SEEDS)
def test_uneven_split_with_a_piece_read_twice(c, seed):
    """torch-pruning alone maps split consumer i to piece i (an IndexError in get_all_groups); each
    consumer is mapped to the piece it reads, the split is locked, and the trunk past it is pruned."""
    net = _make(SplitShared, c, seed)
    for pruned, locked in _both(net):
        assert "split" in locked["proj"]
        assert pruned.proj.out_channels == c and pruned.out.in_channels == c


def test_split_sizes_read_from_another_tensor_are_caught_by_the_masking_check():
    net = _make(SplitByShape, 8, 0)
    for pruned, locked in _both(net):
        ran = [why for why in locked.values() if "the pruned network fails to run" in why]
        assert len(ran) == 1 and "split_with_sizes" in ran[0]
        assert pruned.head.out_channels == 8                       # the trunk (head, b2, ...) is kept


@pytest.mark.parametrize("repeat", [False, True], ids=["cat", "repeat"])
def test_input_concatenated_with_itself(repeat):
    """QuickSRNet's residual ``torch.cat([x, x, x, x], 1)`` / ``x.repeat(1, 4, 1, 1)``: torch-pruning
    alone fails while building the graph (int + None)."""
    net = _make(InputCat, 8, 0, repeat=repeat)
    for pruned, locked in _both(net):
        assert ("repeat" if repeat else "the same tensor 4 times") in locked["tail"]
        assert pruned.tail.out_channels == 12


@settings(max_examples=3, deadline=None)
@given(c=CS, seed=SEEDS)
def test_feature_concatenated_with_itself(c, seed):
    net = _make(FeatureCat, c, seed)
    for pruned, locked in _both(net):
        assert "the same tensor 2 times" in locked["head"]
        assert pruned.head.out_channels == c and pruned.body.in_channels == 2 * c


@settings(max_examples=3, deadline=None)
@given(c=CS, seed=SEEDS)
def test_hand_written_layer_norm_over_channels_is_locked(c, seed):
    """torch-pruning alone prunes it silently: every remaining channel's mean/variance changes."""
    net = _make(HandLayerNorm, c, seed)
    for pruned, locked in _both(net):
        why = _reason(locked, "norm (LayerNorm2d)")
        assert "MeanBackward1 works over dim 1" in why and "hand-written LayerNorm" in why
        assert pruned.head.out_channels == c and pruned.norm.weight.shape == (c,)


def test_layer_norm_after_a_permute_is_locked():
    net = _make(PermutedLayerNorm, 8, 0)
    for pruned, locked in _both(net):
        assert "permute(0, 2, 3, 1)" in locked["mid"]
        assert pruned.mid.out_channels == 8 and pruned.norm.normalized_shape == (8,)


class Mixer(_Net):
    """One channel-mixing operation written in the forward (``kind``) between ``mid`` and ``body``."""

    def __init__(self, c: int, kind: str) -> None:
        super().__init__(c)
        self.kind = kind
        self.mid = _conv(c, c)
        self.body = _conv(c, c)
        self.w = nn.Parameter(torch.randn(c, c, 3, 3))

    def structure(self, h):
        m = self.mid(F.relu(h))
        b, c, H, W = m.shape
        if self.kind == "softmax":
            m = m * torch.softmax(m, dim=1)
        elif self.kind == "shuffle":
            m = m.view(b, 2, c // 2, H, W).transpose(1, 2).reshape(b, c, H, W)
        elif self.kind == "conv2d":
            m = F.conv2d(m, self.w, padding=1)
        elif self.kind == "channel_max":
            m = m * torch.sigmoid(m.amax(-3, keepdim=True))
        elif self.kind == "flip":
            m = m.flip(1)
        return h + self.body(m)


@pytest.mark.parametrize("kind, says", [("softmax", "SoftmaxBackward0 works over dim 1"),
                                        ("shuffle", "ViewBackward0 reshapes"),
                                        ("conv2d", "ConvolutionBackward0 is not known"),
                                        ("channel_max", "AmaxBackward0 works over dim 1"),
                                        ("flip", "FlipBackward0 works over dim 1")])
def test_other_channel_mixing_operations_are_locked(kind, says):
    net = _make(Mixer, 8, 0, kind=kind)
    pruned = _l2(net)
    assert_equals_zeroed_producers(net, pruned)
    assert "Mixer.forward" in _reason(pruned.pruning_report.locked, says)
    assert pruned.mid.out_channels == 8 and pruned.b1.out_channels == 8


@settings(max_examples=3, deadline=None)
@given(c=CS, seed=SEEDS)
def test_depthwise_conv_is_pruned_with_its_input(c, seed):
    net = _make(Depthwise, c, seed)
    for pruned, locked in _both(net):
        assert not any("dw" in why for why in locked.values())
    pruned = _l2(net)
    assert pruned.pw.out_channels == pruned.dw.out_channels == pruned.dw.groups == pruned.pw2.in_channels < c


def test_grouped_conv_is_locked():
    net = _make(Depthwise, 8, 0, groups=2)
    for pruned, locked in _both(net):
        assert "grouped convolution" in locked["pw"] and "groups=2" in locked["pw"]
        assert (pruned.pw.out_channels, pruned.dw.in_channels, pruned.dw.out_channels) == (8, 8, 8)


@pytest.mark.parametrize("cls", [Plain, Scaled, Gates], ids=["plain", "scaled", "gates"])
def test_plain_and_gated_networks_are_still_pruned(cls):
    """A one-channel gate broadcast over the channels is not coupled to them; a squeeze-excitation mean
    over the spatial dims is per channel."""
    net = _make(cls, 8, 0)
    for pruned, locked in _both(net):
        assert set(locked) == {"tail"}, locked
    pruned = _l2(net)
    assert pruned.head.out_channels == 4 and pruned.b1.out_channels == 8
    if cls is Gates:
        assert pruned.sa.in_channels == pruned.se2.out_channels == 8 and pruned.se1.out_channels == 2
    if cls is Scaled:
        assert pruned.scale.shape == (1, 4, 1, 1)


# ---------------------------------------------------------------------- torch-pruning failures
def test_a_group_torch_pruning_cannot_build_is_locked_with_the_exception(monkeypatch):
    net = _make(Plain, 8, 0)
    real = SRDependencyGraph.get_pruning_group

    def flaky(self, module, fn, idxs):
        if self.module_name(module) == "b1":
            raise IndexError("list index out of range")
        return real(self, module, fn, idxs)

    monkeypatch.setattr(SRDependencyGraph, "get_pruning_group", flaky)
    pruned = _l2(net)
    why = pruned.pruning_report.locked["b1"]
    assert why.startswith("b1: torch-pruning cannot build its group (IndexError: list index out of range)")
    assert pruned.b1.out_channels == 16 and pruned.head.out_channels == 4
    assert_equals_zeroed_producers(net, pruned)


@pytest.mark.parametrize("root", ["b1", "head"])
def test_a_failure_while_pruning_restores_every_layer_of_the_group(monkeypatch, root):
    """The group of ``head`` also holds the unwrapped ``scale`` parameter and the failing ``tail``."""
    net = _make(Scaled, 8, 0)
    real = tp_function.ConvPruner.prune_in_channels
    failing = net.b2 if root == "b1" else net.tail

    calls = []

    def boom(self, layer, idxs):
        if layer is failing and not calls:
            calls.append(layer)
            raise RuntimeError("boom")
        return real(self, layer, idxs)

    monkeypatch.setattr(tp_function.ConvPruner, "prune_in_channels", boom)
    dg = build_graph(net, _x(0))
    module = getattr(net, root)
    group = dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, [0, 3])
    assert root == "b1" or any(item.dep.target.module is net.scale for item in group)
    group.items[1:] = group.items[:0:-1]       # whatever DepGraph's order, the parameter goes last
    before = {n: t.clone() for n, t in net.state_dict().items()}
    params = dict(net.named_parameters())
    with pytest.raises(GroupPruneError, match=rf"^{root}: torch-pruning failed to prune this group \(Runtime"):
        prune_group(dg, group)
    assert net.b1.out_channels == 16 and net.b2.in_channels == 16 and net.head.out_channels == 8
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params[n] for n, p in net.named_parameters())       # the very same parameters
    assert not dg.pruning_history()
    prune_group(dg, dg.get_pruning_group(module, dg.get_pruner_of_module(module).prune_out_channels, [0, 3]))
    assert getattr(net, root).out_channels == (14 if root == "b1" else 6)   # the graph is still usable
    assert net.scale.shape == (1, 8 if root == "b1" else 6, 1, 1) and len(dg.pruning_history()) == 1


def test_a_tracing_failure_of_torch_pruning_is_one_value_error(monkeypatch):
    from torch_pruning.dependency import index_mapping

    def broken(graph):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(index_mapping, "update_index_mapping", broken)
    with pytest.raises(ValueError, match=r"^model: torch-pruning cannot trace Plain \(TypeError: unsupported"):
        build_graph(_make(Plain, 8, 0), _x(0))


def test_the_model_s_own_forward_error_is_not_rewrapped():
    with pytest.raises(RuntimeError, match="channels"):
        build_graph(_make(Plain, 8, 0), torch.rand(1, 4, 8, 8, dtype=torch.float64))
