"""Tests for the distill package: hooks, Distiller, losses, training helper (single process)."""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distill
from distill import Distiller, FeatureHooks, Supervised, losses, train_steps


# ----------------------------------------------------------------------------------------------- helpers
#: These tiny nets run fastest single-threaded (and the CI machine is shared).
pytestmark = pytest.mark.usefixtures("one_thread")


class TinySR(nn.Module):
    """A miniature x2 SR net with named 'blocks' like RFDN (head, B1, B2, tail)."""

    def __init__(self, nf: int = 8, input_range: float = 1.0, bn: bool = False, scale: int = 2) -> None:
        super().__init__()
        self.input_range, self.scale = input_range, scale
        self.head = nn.Conv2d(3, nf, 3, padding=1)
        self.B1 = nn.Sequential(nn.Conv2d(nf, nf, 3, padding=1), nn.BatchNorm2d(nf) if bn else nn.Identity(), nn.ReLU())
        self.B2 = nn.Sequential(nn.Conv2d(nf, nf, 3, padding=1), nn.ReLU())
        self.tail = nn.Sequential(nn.Conv2d(nf, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        return self.tail(self.B2(self.B1(f)) + f)


class TuckerSR(TinySR):
    """TinySR whose B1/B2 convs are Tucker-style 1x1 -> 3x3 -> 1x1 chains (a 'decomposed' student)."""

    def __init__(self, nf: int = 8, rank: int = 3) -> None:
        super().__init__(nf)
        self.B1 = nn.Sequential(nn.Conv2d(nf, rank, 1), nn.Conv2d(rank, rank, 3, padding=1), nn.Conv2d(rank, nf, 1),
                                nn.ReLU())
        self.B2 = nn.Sequential(nn.Conv2d(nf, rank, 1), nn.Conv2d(rank, rank, 3, padding=1), nn.Conv2d(rank, nf, 1),
                                nn.ReLU())


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def batch(n: int = 2, size: int = 8, scale: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.rand(n, 3, size * scale, size * scale, generator=g)


def models(seed: int = 0, t_nf: int = 12, s_nf: int = 6, **kw) -> tuple[TinySR, TinySR]:
    torch.manual_seed(seed)
    return TinySR(t_nf, **kw), TinySR(s_nf)


PAIRS = [("B1", "B1", 1.0), ("B2", "B2", 0.5)]


def real_patches(n: int, size: int = 16, scale: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned (lr, hr) crops of scikit-image's bundled photos (real images), LR by antialiased bicubic."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]
    hrs = []
    for i in range(n):
        img = photos[i % len(photos)]
        y = int(rng.integers(0, img.shape[0] - size * scale))
        x = int(rng.integers(0, img.shape[1] - size * scale))
        hrs.append(torch.from_numpy(img[y:y + size * scale, x:x + size * scale].copy()).permute(2, 0, 1))
    hr = torch.stack(hrs).float() / 255
    lr = F.interpolate(hr, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return lr, hr


# ------------------------------------------------------------------------------------------------ hooks
def test_hooks_capture_outputs_and_inputs():
    net = TinySR()
    x = torch.rand(1, 3, 8, 8)
    with FeatureHooks(net, ["head", "B1"]) as out_hooks, FeatureHooks(net, ["B1"], capture="input") as in_hooks:
        y = net(x)
        f = net.head(x)
        assert torch.equal(out_hooks["head"], f)
        assert torch.equal(out_hooks["B1"], net.B1(f))
        assert torch.equal(in_hooks["B1"], f)
        assert out_hooks["B1"].requires_grad  # graph kept unless detach=True
        assert y.shape == (1, 3, 16, 16)
        assert all_hooks(net) == 3
    assert all_hooks(net) == 0
    assert not out_hooks.active and not in_hooks.active


def test_hooks_close_is_idempotent_and_clears():
    net = TinySR()
    hooks = FeatureHooks(net, ["B2", "B2", "tail.0"], detach=True)
    assert hooks.names == ["B2", "tail.0"]
    net(torch.rand(1, 3, 4, 4))
    assert not hooks["B2"].requires_grad
    hooks.close()
    hooks.close()
    assert all_hooks(net) == 0
    with pytest.raises(KeyError, match="not hooked"):
        hooks["head"]


def test_hooks_bad_names():
    net = TinySR()
    with pytest.raises(KeyError, match=r"close matches: \['B1'") as err:
        FeatureHooks(net, ["b1"])
    assert "b1" in str(err.value)
    with pytest.raises(KeyError, match="'tail.0'"):
        FeatureHooks(net, ["tail.O"])
    with pytest.raises(TypeError, match="names"):
        FeatureHooks(net, "B1")
    with pytest.raises(ValueError, match="capture"):
        FeatureHooks(net, ["B1"], capture="grad")
    with pytest.raises(ValueError, match="names"):
        FeatureHooks(net, [])
    FeatureHooks(net, ["B1"]).close()
    assert all_hooks(net) == 0  # a failing constructor registered nothing either


def test_hooks_no_feature_before_forward():
    net = TinySR()
    with FeatureHooks(net, ["B1"]) as hooks, pytest.raises(KeyError, match="forward"):
        hooks["B1"]


# ------------------------------------------------------------------------------------------------ losses
def test_losses_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    # |d| = 0, 2, 3, 0
    assert losses.l1_loss(x, y).item() == pytest.approx(5 / 4)
    assert losses.l2_loss(x, y).item() == pytest.approx(13 / 4)
    eps = 1e-3
    expected = (2 * eps + math.sqrt(4 + eps ** 2) + math.sqrt(9 + eps ** 2)) / 4
    assert losses.charbonnier_loss(x, y).item() == pytest.approx(expected, rel=1e-6)
    assert losses.charbonnier_loss(x, x, eps=0.5).item() == pytest.approx(0.5)


def test_fft_loss_hand_computed():
    # Constant images a, b on 4x4: the orthonormal DFT is (a-b)*sqrt(16) at DC and 0 elsewhere;
    # rfft2 keeps 4 x 3 coefficients, each (re, im): 24 numbers -> mean |.| = 4 * |a - b| / 24.
    a, b = torch.full((1, 1, 4, 4), 0.9), torch.full((1, 1, 4, 4), 0.3)
    assert losses.fft_loss(a, b).item() == pytest.approx(4 * 0.6 / 24, rel=1e-6)
    # A unit impulse: every coefficient is 1/sqrt(16) + 0j -> mean = 12 * 0.25 / 24.
    d = torch.zeros(1, 1, 4, 4)
    d[..., 0, 0] = 1
    assert losses.fft_loss(d, torch.zeros_like(d)).item() == pytest.approx(0.125, rel=1e-6)
    # Unnormalized ("backward"): DC = 16 * 0.6
    assert losses.fft_loss(a, b, norm="backward").item() == pytest.approx(16 * 0.6 / 24, rel=1e-6)
    # Parseval: for an orthonormal DFT the sum of squares matches; here check against numpy for a random pair.
    g = torch.Generator().manual_seed(0)
    u, v = torch.rand(2, 3, 6, 5, generator=g), torch.rand(2, 3, 6, 5, generator=g)
    ref = np.fft.rfft2((u - v).numpy(), norm="ortho")
    assert losses.fft_loss(u, v).item() == pytest.approx(np.mean(np.abs(np.stack([ref.real, ref.imag]))), rel=1e-5)


def test_wavelet_loss_hand_computed():
    x = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    zero = torch.zeros_like(x)
    ll, lh, hl, hh = losses.haar_dwt(x)
    assert [t.item() for t in (ll, lh, hl, hh)] == [0.5, 0.5, 0.5, 0.5]
    assert losses.wavelet_loss(x, zero).item() == pytest.approx(1.5)  # three bands of |0.5|
    assert losses.wavelet_loss(x, zero, ll_weight=2.0).item() == pytest.approx(2.5)
    # Low frequencies are ignored: a constant offset costs nothing.
    c = torch.rand(1, 2, 8, 8)
    assert losses.wavelet_loss(c + 0.3, c).item() == pytest.approx(0.0, abs=1e-6)
    # Two levels: a 4x4 image of 2x2 blocks [[1, 0], [0, 0]] in the top-left block only.
    x4 = torch.zeros(1, 1, 4, 4)
    x4[..., :2, :2] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # level 1: band maps are 2x2 with one 0.5 entry -> mean 0.125 each -> 0.375;
    # level 2 runs on LL1 = [[0.5, 0], [0, 0]] -> three bands of 0.25 -> 0.75.
    assert losses.wavelet_loss(x4, torch.zeros_like(x4), levels=2).item() == pytest.approx(0.375 + 0.75)


def test_get_loss_specs():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 3, 8, 8, generator=g), torch.rand(1, 3, 8, 8, generator=g)
    combo = losses.get_loss("0.9*charbonnier+0.1*fft")
    expected = 0.9 * losses.charbonnier_loss(x, y) + 0.1 * losses.fft_loss(x, y)
    assert combo(x, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert isinstance(losses.get_loss("L1"), losses.L1Loss)
    assert losses.get_loss("mse")(x, y).item() == pytest.approx(F.mse_loss(x, y).item(), rel=1e-6)
    assert losses.get_loss(lambda a, b: (a - b).sum())(x, y).item() == pytest.approx((x - y).sum().item(), rel=1e-5)
    for bad in ("l3", "0.5*", "l1+", "-1*l1"):
        with pytest.raises(ValueError, match="feature_loss"):
            losses.get_loss(bad, "feature_loss")
    with pytest.raises(TypeError):
        losses.get_loss(3)
    with pytest.raises(ValueError, match="same shape"):
        losses.l1_loss(x, y[..., :4])
    with pytest.raises(ValueError, match="levels"):
        losses.WaveletLoss(levels=0)
    with pytest.raises(ValueError, match="norm"):
        losses.FFTLoss(norm="none")


@pytest.mark.parametrize("name", ["l1", "l2", "charbonnier", "fft", "wavelet"])
def test_every_loss_as_feature_and_output_loss(name):
    teacher, student = models(input_range=255.0)
    lr, hr = batch()
    d = Distiller(teacher, student, pairs=[("B1", "B1", 0.7)], feature_loss=name, output_loss=name,
                  output_weight=0.3, gt_weight=0.2, gt_loss=name)
    loss, parts = d(lr, hr)
    fn = losses.get_loss(name)
    with FeatureHooks(teacher, ["B1"]) as th, FeatureHooks(student, ["B1"]) as sh, torch.no_grad():
        t_out = teacher(lr * 255) / 255
        s_out = student(lr)
        feat = 0.7 * fn(d.adapters[0](sh["B1"]), th["B1"])
    assert parts["feat0:B1"].item() == pytest.approx(feat.item(), rel=1e-5)
    assert parts["out"].item() == pytest.approx(0.3 * fn(s_out, t_out).item(), rel=1e-5)
    assert parts["gt"].item() == pytest.approx(0.2 * fn(s_out, hr).item(), rel=1e-5)
    assert loss.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in d.parameters())
    d.close()


# --------------------------------------------------------------------------------------------- distiller
def test_close_removes_every_hook_and_restores_teacher():
    teacher, student = models()
    teacher.train()
    d = Distiller(teacher, student, pairs=PAIRS)
    assert all_hooks(teacher) == 2 and all_hooks(student) == 2
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    d.close()
    assert all_hooks(teacher) == 0 and all_hooks(student) == 0
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    with pytest.raises(RuntimeError, match="closed"):
        d(*batch())
    with Distiller(teacher, student, pairs=PAIRS):
        assert all_hooks(student) == 2
    assert all_hooks(teacher) == 0 and all_hooks(student) == 0


def test_teacher_is_frozen_and_bit_identical_after_training():
    torch.manual_seed(0)
    teacher, student = TinySR(12, bn=True), TinySR(6, bn=True)  # BN: running stats would move in train mode
    before = copy.deepcopy(teacher.state_dict())
    d = Distiller(teacher, student, pairs=PAIRS, gt_weight=1.0)
    d.train()
    assert not teacher.training and student.training
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    student_before = copy.deepcopy(student.state_dict())
    for i in range(3):
        loss, _ = d(*batch(seed=i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    teacher.train()  # someone flips it behind the Distiller's back: forward puts it back in eval
    d(*batch())
    assert not teacher.training
    assert all(torch.equal(before[k], teacher.state_dict()[k]) for k in before)
    d.close()


def test_parameters_and_state_dict_exclude_teacher():
    teacher, student = models()
    d = Distiller(teacher, student, pairs=PAIRS, feature_loss="fft")
    ids = {id(p) for p in d.parameters()}
    assert ids == {id(p) for p in student.parameters()} | {id(p) for p in d.adapters.parameters()}
    assert not ids & {id(p) for p in teacher.parameters()}
    assert all(k.startswith(("student.", "adapters.")) for k in d.state_dict())
    assert d.teacher is teacher
    d.double()  # dtype/device moves carry the teacher along
    assert next(teacher.parameters()).dtype == torch.float64
    loss, _ = d(batch()[0].double())
    assert loss.dtype == torch.float64
    d.close()


def test_adapter_shapes():
    teacher, student = models(t_nf=12, s_nf=5)
    d = Distiller(teacher, student, pairs=[("B1", "B1", 1.0), ("B2", "B2", 1.0), ("head", "B2", 0.1)])
    assert len(d.adapters) == 3
    for a in d.adapters:
        assert isinstance(a, nn.Conv2d) and a.kernel_size == (1, 1)
        assert (a.in_channels, a.out_channels) == (5, 12)
        assert a.weight.requires_grad
    d.close()
    # tail.0 outputs 12 channels in both; a custom adapter gets (student_channels, teacher_channels)
    seen = []

    def factory(cs: int, ct: int) -> nn.Module:
        seen.append((cs, ct))
        return nn.Sequential(nn.Conv2d(cs, ct, 1), nn.ReLU())

    d = Distiller(teacher, student, pairs=[("B1", "B1", 1.0), ("tail.0", "tail.0", 1.0)], adapter=factory)
    assert seen == [(5, 12), (12, 12)]
    d.close()
    d = Distiller(teacher, student, pairs=[("tail.0", "tail.0", 1.0)], adapter="identity")
    assert isinstance(d.adapters[0], nn.Identity)
    d.close()
    with pytest.raises(ValueError, match="identity"):
        Distiller(teacher, student, pairs=[("B1", "B1", 1.0)], adapter="identity")
    with pytest.raises(ValueError, match="adapter"):
        Distiller(teacher, student, pairs=[("B1", "B1", 1.0)], adapter="linear")
    assert all_hooks(teacher) == 0 and all_hooks(student) == 0


@pytest.mark.parametrize(
    "pairs, kwargs, exc, match",
    [
        ([("B9", "B1", 1.0)], {}, KeyError, "close matches"),
        ([("B1", "b2", 1.0)], {}, KeyError, "B2"),
        ([("B1", "B1", -1.0)], {}, ValueError, "weight"),
        ([("B1", "B1", 0.0)], {}, ValueError, "weight"),
        ([("B1", "B1", float("nan"))], {}, ValueError, "weight"),
        ([("B1", "B1", float("inf"))], {}, ValueError, "weight"),
        ([("B1", "B1", "1")], {}, TypeError, "weight"),
        ([("B1", "B1", True)], {}, TypeError, "weight"),
        ([("B1", "B1")], {}, TypeError, "pairs"),
        ("B1", {}, TypeError, "pairs"),
        ([(1, "B1", 1.0)], {}, TypeError, "names"),
        ([], {"output_weight": -0.5}, ValueError, "output_weight"),
        ([], {"gt_weight": float("nan")}, ValueError, "gt_weight"),
        ([], {"output_weight": 0.0}, ValueError, "nothing to optimize"),
        ([("B1", "B1", 1.0)], {"feature_loss": "huber"}, ValueError, "feature_loss"),
        ([("B1", "B1", 1.0)], {"capture": "grad"}, ValueError, "capture"),
        ([("B1", "B1", 1.0)], {"probe_size": (3, 8)}, ValueError, "probe_size"),
        ([("B1", "tail", 1.0)], {}, ValueError, "spatial"),  # student 'tail' is at HR size
    ],
)
def test_bad_configurations_raise_and_leave_no_hooks(pairs, kwargs, exc, match):
    teacher, student = models()
    with pytest.raises(exc, match=match):
        Distiller(teacher, student, pairs=pairs, **kwargs)
    assert all_hooks(teacher) == 0 and all_hooks(student) == 0
    assert all(p.requires_grad for p in teacher.parameters())


def test_forward_argument_errors():
    teacher, student = models()
    d = Distiller(teacher, student, pairs=PAIRS, gt_weight=1.0)
    lr, hr = batch()
    with pytest.raises(ValueError, match="hr"):
        d(lr)
    with pytest.raises(ValueError, match="hr"):
        d(lr, hr[..., :8])
    with pytest.raises(TypeError, match="lr"):
        d(lr[0])
    d.close()
    with pytest.raises(ValueError, match="outputs differ"):
        Distiller(TinySR(4, scale=2), TinySR(4, scale=3), output_weight=1.0)
    with pytest.raises(ValueError, match="different modules"):
        Distiller(teacher, teacher, output_weight=1.0)


def test_input_ranges_compare_outputs_in_unit_range():
    """A 0-255 teacher computing exactly the student's function gives a zero output term."""
    torch.manual_seed(0)
    student = TinySR(6)

    class Scaled(nn.Module):
        input_range = 255.0

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x / 255) * 255

    teacher = Scaled(copy.deepcopy(student))
    d = Distiller(teacher, student, output_weight=1.0)
    loss, parts = d(*batch())
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    d.close()
    teacher.input_range = 1.0  # now the teacher sees 0-1 input it was not built for: the term is not zero
    d = Distiller(teacher, student, output_weight=1.0)
    assert d(*batch())[0].item() > 1e-3
    d.close()


@pytest.mark.parametrize("kind", ["smaller_nf", "pruned", "tucker"])
def test_students_of_other_widths(kind):
    torch.manual_seed(0)
    teacher = TinySR(12)
    if kind == "smaller_nf":
        student = TinySR(4)
    elif kind == "pruned":  # B1's inner conv pruned to 5 channels, the block output keeps 8
        student = TinySR(8)
        student.B1 = nn.Sequential(nn.Conv2d(8, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 8, 1))
    else:
        student = TuckerSR(8, rank=3)
    d = Distiller(teacher, student, pairs=[("B1", "B1", 1.0), ("B2", "B2", 1.0)], gt_weight=1.0)
    s_channels = {"smaller_nf": 4, "pruned": 8, "tucker": 8}[kind]
    assert [(a.in_channels, a.out_channels) for a in d.adapters] == [(s_channels, 12)] * 2
    loss, _ = d(*batch())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())
    assert d.unused_parameters == []
    d.close()


def test_unused_parameters_reported_for_feature_only_distillation():
    teacher, student = models()
    d = Distiller(teacher, student, pairs=[("B1", "B1", 1.0)], output_weight=0.0)
    assert sorted(d.unused_parameters) == sorted(
        f"student.{n}" for n, _ in student.named_parameters() if n.startswith(("B2", "tail")))
    assert set(d(*batch())[1]) == {"feat0:B1"}
    d.close()


def test_rep_block_student_online_mode():
    import reparam

    torch.manual_seed(0)
    teacher = TinySR(12)
    student = reparam.repify(TinySR(6), "ecb", include=["B1.0", "B2.0"])
    reparam.set_mode(student, "online")
    blocks = [m for m in student.modules() if isinstance(m, reparam.RepBlock)]
    assert len(blocks) == 2 and all(b.mode == "online" for b in blocks)
    d = Distiller(teacher, student, pairs=[("B1", "B1", 1.0), ("B2.0", "B2.0", 1.0)], gt_weight=1.0)
    assert d.unused_parameters == []
    opt = torch.optim.Adam(d.parameters(), lr=3e-3)
    lr, hr = real_patches(4, size=12)
    first = None
    for _ in range(15):
        loss, _ = d(lr, hr)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert d(lr, hr)[0].item() < first
    branch_grads = [p.grad for b in blocks for p in b.parameters()]
    assert branch_grads and all(g is not None for g in branch_grads)
    d.close()
    assert all_hooks(student) == 0
    fused = reparam.fuse_all(student.eval())
    lr1 = lr[:1]
    assert torch.allclose(fused(lr1), student(lr1), atol=1e-5)


def test_fx_traced_student_works_with_hooks():
    teacher, student = models()
    traced = torch.fx.symbolic_trace(student)
    traced.input_range = 1.0
    # A GraphModule calls leaf modules only: a container name ("B1") never runs and is reported at construction.
    with pytest.raises(RuntimeError, match="leaf"):
        Distiller(teacher, traced, pairs=[("B1", "B1", 1.0)])
    assert all_hooks(traced) == 0
    d = Distiller(teacher, traced, pairs=[("B1", "B1.2", 1.0), ("B2.0", "B2.0", 1.0)], gt_weight=1.0)
    loss, parts = d(*batch())
    assert set(parts) == {"feat0:B1.2", "feat1:B2.0", "out", "gt"}
    loss.backward()
    assert all(p.grad is not None for p in d.parameters())
    d.close()
    assert all_hooks(traced) == 0


def test_distillation_decreases_loss_on_real_images():
    """A student learns to match a teacher (features + output) on real photo patches."""
    torch.manual_seed(0)
    teacher, student = TinySR(12), TinySR(6)
    lr, hr = real_patches(16, size=12)
    hold_lr, hold_hr = real_patches(4, size=12, seed=1)
    d = Distiller(teacher, student, pairs=PAIRS, output_weight=1.0, gt_weight=1.0)
    with torch.no_grad():
        before = d(hold_lr, hold_hr)[0].item()
    result = train_steps(d, torch.utils.data.TensorDataset(lr, hr), steps=40, batch_size=4,
                         optimizer_fn=lambda ps: torch.optim.Adam(ps, lr=3e-3), progress=False, log_every=10)
    with torch.no_grad():
        after_loss, parts = d(hold_lr, hold_hr)
    assert after_loss.item() < 0.7 * before
    assert result.step == 40 and len(result.history) == 4
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    d.close()


# ------------------------------------------------------------------------------------------- train_steps
def test_train_steps_checkpoint_resume_and_interrupt(tmp_path):
    teacher, student = models()
    lr, hr = batch(n=8)
    ds = torch.utils.data.TensorDataset(lr, hr)
    ckpt = tmp_path / "run.pt"
    d = Distiller(teacher, student, pairs=PAIRS, gt_weight=1.0)
    r1 = train_steps(d, ds, steps=3, batch_size=2, checkpoint=ckpt, progress=False)
    assert r1.step == 3 and r1.start_step == 0 and ckpt.is_file()
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 3 and set(state) >= {"model", "optimizer"}
    assert all(k.startswith(("student.", "adapters.")) for k in state["model"])
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in state["model"].items())
    r2 = train_steps(d, ds, steps=5, batch_size=2, checkpoint=ckpt, progress=False)
    assert (r2.start_step, r2.step, r2.steps_run) == (3, 5, 2)
    assert torch.load(ckpt, weights_only=True)["step"] == 5

    class Interrupting(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int):
            if Interrupting.calls >= 6:  # during the 4th batch of 2
                raise KeyboardInterrupt
            Interrupting.calls += 1
            return lr[i], hr[i]

    Interrupting.calls = 0
    ckpt2 = tmp_path / "interrupted.pt"
    with pytest.raises(KeyboardInterrupt):
        train_steps(d, Interrupting(), steps=10, batch_size=2, checkpoint=ckpt2, progress=False)
    assert torch.load(ckpt2, weights_only=True)["step"] == 3
    d.close()


def test_train_steps_supervised_and_argument_errors():
    torch.manual_seed(0)
    student = TinySR(6)
    lr, hr = real_patches(8, size=12)
    sup = Supervised(student, "l1")
    with torch.no_grad():
        before = sup(lr, hr)[0].item()
    train_steps(sup, torch.utils.data.TensorDataset(lr, hr), steps=30, batch_size=4, lr=3e-3, progress=False)
    with torch.no_grad():
        assert sup(lr, hr)[0].item() < before
    with pytest.raises(ValueError, match="hr"):
        sup(lr)
    ds = torch.utils.data.TensorDataset(lr, hr)
    with pytest.raises(ValueError, match="steps"):
        train_steps(sup, ds, steps=-1)
    with pytest.raises(TypeError, match="batch_size"):
        train_steps(sup, ds, steps=1, batch_size=2.0)
    with pytest.raises(ValueError, match="lr"):
        train_steps(sup, ds, steps=1, lr=0.0)
    with pytest.raises(TypeError, match="data"):
        train_steps(sup, 3, steps=1)


def test_public_api():
    for name in ("FeatureHooks", "Distiller", "train_steps", "Supervised", "get_loss", "fft_loss", "wavelet_loss"):
        assert hasattr(distill, name)
    assert distill.ddp.unwrap(nn.Linear(1, 1)).in_features == 1
    ctx = distill.ddp.DistContext()
    assert not ctx.distributed and ctx.is_main


def test_init_from_env_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = distill.ddp.init_from_env(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.device, ctx.initialized_here) == (0, 1, torch.device("cpu"), False)
    m = nn.Linear(2, 2)
    assert distill.ddp.wrap(m, ctx) is m
    assert distill.ddp.same_on_all_ranks(m)
    assert torch.equal(distill.ddp.flat_parameters(m), torch.cat([m.weight.reshape(-1), m.bias]).double())
    with pytest.raises(ValueError, match="backend"):
        distill.ddp.init_from_env(backend="tcp")


@pytest.mark.parametrize("channels_last, ema_decay", [(False, None), (True, None), (False, 0.8), (True, 0.8)])
@pytest.mark.parametrize("stop_at", [3, 4, 9])  # inside the 1st epoch, at an epoch boundary, inside the 3rd
def test_train_steps_resume_is_bit_exact(tmp_path, stop_at, channels_last, ema_decay):
    """Interrupt after step ``stop_at`` (on_step hook), resume from the checkpoint: same weights as no stop
    (with a weight average too: the checkpoint holds it beside the training weights)."""
    lr, hr = batch(n=8)
    ds = torch.utils.data.TensorDataset(lr, hr)  # 4 batches of 2 per epoch

    def run(ckpt, stop=None):
        torch.manual_seed(0)
        teacher, student = models()
        d = Distiller(teacher, student, pairs=PAIRS, gt_weight=1.0)

        def hook(step):
            if step == stop:
                raise KeyboardInterrupt

        try:
            res = train_steps(d, ds, steps=12, batch_size=2, checkpoint=ckpt, checkpoint_every=100, seed=5,
                              progress=False, on_step=hook, log_every=1, channels_last=channels_last,
                              ema_decay=ema_decay)
        finally:
            d.close()
        return student, res

    ref, ref_res = run(tmp_path / "ref.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt", stop=stop_at)
    cut = torch.load(tmp_path / "cut.pt", weights_only=True)
    assert cut["step"] == stop_at and ("ema" in cut) == (ema_decay is not None)
    resumed, res = run(tmp_path / "cut.pt")
    assert (res.start_step, res.step) == (stop_at, 12)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref_res.history]  # history restored too
    again, res = run(tmp_path / "cut.pt")  # a finished run restored: trains nothing, ends the same
    assert res.steps_run == 0
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_steps_ema_ends_at_the_warmed_up_average_of_the_steps(channels_last):
    """``ema_decay``: the module ends at ``avg_t = d_t avg_{t-1} + (1 - d_t) w_t`` over the weights ``w_t`` after
    each step (``avg_0`` = the start, ``d_t = min(decay, (1 + t) / (10 + t))``), in float64 within 1e-12; an
    interrupted run keeps its last step's weights."""
    from distill.ema import ema_factor

    torch.manual_seed(2)
    net = TinySR(6).double()
    lr, hr = batch(n=6, size=7)  # odd size
    ds = torch.utils.data.TensorDataset(lr.double(), hr.double())
    sup = Supervised(net)
    avg = {k: v.detach().clone() for k, v in net.named_parameters()}
    decay, last = 0.7, {}

    def follow(step):  # the module holds the training weights during training
        d = ema_factor(decay, step)
        for k, v in net.named_parameters():
            avg[k] = d * avg[k] + (1 - d) * v.detach()
            last[k] = v.detach().clone()

    res = train_steps(sup, ds, steps=8, batch_size=2, lr=5e-2, seed=3, progress=False, on_step=follow,
                      ema_decay=decay, channels_last=channels_last)
    assert res.ema_decay == decay
    assert [ema_factor(decay, t) for t in (1, 2, 30)] == [2 / 11, 3 / 12, decay]
    for k, v in net.named_parameters():
        assert (v - avg[k]).abs().max() <= 1e-12 * max(avg[k].abs().max().item(), 1.0), k
        assert v.is_contiguous(), k
    assert any((v - last[k]).abs().max() > 1e-4 for k, v in net.named_parameters())  # not the last step's

    def stop(step):
        follow(step)
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_steps(sup, ds, steps=8, batch_size=2, lr=5e-2, progress=False, on_step=stop, ema_decay=decay)
    assert all(torch.equal(v, last[k]) for k, v in net.named_parameters())


def test_train_steps_ema_argument_errors(tmp_path):
    sup = Supervised(nn.Conv2d(3, 3, 3, padding=1))
    lr, hr = batch(n=4)
    ds = torch.utils.data.TensorDataset(lr, hr[:, :, ::2, ::2])
    for bad in (0, 1, 1.5, -0.1, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match="ema_decay"):
            train_steps(sup, ds, steps=1, batch_size=2, progress=False, ema_decay=bad)
    ckpt = tmp_path / "plain.pt"
    train_steps(sup, ds, steps=1, batch_size=2, progress=False, checkpoint=ckpt)
    with pytest.raises(ValueError, match="ema_decay"):  # no average to resume from
        train_steps(sup, ds, steps=2, batch_size=2, progress=False, checkpoint=ckpt, ema_decay=0.9)
    ema = distill.WeightEMA(list(sup.named_parameters()), 0.9)
    with pytest.raises(ValueError, match="ema"):
        ema.load_state_dict({"weight": torch.zeros(3, 3, 3, 3)})


def _seen_formats(model: nn.Module) -> tuple[list[bool], Any]:
    """Record, at each forward of ``model``, whether its input and every 4-D weight are channels-last."""
    seen: list[bool] = []

    def pre(module, args):
        weights = [p for p in module.parameters() if p.dim() == 4]
        seen.append(all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                        for t in [args[0], *weights]))
    return seen, model.register_forward_pre_hook(pre)


def test_train_steps_channels_last_trains_nhwc_to_the_same_weights():
    """``channels_last=True`` really runs NHWC (the batches and 4-D weights inside the student's forward), ends
    in float64 at the weights of the NCHW run within 1e-10 relative, and returns student and teacher contiguous."""
    lr, hr = batch(n=4, size=9)  # odd size
    ds = torch.utils.data.TensorDataset(lr.double(), hr.double())
    results = {}
    for cl in (False, True):
        teacher, student = models(seed=3, bn=True)
        teacher.double(), student.double()
        teacher.B1[1].running_mean.uniform_(-0.5, 0.5)
        d = Distiller(teacher, student, pairs=PAIRS, gt_weight=1.0)
        seen, handle = _seen_formats(student)
        try:
            train_steps(d, ds, steps=4, batch_size=2, seed=1, lr=1e-2, progress=False, channels_last=cl)
        finally:
            handle.remove()
            d.close()
        assert seen and all(f == cl for f in seen), (cl, seen)
        for name, t in [*student.state_dict().items(), *teacher.state_dict().items()]:
            assert t.is_contiguous(), name
        results[cl] = student.state_dict()
    for k, a in results[False].items():
        b = results[True][k]
        assert (a - b).abs().max() <= 1e-10 * max(a.abs().max().item(), 1.0), k
    start = models(seed=3, bn=True)[1].double().state_dict()
    moved = [k for k, a in results[False].items() if not torch.equal(a, start[k])]
    assert moved  # the runs trained: the comparison is between trained weights


def test_train_steps_channels_last_is_undone_when_interrupted():
    teacher, student = models()
    d = Distiller(teacher, student, gt_weight=1.0)

    def stop(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_steps(d, torch.utils.data.TensorDataset(*batch(n=4)), steps=5, batch_size=2, progress=False,
                    on_step=stop, channels_last=True)
    d.close()
    assert all(p.is_contiguous() for m in (teacher, student) for p in m.parameters())
    with pytest.raises(TypeError, match="channels_last"):
        train_steps(Supervised(student), torch.utils.data.TensorDataset(*batch(n=4)), steps=1, channels_last="yes")


def test_train_steps_progress_names_the_job(capsys, monkeypatch):
    monkeypatch.setenv("EFFSR_PROGRESS", "plain")
    sup = Supervised(nn.Conv2d(3, 3, 3, padding=1))
    lr, hr = batch(n=4)
    train_steps(sup, torch.utils.data.TensorDataset(lr, hr[:, :, ::2, ::2]), steps=2, batch_size=2,
                desc="teacher training")
    err = capsys.readouterr().err
    assert "teacher training: 2/2 step (100%)" in err and "\r" not in err


class _Clock:
    """A fake ``time.perf_counter`` that advances one second per training step (driven by ``on_step``)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("ema_decay", [None, 0.8])
def test_train_steps_time_budget_stops_resumes_and_caps(tmp_path, monkeypatch, ema_decay):
    """``max_seconds``: training ends once the budget is spent (the check after step k sees k - 1 seconds here,
    so 3.5 s end after step 5), the checkpoint carries the time spent, an interrupted run resumed under the same
    budget ends at the same step with the same weights, a spent budget trains nothing more, ``steps`` still caps."""
    import distill.train as train_mod

    lr, hr = batch(n=8)
    ds = torch.utils.data.TensorDataset(lr, hr)

    def run(ckpt, stop=None, steps=100, clock_start=0.0, max_seconds=3.5):
        clock = _Clock(clock_start)
        monkeypatch.setattr(train_mod.time, "perf_counter", clock)
        torch.manual_seed(0)
        teacher, student = models()
        d = Distiller(teacher, student, pairs=PAIRS, gt_weight=1.0)

        def hook(step):
            clock.now += 1.0
            if step == stop:
                raise KeyboardInterrupt

        try:
            res = train_steps(d, ds, steps=steps, batch_size=2, checkpoint=ckpt, checkpoint_every=100, seed=5,
                              progress=False, on_step=hook, log_every=100, ema_decay=ema_decay,
                              max_seconds=max_seconds)
        finally:
            d.close()
        return student, res

    ref, res = run(tmp_path / "ref.pt")
    assert (res.step, res.out_of_time, res.seconds, res.total_seconds) == (5, True, 5.0, 5.0)
    assert [h["step"] for h in res.history] == [5.0]  # the last step is logged although 5 % log_every != 0
    assert torch.load(tmp_path / "ref.pt", weights_only=True)["seconds"] == 5.0
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt", stop=2)
    assert torch.load(tmp_path / "cut.pt", weights_only=True)["seconds"] == 2.0
    resumed, res = run(tmp_path / "cut.pt", clock_start=100.0)
    assert (res.start_step, res.step, res.out_of_time, res.total_seconds) == (2, 5, True, 5.0)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()))
    again, res = run(tmp_path / "ref.pt")  # the budget is spent: nothing more is trained, the same weights come back
    assert (res.steps_run, res.out_of_time) == (0, True)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), again.state_dict().values()))
    _, res = run(tmp_path / "capped.pt", steps=3)  # steps reached first
    assert (res.step, res.out_of_time) == (3, False)
    _, res = run(None, max_seconds=None, steps=7)  # no budget: the clock plays no part
    assert (res.step, res.out_of_time) == (7, False)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "10"])
def test_train_steps_time_budget_argument_errors(bad):
    teacher, student = models()
    lr, hr = batch(n=4)
    d = Distiller(teacher, student, pairs=PAIRS, gt_weight=1.0)
    with pytest.raises(ValueError, match="max_seconds"):
        train_steps(d, torch.utils.data.TensorDataset(lr, hr), steps=1, batch_size=2, progress=False, max_seconds=bad)
    d.close()
