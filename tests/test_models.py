"""Tests for effsr.models: architectures, checkpoints, conv= rep blocks, config and error handling."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reparam
from effsr import models
from effsr.models import CheckpointMismatchError

CHECKPOINTS = {
    "rfdn": "rfdn_aim2020.pth",
    "rfdn_pruned": "rfdn_pruned_ntire2022.pth",
    "rlfn": "rlfn_ntire2022.pth",
    "fmen": "fmen_ntire2022.pth",
    "imdn": "imdn_aim2019.pth",
}
PARAMS = {"rfdn": 433_448, "rfdn_pruned": 289_888, "rlfn": 317_218, "fmen": 341_066, "imdn": 893_936}
INPUT_RANGE = {"rfdn": 255.0, "rfdn_pruned": 255.0, "rlfn": 255.0, "fmen": 255.0, "imdn": 1.0}
# Set5 x4 mean Y-PSNR floors. Published: RFDN ~32.2, MegSR pruned RFDN 32.12, IMDN 32.21; the NTIRE 2022
# RLFN/FMEN checkpoints are the challenge-sized models (tuned to just pass 29.00 dB on DIV2K valid), and
# measure ~0.15-0.2 dB below their papers' larger variants (32.24). Bicubic is 28.42.
SET5_Y_FLOOR = {"rfdn": 32.05, "rfdn_pruned": 32.0, "rlfn": 31.95, "fmen": 31.9, "imdn": 32.1}
# Small configs for the structural tests (fast on CPU).
SMALL = {
    "rfdn": dict(nf=8, num_blocks=2, esa_channels=4),
    "rfdn_pruned": dict(nf=8, num_blocks=2, esa_channels=4),
    "rlfn": dict(nf=8, mid_channels=6, num_blocks=2, esa_channels=4),
    "fmen": dict(nf=8, num_blocks=2, mid_channels=4, warmup_mid_channels=4),
    "imdn": dict(nf=8, num_blocks=2),
}
NAMES = list(CHECKPOINTS)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturb(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Move every parameter away from its init (rep blocks start near trivial kernels)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def rand_input(model: nn.Module, h: int, w: int, n: int = 1, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g, dtype=dtype) * model.input_range


# --------------------------------------------------------------------------- registry and attributes
def test_names() -> None:
    assert models.names() == ["rfdn", "rfdn_pruned", "rlfn", "fmen", "imdn"]


@pytest.mark.parametrize("name", NAMES)
def test_default_param_counts_and_attributes(name: str) -> None:
    torch.manual_seed(0)
    m = models.build(name)
    assert n_params(m) == PARAMS[name]
    assert m.arch == name and m.scale == 4 and m.input_range == INPUT_RANGE[name]
    assert m.config["conv"] == "conv"
    rebuilt = models.build(m.arch, **m.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_default_keys_match_checkpoint_listings(checkpoints: Path) -> None:
    """The default architectures have exactly the tensors listed in ``<checkpoint>.keys.txt``."""
    for name, file in CHECKPOINTS.items():
        listing = (checkpoints / file.replace(".pth", ".keys.txt")).read_text().splitlines()
        expected = {}
        for line in listing:
            key, shape, _ = line.split("\t")
            expected[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        own = {k: tuple(v.shape) for k, v in models.build(name).state_dict().items()}
        assert own == expected, name


def test_smaller_students_have_fewer_params() -> None:
    assert n_params(models.build("rfdn", nf=24)) < PARAMS["rfdn"] / 3
    m = models.build("fmen", num_blocks=2)
    assert m.config["up_blocks"] == [2, 1, 1] and len(m.basic_blocks) == 2
    assert models.build("imdn", nf=32, num_blocks=4).model[1].sub[3].conv4.out_channels == 8
    assert models.build("rlfn", mid_channels=32).B1.c2_r.weight.shape == (32, 32, 3, 3)
    assert not hasattr(models.build("rfdn", num_blocks=2), "B3")


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=5)
@given(h=st.integers(1, 33), w=st.integers(1, 33), n=st.integers(1, 2))
def test_any_input_size(name: str, h: int, w: int, n: int) -> None:
    torch.manual_seed(0)
    m = models.build(name, **SMALL[name]).eval()
    with torch.no_grad():
        y = m(rand_input(m, h, w, n))
    assert y.shape == (n, 3, 4 * h, 4 * w)
    assert torch.isfinite(y).all()


def test_scale_config() -> None:
    m = models.build("rlfn", scale=2, **SMALL["rlfn"]).eval()
    assert m.scale == 2
    with torch.no_grad():
        assert m(rand_input(m, 9, 7)).shape == (1, 3, 18, 14)


# --------------------------------------------------------------------------- ESA follows the README formulas
def _esa_reference(esa: nn.Module, x: torch.Tensor, rfdn_form: bool) -> torch.Tensor:
    c1_ = esa.conv1(x)
    v = F.max_pool2d(esa.conv2(c1_), kernel_size=7, stride=3)
    if rfdn_form:
        c3 = esa.conv3_(F.relu(esa.conv3(F.relu(esa.conv_max(v)))))
    else:
        c3 = esa.conv3(v)
    c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
    return x * torch.sigmoid(esa.conv4(c3 + esa.conv_f(c1_)))


@pytest.mark.parametrize("cls,rfdn_form", [(models.ESA, True), (models.ESALite, False)])
def test_esa_matches_reference_formula(cls, rfdn_form: bool) -> None:
    torch.manual_seed(0)
    esa = cls(6, 4).double()
    x = torch.randn(2, 6, 23, 31, dtype=torch.double)
    torch.testing.assert_close(esa(x), _esa_reference(esa, x, rfdn_form))
    assert hasattr(esa, "conv_max") == rfdn_form and hasattr(esa, "conv3_") == rfdn_form


def test_esa_tiny_inputs_pool_globally() -> None:
    """Below 15 px the pool input is -inf padded: the attention sees the global max of conv2's output."""
    torch.manual_seed(0)
    esa = models.ESALite(4, 3).double()
    x = torch.randn(1, 4, 9, 5, dtype=torch.double)
    c1 = esa.conv2(esa.conv1(x))
    v = c1.amax(dim=(2, 3), keepdim=True)
    c3 = esa.conv3(v).expand(-1, -1, 9, 5)
    expected = x * torch.sigmoid(esa.conv4(c3 + esa.conv_f(esa.conv1(x))))
    torch.testing.assert_close(esa(x), expected)


