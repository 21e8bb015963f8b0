"""Tests for effsr.metrics (profile, runtime) and effsr.inference (upscale, tiling, evaluate)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effsr import inference, metrics


# ---------------------------------------------------------------------------------------------- models
class Tiny(nn.Module):
    """Every counted kind of module once, with hand-checkable numbers for a 3 x 8 x 8 input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)                         # 224 params
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)   # 144 params
        self.bn = nn.BatchNorm2d(8)                                        # 16 params
        self.gate = nn.Sigmoid()                                           # not counted
        self.conv3 = nn.Conv2d(8, 2, 3, stride=2, padding=1)               # 146 params
        self.fc = nn.Linear(2, 5)                                          # 15 params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(self.bn(self.conv2(self.act(self.conv1(x)))))
        y = self.conv3(y)                                                  # 2 x 4 x 4
        return self.fc(y.mean(dim=(2, 3)))


TINY_PARAMS = 224 + 144 + 16 + 146 + 15
TINY_CONV_MACS = 9 * 3 * 8 * 64 + 9 * 8 * 2 * 64 + 9 * 8 * 2 * 16       # conv1, conv2 (groups=4), conv3
TINY_FLOPS = TINY_CONV_MACS + 8 * 64 + 2 * 8 * 64 + 2 * 5               # + ReLU + affine BN + Linear
TINY_ACTS = 8 * 64 + 8 * 64 + 2 * 16


class FunctionalConv(nn.Module):
    """A conv done with F.conv2d on a parameter: invisible to module hooks, visible to aten counting."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, padding=1)


class DataDependent(nn.Module):
    """Cannot run on the meta device (.item()), so profile must fall back to a real forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if float(y.abs().max().item()) >= 0:
            y = self.drop(y)
        return y


class Upsampler(nn.Module):
    """x``scale`` SR net of three 3x3 convs (receptive-field radius 3 LR pixels) and a pixel shuffle."""

    def __init__(self, scale: int = 2, input_range: float = 255.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(8, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale),
        ).to(dtype)
        self.scale = scale
        self.input_range = input_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Nearest(nn.Module):
    """Exact nearest-neighbour x2 upsampling; optional gain to test clamping."""

    def __init__(self, input_range: float = 255.0, gain: float = 1.0) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.input_range, self.scale, self.gain = input_range, 2, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest") * self.gain + self.dummy


def _nearest2(img: np.ndarray) -> np.ndarray:
    return img.repeat(2, axis=0).repeat(2, axis=1)


# --------------------------------------------------------------------------------------------- profile
# What the official counter (utils/model_summary.py of the NTIRE 2022 ESR repository: get_model_flops and
# get_model_activation, 3 x 256 x 256) prints for the official code of each network, integer for integer.
OFFICIAL_COUNTS = {   # params, FLOPs (MACs), activations, convs
    "rfdn": (433_448, 27_102_622_560, 112_034_240, 64),
    "rfdn_pruned": (289_888, 17_700_828_000, 91_718_080, 64),
    "rlfn": (317_218, 19_695_306_752, 80_045_184, 39),
    "fmen": (341_066, 22_280_011_776, 72_089_600, 34),
    "imdn": (893_936, 58_531_512_320, 154_140_672, 43),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_profile_reproduces_the_official_counter_exactly(name):
    from effsr import models

    p = metrics.profile(models.build(name))
    assert (p.params, p.flops, p.activations, p.convs) == OFFICIAL_COUNTS[name]
    # aten counts 2 FLOPs per MAC of the convs only (not the activation-module elements the challenge adds)
    assert 2 * (p.flops - 160_000_000) < p.aten_flops <= 2 * p.flops


def test_profile_published_two_decimal_numbers():
    from effsr import models

    got = {n: round(metrics.profile(models.build(n)).flops / 1e9, 2) for n in ("rfdn", "fmen")}
    assert got == {"rfdn": 27.10, "fmen": 22.28}


def test_profile_does_not_count_an_activation_outside_the_module_tree():
    """The official FMEN's global ``nn.LeakyReLU`` is no submodule: the challenge's hooks never see it."""
    outside = nn.LeakyReLU(0.1)

    class GlobalAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1, bias=False)
            self.inner = nn.LeakyReLU(0.1)

        def forward(self, x):
            return self.inner(outside(self.conv(x)))

    p = metrics.profile(GlobalAct(), input_size=(1, 3, 5))
    assert p.flops == 2 * 15 + 2 * 15  # conv MACs + the inner activation only


def test_profile_counts_only_batchnorm2d_like_the_challenge():
    class Norms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn2 = nn.BatchNorm2d(2)
            self.bn2_plain = nn.BatchNorm2d(2, affine=False)
            self.bn1 = nn.BatchNorm1d(2)

        def forward(self, x):
            y = self.bn2_plain(self.bn2(x))
            return self.bn1(y.flatten(2)).view_as(y)

    p = metrics.profile(Norms(), input_size=(2, 3, 4))
    assert p.flops == 2 * 24 + 24  # affine BatchNorm2d 2 per element, plain 1, BatchNorm1d not hooked


