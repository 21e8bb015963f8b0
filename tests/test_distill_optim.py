"""Per-tensor learning-rate caps (distill.optim) and their use as train_steps' default optimizer."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill import train_steps
from distill.optim import MAX_RELATIVE_STEP, capped_lrs, relative_lr_groups


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


@settings(max_examples=40, deadline=None)
@given(n_layers=st.integers(1, 4), widths=st.lists(st.integers(1, 6), min_size=5, max_size=5),
       exponents=st.lists(st.integers(-9, 1), min_size=4, max_size=4), lr=st.sampled_from([1e-5, 1e-4, 1e-3]),
       rho=st.one_of(st.none(), st.sampled_from([1e-3, 1e-2, 1e-1])), bias=st.booleans(), seed=st.integers(0, 99))
def test_groups_cover_every_parameter_once_and_cap_exactly_the_small_weights(n_layers, widths, exponents, lr, rho,
                                                                             bias, seed):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(widths[i], widths[i + 1], 3, bias=bias) for i in range(n_layers)]
    with torch.no_grad():
        for layer, e in zip(layers, exponents):
            layer.weight.mul_(10.0 ** e)
    net = nn.Sequential(*layers)
    groups = relative_lr_groups(net.named_parameters(), lr, rho)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in net.parameters())  # each parameter exactly once
    expected = {}
    for name, p in net.named_parameters():
        cap = None if rho is None or p.dim() < 2 else rho * _rms(p)
        if cap is not None and 0 < cap < lr:
            expected[name] = cap
    assert capped_lrs(net.named_parameters(), lr, rho) == pytest.approx(expected, rel=1e-12)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in net.named_parameters():
        assert by_param[id(p)] == pytest.approx(expected.get(name, lr), rel=1e-12)
        assert by_param[id(p)] <= lr
    assert sum(1 for g in groups if "name" in g) == len(expected)
    if not expected:  # nothing to cap: exactly the plain optimizer's single group
        assert len(groups) == 1 and groups[0]["lr"] == lr


def test_biases_and_zero_weights_keep_lr_and_bad_values_name_the_argument():
    conv = nn.Conv2d(2, 2, 3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(1e-9)
    assert capped_lrs(conv.named_parameters(), 1e-4) == {}
    for bad in (0, -1e-2, math.inf, math.nan, "0.01", True):
        with pytest.raises(ValueError, match="max_relative_step"):
            relative_lr_groups(conv.named_parameters(), 1e-4, bad)
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="lr"):
            capped_lrs(conv.named_parameters(), bad)


class Gate(nn.Module):
    """FMEN's attention pattern at its checkpoint's scales: 0-255 features grown to ~1e5 by a conv chain,
    then a conv with weights ~1e-6 whose sigmoid gates the input (the official ``excitate`` convs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.grow = nn.Conv2d(3, 8, 3, padding=1)
        self.excitate = nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            self.grow.weight.mul_(300.0)
            self.excitate.weight.mul_(1e-5)
            self.excitate.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.excitate(self.grow(x)))


class Fit(nn.Module):
    """``forward(lr, hr) -> (loss, parts)``: L1 of ``net(lr * 255) / 255`` to ``hr``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, lr: torch.Tensor, hr: torch.Tensor):
        loss = (self.net(lr * 255.0) / 255.0 - hr).abs().mean()
        return loss, {"l1": loss.detach()}


def _data(n: int = 8):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 8, 8, generator=g)
    target = Gate()
    with torch.no_grad():
        y = target(x * 255.0) / 255.0 + 0.01 * torch.randn(x.shape, generator=g)  # a residual to descend
    return torch.utils.data.TensorDataset(x, y)


def _loss(fit: Fit, ds) -> float:
    with torch.no_grad():
        return float(fit(*ds.tensors)[0])


def test_one_plain_adam_step_wrecks_tiny_weights_and_the_cap_prevents_it():
    ds = _data()
    start = Fit(Gate())
    before = _loss(start, ds)
    assert before < 0.01  # the net is the target up to the noise: only the training can spoil it
    plain, capped = copy.deepcopy(start), copy.deepcopy(start)
    train_steps(plain, ds, steps=1, batch_size=8, lr=1e-4, max_relative_step=None, progress=False)
    res = train_steps(capped, ds, steps=1, batch_size=8, lr=1e-4, progress=False)
    assert set(res.lr_capped) == {"net.excitate.weight"}
    assert res.lr_capped["net.excitate.weight"] == pytest.approx(MAX_RELATIVE_STEP * _rms(start.net.excitate.weight))
    assert _loss(plain, ds) > 5 * before  # gates flipped: parts of the image switched off or on
    assert _loss(capped, ds) < 1.01 * before


def test_default_optimizer_is_plain_adam_when_nothing_needs_a_cap_and_resumes_exactly(tmp_path):
    torch.manual_seed(3)
    ds = torch.utils.data.TensorDataset(torch.rand(8, 3, 8, 8), torch.rand(8, 3, 8, 8))
    net = Fit(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)))
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    ra = train_steps(a, ds, steps=4, batch_size=2, lr=1e-4, progress=False)
    train_steps(b, ds, steps=4, batch_size=2, progress=False, optimizer_fn=lambda ps: torch.optim.Adam(ps, lr=1e-4))
    assert ra.lr_capped == {}
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    # with a capped tensor: interrupted at step 2 and resumed == 4 steps straight
    full, part = Fit(Gate()), Fit(Gate())
    train_steps(full, ds, steps=4, batch_size=2, lr=1e-4, progress=False)
    ckpt = tmp_path / "ck.pt"

    def stop(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_steps(part, ds, steps=4, batch_size=2, lr=1e-4, progress=False, checkpoint=ckpt, on_step=stop)
    resumed = train_steps(Fit(Gate()), ds, steps=4, batch_size=2, lr=1e-4, progress=False, checkpoint=ckpt)
    assert resumed.start_step == 2 and set(resumed.lr_capped) == {"net.excitate.weight"}
    sd = full.state_dict()
    restored = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(sd[k], v) for k, v in restored.items())