# --------------------------------------------------------------------------- conv= blocks and fusion
@pytest.mark.parametrize("name,conv", [(n, c) for n in NAMES for c in ("ecb", "rrrb")]
                         + [("rlfn", {"block": "ecb", "depth_multiplier": 1.0, "use_identity": False})])
def test_fused_block_form_loads_into_plain_form(name: str, conv) -> None:
    torch.manual_seed(0)
    cfg = SMALL[name]
    train = perturb(models.build(name, conv=conv, **cfg)).double().eval()
    assert any(True for _ in reparam.rep_blocks(train))
    fused = reparam.fuse_all(train)
    plain = models.build(name, **cfg).double().eval()
    plain.load_state_dict(fused.state_dict(), strict=True)
    x = rand_input(train, 17, 20, dtype=torch.double)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), train(x), rtol=1e-9, atol=1e-9 * train.input_range)
    assert train.config["conv"] == models.normalize_conv(conv)


@pytest.mark.parametrize("block", sorted(b for b in reparam.BLOCKS if b != "erb"))
def test_every_registered_block_fuses_into_rlfn(block: str) -> None:
    torch.manual_seed(0)
    train = perturb(models.build("rlfn", conv=block, **SMALL["rlfn"])).double().eval()
    plain = models.build("rlfn", **SMALL["rlfn"]).double().eval()
    plain.load_state_dict(reparam.fuse_all(train).state_dict(), strict=True)
    x = rand_input(train, 15, 18, dtype=torch.double)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), train(x), rtol=1e-9, atol=1e-7)