def test_profile_tiny_model_hand_counts():
    p = metrics.profile(Tiny(), input_size=(3, 8, 8))
    assert (p.params, p.flops, p.activations, p.convs) == (TINY_PARAMS, TINY_FLOPS, TINY_ACTS, 3)
    assert p.aten_flops == 2 * (TINY_CONV_MACS + 2 * 5)   # FlopCounterMode: 2 x (conv MACs + Linear MACs)
    assert p.input_size == (3, 8, 8)


def test_profile_meta_and_real_runs_agree_and_leave_model_untouched():
    model = Tiny().train()
    model.bn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = metrics.profile(model, input_size=(3, 8, 8))
    real = metrics.profile(model, input_size=(3, 8, 8), use_meta=False)
    assert fast == real
    assert model.training and model.conv1.training and not model.bn.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats not updated
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_aten_flops_sees_functional_conv_hooks_do_not():
    p = metrics.profile(FunctionalConv(), input_size=(3, 5, 6))
    assert p.flops == 0 and p.convs == 0 and p.activations == 0
    assert p.aten_flops == 2 * (9 * 3 * 4 * 30)
    assert p.params == 4 * 3 * 9


def test_profile_falls_back_to_real_forward_and_restores_train_mode():
    model = DataDependent().train()
    p = metrics.profile(model, input_size=(3, 4, 4))
    assert (p.flops, p.activations, p.convs) == (3 * 4 * 16, 4 * 16, 1)
    assert model.training and model.drop.training


def test_profile_counts_every_call_of_a_shared_conv():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1, bias=False)

        def forward(self, x):
            return self.conv(self.conv(x))

    p = metrics.profile(Twice(), input_size=(2, 3, 3))
    assert (p.params, p.flops, p.activations, p.convs) == (4, 2 * 4 * 9, 2 * 2 * 9, 2)


@pytest.mark.parametrize("bad", [(3, 256), (3, 0, 4), (3, 4.0, 4), "abc", None])
def test_profile_rejects_bad_input_size(bad):
    with pytest.raises(ValueError, match="input_size"):
        metrics.profile(Tiny(), input_size=bad)


def test_profile_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        metrics.profile("rfdn")


def test_as_dict_is_plain_json_and_format_table():
    p = metrics.profile(Tiny(), input_size=(3, 8, 8))
    d = p.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert all(type(d[k]) is int for k in ("params", "flops", "activations", "convs", "aten_flops"))
    big = metrics.Profile(params=433_448, flops=27_102_622_560, activations=112_034_240, convs=64,
                          aten_flops=54_067_296_768)
    table = metrics.format_table({"tiny": p, "rfdn": big})
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["model", "params", "params"]
    assert lines[2].startswith("tiny") and lines[3].startswith("rfdn")
    assert lines[2].split()[1] == f"{TINY_PARAMS:,}"
    assert lines[3].split()[1:7] == ["433,448", "0.433", "27.10", "112.03", "64", "54.07"]


# --------------------------------------------------------------------------------------------- runtime
def test_runtime_cpu_reports_best_trial_and_restores_state():
    model = Upsampler().train()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), torch.rand(3, 9, 7) * 255]
    r = metrics.runtime(model, images, device="cpu", trials=2, warmup=1)
    assert len(r["trials_ms"]) == 2 and r["ms_per_image"] == min(r["trials_ms"]) > 0
    assert r["device"] == "cpu" and r["images"] == 2 and r["tile"] is None
    assert r["max_memory_mb"] is None or r["max_memory_mb"] > 1
    assert model.training


def test_runtime_tiled_counts_tiles():
    r = metrics.runtime(Upsampler(), [np.zeros((10, 7, 3), np.uint8)], device="cpu", trials=1, warmup=0,
                        tile=4, tile_overlap=2)
    assert r["tiles_per_image"] == [3 * 2] and r["tile"] == 4


@pytest.mark.parametrize("kwargs,name", [({"trials": 0}, "trials"), ({"warmup": -1}, "warmup"),
                                         ({"tile": 0}, "tile"), ({"device": "nonsense"}, "device")])
def test_runtime_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        metrics.runtime(Upsampler(), [np.zeros((4, 4, 3), np.uint8)], **kwargs)


def test_runtime_rejects_empty_and_bad_images():
    with pytest.raises(ValueError, match="empty"):
        metrics.runtime(Upsampler(), [])
    with pytest.raises(ValueError, match=r"images\[0\]"):
        metrics.runtime(Upsampler(), [np.zeros((4, 4), np.uint8)])


# ------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("input_range", [255.0, 1.0])
def test_upscale_handles_input_range_exactly(input_range):
    rng = np.random.default_rng(1)
    lr = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    sr = inference.upscale(Nearest(input_range), lr)
    assert sr.dtype == np.uint8 and np.array_equal(sr, _nearest2(lr))


def test_upscale_clamps_and_rounds():
    lr = np.array([[[0, 100, 200]]], dtype=np.uint8)
    assert inference.upscale(Nearest(gain=1.5), lr)[0, 0].tolist() == [0, 150, 255]
    assert inference.upscale(Nearest(gain=-1.0), lr)[0, 0].tolist() == [0, 0, 0]
    assert inference.upscale(Nearest(gain=1.005), lr)[0, 0].tolist() == [0, 100, 201]  # 200*1.005=201