def test_conv_slots_and_rrrb_fallback() -> None:
    m = models.build("rfdn", conv="rrrb")
    assert isinstance(m.B1.c1_r, reparam.RRRB) and isinstance(m.LR_conv, reparam.RRRB)
    assert isinstance(m.B1.esa.conv_max, reparam.RRRB)
    for plain in (m.fea_conv, m.B1.c4, m.upsampler[0], m.B1.esa.conv2, m.B1.c1_d):  # in != out, stride 2, 1x1
        assert type(plain) is nn.Conv2d
    e = models.build("rfdn", conv="ecb")
    assert isinstance(e.fea_conv, reparam.ECB) and isinstance(e.B1.c4, reparam.ECB)
    assert type(e.B1.esa.conv2) is nn.Conv2d and type(e.B1.c5) is nn.Conv2d


def test_fmen_rrrb_training_form() -> None:
    m = models.build("fmen", conv="rrrb")
    block = m.basic_blocks[0]
    assert isinstance(block.conv1.rep_conv, reparam.RRRB) and isinstance(block.conv2.rep_conv, reparam.RRRB)
    # LeakyReLU(0.1) is functional, as the official global one (not a submodule, so the challenge FLOPs
    # counter does not count it); the slope is kept on the block.
    assert block.negative_slope == 0.1 and not any(isinstance(x, nn.LeakyReLU) for x in m.modules())
    assert "basic_blocks.0.conv1.rep_conv.expand.conv.weight" in m.state_dict()
    assert type(m.head) is nn.Conv2d and type(m.hfabs[0].squeeze) is nn.Conv2d  # 3->50, 50->16: plain
    # The paper's exact recipe: only the BasicBlock convs.
    paper = models.build("fmen", conv={"block": "rrrb", "include": "*.rep_conv"})
    blocks = [n for n, _ in reparam.rep_blocks(paper)]
    assert len(blocks) == 20 and all(n.endswith(".rep_conv") for n in blocks)
    assert type(paper.warmup[0]) is nn.Conv2d and type(paper.lr_conv) is nn.Conv2d
    fused_keys = set(reparam.fuse_all(paper).state_dict())
    assert fused_keys == set(models.build("fmen").state_dict())


def test_conv_spec_errors() -> None:
    with pytest.raises(ValueError, match="conv"):
        models.build("rlfn", conv="nope")
    with pytest.raises(ValueError, match="conv"):
        models.build("fmen", conv="erb")  # replaces conv-act-conv, not one conv
    with pytest.raises(ValueError, match="block"):
        models.build("rlfn", conv={"depth_multiplier": 2})
    with pytest.raises(ValueError, match="depth_multiplier"):
        models.build("rlfn", conv={"block": "ecb", "depth_multiplier": -1}, **SMALL["rlfn"])
    with pytest.raises(TypeError, match="conv"):
        models.build("rlfn", conv={"block": "ecb", "bogus": 1}, **SMALL["rlfn"])
    with pytest.raises(ValueError, match="include"):
        models.build("rlfn", conv={"block": "ecb", "include": "nothing.*"}, **SMALL["rlfn"])
    with pytest.raises(TypeError, match="conv"):
        models.build("rlfn", conv=3)
    assert models.build("rlfn", conv=None, **SMALL["rlfn"]).config["conv"] == "conv"
    assert models.build("rlfn", conv="ECB", **SMALL["rlfn"]).config["conv"] == "ecb"


# --------------------------------------------------------------------------- config validation
def test_config_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="rfdn.*rlfn.*imdn"):
        models.build("edsr")
    with pytest.raises(ValueError, match="nf"):
        models.build("rfdn", nf=0)
    with pytest.raises(TypeError, match="nf"):
        models.build("rfdn", nf=24.0)
    with pytest.raises(TypeError, match="num_blocks"):
        models.build("rlfn", num_blocks=True)
    with pytest.raises(ValueError, match="distill_ratio"):
        models.build("imdn", distill_ratio=1.5)
    with pytest.raises(TypeError, match="inner_residual"):
        models.build("rfdn", inner_residual=1)
    with pytest.raises(ValueError, match="up_blocks"):
        models.build("fmen", up_blocks=[1, 1])
    with pytest.raises(TypeError, match="mid_channel"):
        models.build("fmen", mid_channel=8)  # typo: unknown argument, the accepted ones are listed
    with pytest.raises(TypeError, match="name"):
        models.build(3)


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip_with_blocks(name: str) -> None:
    conv = {"block": "ecb", "depth_multiplier": 1.0, "include": ["*"]}
    m = models.build(name, conv=conv, **SMALL[name])
    again = models.build(m.arch, **copy.deepcopy(m.config))
    assert again.config == m.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


# --------------------------------------------------------------------------- checkpoint files
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_round_trip(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    m = perturb(models.build("fmen", conv="rrrb", **SMALL["fmen"])).eval()
    path = tmp_path / f"student{suffix}"
    if suffix == ".pth":
        torch.save(m.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    loaded = models.load("fmen", path, **m.config)
    assert not loaded.training
    x = rand_input(m, 11, 13)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), m(x), rtol=0, atol=0)


def test_read_state_dict_unwraps_and_strips(tmp_path: Path) -> None:
    m = models.build("imdn", **SMALL["imdn"])
    sd = {f"module.{k}": v for k, v in m.state_dict().items()}
    torch.save({"params": sd, "iter": 3}, tmp_path / "wrapped.pth")
    assert set(models.read_state_dict(tmp_path / "wrapped.pth")) == set(m.state_dict())
    models.load("imdn", tmp_path / "wrapped.pth", **SMALL["imdn"])


def test_unsafe_or_missing_files_are_refused(tmp_path: Path) -> None:
    torch.save({"net": nn.Conv2d(1, 1, 1)}, tmp_path / "pickled_module.pth")  # not loadable weights-only
    with pytest.raises(ValueError, match="weights-only"):
        models.read_state_dict(tmp_path / "pickled_module.pth")
    with pytest.raises(FileNotFoundError):
        models.load("rfdn", tmp_path / "absent.pth")