@pytest.mark.parametrize("shape,tile", [((13, 11), 4), ((16, 16), 5), ((9, 20), 8), ((7, 7), 3)])
def test_tiled_forward_equals_untiled_with_enough_overlap(shape, tile):
    model = Upsampler(dtype=torch.float64).eval()
    x = torch.rand(1, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 255
    full = inference.forward(model, x)
    tiled = inference.forward(model, x, tile=tile, tile_overlap=3)
    assert tiled.shape == full.shape
    assert torch.allclose(tiled, full, rtol=0, atol=1e-9)
    # Too little context changes pixels near the tile seams: the test above can fail.
    assert not torch.allclose(inference.forward(model, x, tile=tile, tile_overlap=1), full, rtol=0, atol=1e-6)


def test_upscale_tiled_matches_untiled_uint8():
    lr = np.random.default_rng(3).integers(0, 256, (10, 13, 3), dtype=np.uint8)
    model = Upsampler(dtype=torch.float64)
    assert np.array_equal(inference.upscale(model, lr, tile=4, tile_overlap=3), inference.upscale(model, lr))


@pytest.mark.parametrize("kwargs,exc,name", [
    ({"lr_uint8": np.zeros((4, 4, 3), np.float32)}, TypeError, "lr_uint8"),
    ({"lr_uint8": np.zeros((4, 4), np.uint8)}, ValueError, "lr_uint8"),
    ({"tile": -2}, ValueError, "tile"),
    ({"tile_overlap": -1}, ValueError, "tile_overlap"),
])
def test_upscale_rejects_bad_arguments(kwargs, exc, name):
    args = {"lr_uint8": np.zeros((4, 4, 3), np.uint8), **kwargs}
    with pytest.raises(exc, match=name):
        inference.upscale(Nearest(), **args)


def _pairs(n: int = 3, seed: int = 4) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lr = rng.integers(0, 256, (12, 14, 3), dtype=np.uint8)
        noise = rng.integers(-3 * (i + 1), 3 * (i + 1) + 1, (24, 28, 3))
        hr = np.clip(_nearest2(lr).astype(int) + noise, 0, 255).astype(np.uint8)
        out.append((f"img{i}", lr, hr))
    return out


def test_evaluate_means_per_image_and_saved_images(tmp_path):
    from PIL import Image

    from effsr import quality

    pairs = _pairs()
    model = Nearest()
    res = inference.evaluate(model, pairs, progress=False, save_dir=tmp_path / "sr")
    assert [r["name"] for r in res["per_image"]] == ["img0", "img1", "img2"]
    for key in ("psnr_rgb", "psnr_y", "ssim_y"):
        assert isinstance(res[key], float)
        assert res[key] == pytest.approx(np.mean([r[key] for r in res["per_image"]]))
    # More noise, lower PSNR; and the numbers are quality.* of the upscaled image with shave = scale.
    psnrs = [r["psnr_rgb"] for r in res["per_image"]]
    assert psnrs[0] > psnrs[1] > psnrs[2]
    name, lr, hr = pairs[1]
    assert res["per_image"][1]["psnr_y"] == quality.psnr(_nearest2(lr), hr, shave=2, y_channel=True)
    saved = np.asarray(Image.open(tmp_path / "sr" / "img1.png"))
    assert np.array_equal(saved, _nearest2(lr))


def test_evaluate_crops_hr_remainder_and_rejects_mismatch():
    name, lr, hr = _pairs(1)[0]
    padded = np.pad(hr, ((0, 1), (0, 1), (0, 0)))          # HR not a multiple of the scale: cropped
    res = inference.evaluate(Nearest(), [(name, lr, padded)], progress=False)
    ref = inference.evaluate(Nearest(), [(name, lr, hr)], progress=False)
    assert res["psnr_rgb"] == ref["psnr_rgb"]
    with pytest.raises(ValueError, match="size mismatch"):
        inference.evaluate(Nearest(), [(name, lr, hr[:-4])], progress=False)
    with pytest.raises(ValueError, match="empty"):
        inference.evaluate(Nearest(), [], progress=False)


# ------------------------------------------------------------------------------------------- real data
@pytest.mark.data
def test_rfdn_set5_tiled_close_but_not_identical(shared_data, checkpoints, one_thread):
    """ESA pools over the whole feature map, so tiles change RFDN's output slightly (documented)."""
    from effsr import data, models

    model = models.load("rfdn", checkpoints / "rfdn_aim2020.pth")
    pair = data.open_dataset(shared_data / "set5")[2]        # butterfly, 64 x 64 LR
    full = inference.upscale(model, pair.lr)
    tiled = inference.upscale(model, pair.lr, tile=32, tile_overlap=16)
    from effsr import quality

    assert not np.array_equal(full, tiled)
    assert quality.psnr(tiled, full, shave=0) > 40
    assert abs(quality.psnr(tiled, pair.hr) - quality.psnr(full, pair.hr)) < 0.1