def test_wrong_checkpoint_names_keys(tmp_path: Path) -> None:
    torch.save(models.build("rlfn", **SMALL["rlfn"]).state_dict(), tmp_path / "rlfn_small.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        models.load("rfdn", tmp_path / "rlfn_small.pth", **SMALL["rfdn"])
    msg = str(err.value)
    assert "missing" in msg and "B1.c1_d.weight" in msg
    assert "B1.c1_d.weight" in err.value.missing and not err.value.unexpected
    assert ("B1.c1_r.weight", (6, 8, 3, 3), (8, 8, 3, 3)) in err.value.shape_mismatches
    assert "B1.c1_r.weight checkpoint (6, 8, 3, 3) vs model (8, 8, 3, 3)" in msg
    torch.save(models.build("rfdn", **SMALL["rfdn"]).state_dict(), tmp_path / "rfdn_small.pth")
    with pytest.raises(CheckpointMismatchError, match="nf=|'nf': 10") as err:
        models.load("rfdn", tmp_path / "rfdn_small.pth", **{**SMALL["rfdn"], "nf": 10})
    assert "fea_conv.weight checkpoint (8, 3, 3, 3) vs model (10, 3, 3, 3)" in str(err.value)
    assert "looks like" not in str(err.value)  # a student checkpoint: no official network to point at


def test_block_form_load_from_deploy_weights(tmp_path: Path) -> None:
    """``load(name, deploy_path, conv=block)`` gives blocks computing exactly the deploy convs."""
    torch.manual_seed(0)
    plain = perturb(models.build("rfdn", **SMALL["rfdn"])).eval()
    torch.save(plain.state_dict(), tmp_path / "deploy.pth")
    for conv in ("ecb", "rrrb"):
        m = models.load("rfdn", tmp_path / "deploy.pth", conv=conv, **SMALL["rfdn"])
        assert m.config["conv"] == conv and any(True for _ in reparam.rep_blocks(m))
        x = rand_input(m, 16, 18)
        with torch.no_grad():
            torch.testing.assert_close(m(x), plain(x), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- official checkpoints on Set5
def _set5(shared_data: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from skimage import io
    root = shared_data / "set5"
    pairs = []
    for hr_path in sorted((root / "HR").glob("*.png")):
        lr = io.imread(root / "LR_bicubic" / "X4" / f"{hr_path.stem}x4.png")
        pairs.append((hr_path.stem, lr[..., :3], io.imread(hr_path)[..., :3]))
    if len(pairs) != 5:
        pytest.skip("Set5 not complete in the shared data")
    return pairs


def _upscale(model: nn.Module, lr: np.ndarray, input_range: float | None = None) -> np.ndarray:
    r = model.input_range if input_range is None else input_range
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() * (r / 255.0)
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all()
    return (y[0].permute(1, 2, 0).numpy() * (255.0 / r)).round().clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", NAMES)
def test_official_checkpoint_set5_psnr(name: str, checkpoints: Path, shared_data: Path) -> None:
    from effsr.quality import psnr
    model = models.load(name, checkpoints / CHECKPOINTS[name])
    assert not model.training and model.config == models.build(name).config
    pairs = _set5(shared_data)
    y_psnr = []
    for _, lr, hr in pairs:
        sr = _upscale(model, lr)
        assert sr.shape == (4 * lr.shape[0], 4 * lr.shape[1], 3)
        y_psnr.append(psnr(sr, hr[: sr.shape[0], : sr.shape[1]], shave=4, y_channel=True))
    assert np.mean(y_psnr) >= SET5_Y_FLOOR[name], y_psnr
    assert min(y_psnr) > 28.0  # the hardest image (butterfly) is still well above bicubic (~22 dB)
    # The declared input_range is the right one: the other range is far worse on the same image.
    _, lr, hr = pairs[1]
    other = 1.0 if model.input_range == 255.0 else 255.0
    wrong = psnr(_upscale(model, lr, other), hr, shave=4, y_channel=True)
    assert wrong < y_psnr[1] - 3.0


@pytest.mark.parametrize("name,conv", [("rlfn", "ecb"), ("fmen", {"block": "rrrb", "include": "*.rep_conv"})])
def test_official_checkpoint_into_block_form(name: str, conv, checkpoints: Path) -> None:
    ref = models.load(name, checkpoints / CHECKPOINTS[name])
    m = models.load(name, checkpoints / CHECKPOINTS[name], conv=conv)
    x = rand_input(m, 20, 17)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=2e-3)
    back = models.build(name)
    back.load_state_dict(reparam.fuse_all(m).state_dict(), strict=True)


def test_official_checkpoint_for_other_network_is_named(checkpoints: Path) -> None:
    with pytest.raises(CheckpointMismatchError) as err:
        models.load("rfdn", checkpoints / CHECKPOINTS["rlfn"])
    msg = str(err.value)
    assert "B1.esa.conv_max.weight" in msg and "shape mismatch" in msg and "load('rlfn', path)" in msg
    with pytest.raises(CheckpointMismatchError, match="conv_max"):
        models.load("rlfn", checkpoints / CHECKPOINTS["rfdn_pruned"])
    with pytest.raises(CheckpointMismatchError, match="without config"):
        models.load("fmen", checkpoints / CHECKPOINTS["fmen"], nf=48)
