"""effsr.quality: PSNR / SSIM / BT.601 luma with the SR-paper conventions."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from effsr.quality import gaussian_window, psnr, rgb_to_y, ssim


def _noisy_pair(seed: int, shape=(40, 36, 3), noise=20):
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, shape, dtype=np.uint8)
    sr = np.clip(hr.astype(np.int64) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return sr, hr


def _sk_ssim(a: np.ndarray, b: np.ndarray, channel_axis=None) -> float:
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=255, channel_axis=channel_axis)


# --------------------------------------------------------------------------- rgb_to_y
def _exact_y_numerator(img: np.ndarray) -> np.ndarray:
    """255000 * (Y - 16) as exact integers: Y = 16 + (65481 R + 128553 G + 24966 B) / 255000."""
    c = img.astype(np.int64)
    return 65481 * c[..., 0] + 128553 * c[..., 1] + 24966 * c[..., 2]


def _exact_rounded_y(img: np.ndarray) -> np.ndarray:
    """Integer luma by exact integer arithmetic, halves rounded up (no colour used below is a tie)."""
    return 16 + (2 * _exact_y_numerator(img) + 255000) // 510000


@pytest.mark.parametrize(
    "rgb, y",
    [((0, 0, 0), 16.0), ((255, 255, 255), 235.0), ((255, 0, 0), 16 + 65.481), ((0, 255, 0), 16 + 128.553),
     ((0, 0, 255), 16 + 24.966), ((128, 64, 32), 16 + (65.481 * 128 + 128.553 * 64 + 24.966 * 32) / 255)],
)
def test_rgb_to_y_known_values(rgb, y):
    img = np.array(rgb, dtype=np.uint8).reshape(1, 1, 3)
    out = rgb_to_y(img, y_round=False)
    assert out.shape == (1, 1) and out.dtype == np.float64
    assert out[0, 0] == pytest.approx(y, abs=1e-12)
    rounded = rgb_to_y(img)  # the default: MATLAB / NTIRE integer luma
    assert rounded.dtype == np.float64 and rounded[0, 0] == math.floor(y + 0.5)


def test_rgb_to_y_rounds_every_colour_like_exact_arithmetic():
    """All 2^24 colours: rounded Y equals exact integer rounding, except the 194 colours whose luma is
    exactly k + 1/2, where it is one of the two neighbours (it follows the official float64 evaluation)."""
    ties = 0
    g, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    for r in range(256):
        img = np.stack([np.full_like(g, r), g, b], axis=-1).astype(np.uint8)
        got = rgb_to_y(img)
        num = _exact_y_numerator(img)
        tie = num % 255000 == 127500
        ties += int(tie.sum())
        np.testing.assert_array_equal(got[~tie], _exact_rounded_y(img)[~tie])
        low = 16 + num[tie] // 255000
        assert np.all((got[tie] == low) | (got[tie] == low + 1))
        np.testing.assert_allclose(rgb_to_y(img, y_round=False), 16 + num / 255000, rtol=0, atol=1e-12)
    assert ties == 194


def test_rgb_to_y_range_and_errors():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    for y in (rgb_to_y(img), rgb_to_y(img, y_round=False)):
        assert y.min() >= 16.0 and y.max() <= 235.0
    with pytest.raises(ValueError, match="img"):
        rgb_to_y(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="img"):
        rgb_to_y(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="y_round"):
        rgb_to_y(img, y_round=1)


# --------------------------------------------------------------------------- PSNR
def test_psnr_constant_error_hand_computed():
    hr = np.full((20, 20, 3), 100, np.uint8)
    sr = hr + 5  # every value off by 5 -> MSE 25
    assert psnr(sr, hr, shave=0) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-12)
    # A uniform RGB error d changes Y by d * (65.481 + 128.553 + 24.966) / 255 = d * 219 / 255.
    dy = 5 * 219 / 255
    assert psnr(sr, hr, shave=0, y_channel=True, y_round=False) == pytest.approx(
        10 * math.log10(255**2 / dy**2), abs=1e-9)
    # Rounded: Y(100, 100, 100) = 101.88 -> 102, Y(105, 105, 105) = 106.18 -> 106: an error of 4.
    assert psnr(sr, hr, shave=0, y_channel=True) == pytest.approx(10 * math.log10(255**2 / 16), abs=1e-12)


def test_y_psnr_and_ssim_rounded_by_default_on_a_hand_made_image():
    """Two pixels where rounding Y changes the error:

    ========================  =====================  =======  ===========
    pixel                     exact Y (x 255000)     Y        rounded Y
    ========================  =====================  =======  ===========
    hr (10, 20, 30)           4080000 + 3974850      31.5876  32
    sr (10, 20, 31)           4080000 + 3999816      31.6855  32
    hr (100, 100, 100)        4080000 + 21900000     101.882  102
    sr (101, 101, 101)        4080000 + 22119000     102.745  103
    ========================  =====================  =======  ===========

    rounded errors (0, 1): MSE 1/2; unrounded errors (24966, 219000) / 255000.
    """
    hr = np.array([[[10, 20, 30], [100, 100, 100]]], np.uint8)
    sr = np.array([[[10, 20, 31], [101, 101, 101]]], np.uint8)
    rounded = 10 * math.log10(255**2 / 0.5)
    unrounded = 10 * math.log10(255**2 / (((24966 / 255000) ** 2 + (219000 / 255000) ** 2) / 2))
    assert psnr(sr, hr, shave=0, y_channel=True) == pytest.approx(rounded, abs=1e-12)   # 51.1411 dB
    assert psnr(sr, hr, shave=0, y_channel=True, y_round=True) == pytest.approx(rounded, abs=1e-12)
    assert psnr(sr, hr, shave=0, y_channel=True, y_round=False) == pytest.approx(unrounded, abs=1e-9)
    assert unrounded - rounded > 1.0  # 52.48 vs 51.14 dB: the two conventions really differ here
    # RGB PSNR has nothing to round and ignores y_round
    assert psnr(sr, hr, shave=0, y_round=False) == psnr(sr, hr, shave=0)

    # SSIM on a 16 x 16 tiling of the same pixels: rounded Y is the SSIM of the integer luma planes.
    big_hr, big_sr = np.tile(hr, (16, 8, 1)), np.tile(sr, (16, 8, 1))
    y_hr, y_sr = _exact_rounded_y(big_hr).astype(np.uint8), _exact_rounded_y(big_sr).astype(np.uint8)
    assert ssim(big_sr, big_hr, shave=0) == pytest.approx(ssim(y_sr, y_hr, shave=0), abs=1e-12)
    exact_hr = 16 + _exact_y_numerator(big_hr) / 255000
    exact_sr = 16 + _exact_y_numerator(big_sr) / 255000
    assert ssim(big_sr, big_hr, shave=0, y_round=False) == pytest.approx(
        _sk_ssim(exact_sr, exact_hr), abs=1e-9)
    assert abs(ssim(big_sr, big_hr, shave=0) - ssim(big_sr, big_hr, shave=0, y_round=False)) > 1e-5


def test_y_round_must_be_bool():
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(TypeError, match="y_round"):
        psnr(a, a, y_channel=True, y_round="no")
    with pytest.raises(TypeError, match="y_round"):
        ssim(a, a, y_round=None)


@pytest.mark.data
def test_official_rfdn_set5_y_psnr_rounded_and_unrounded(checkpoints, shared_data):
    """The official RFDN on Set5: 32.138 dB with the challenge's integer Y, 32.159 dB on unrounded Y, from the
    same SR images (the NTIRE utils_image rgb2ycbcr + calculate_psnr give 32.138 on these images)."""
    import torch

    from effsr import data, inference, models

    torch.set_num_threads(1)
    model = models.load("rfdn", checkpoints / "rfdn_aim2020.pth")
    pairs = data.SRFolder(shared_data / "set5", scale=4)
    srs = [(inference.upscale(model, p.lr, device="cpu"), p.hr) for p in pairs]
    srs = [(sr, hr[:sr.shape[0], :sr.shape[1]]) for sr, hr in srs]
    rounded = np.mean([psnr(sr, hr, shave=4, y_channel=True) for sr, hr in srs])
    unrounded = np.mean([psnr(sr, hr, shave=4, y_channel=True, y_round=False) for sr, hr in srs])
    assert round(float(rounded), 3) == 32.138
    assert round(float(unrounded), 3) == 32.159


def test_psnr_one_wrong_value():
    hr = np.zeros((10, 10, 3), np.uint8)
    sr = hr.copy()
    sr[5, 5, 1] = 30  # squared error 900 over 300 values -> MSE 3
    assert psnr(sr, hr, shave=0) == pytest.approx(10 * math.log10(255**2 / 3), abs=1e-12)
    # shave=2 keeps the 6x6 centre (108 values) which still contains the error
    assert psnr(sr, hr, shave=2) == pytest.approx(10 * math.log10(255**2 / (900 / 108)), abs=1e-12)


def test_psnr_identical_is_inf_and_shave_removes_border_errors():
    hr = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert psnr(hr, hr.copy()) == math.inf
    sr = hr.copy()
    sr[:4] = 0
    sr[:, -4:] = 255
    assert psnr(sr, hr, shave=4) == math.inf
    assert math.isfinite(psnr(sr, hr, shave=0))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shave", [0, 4])
def test_psnr_matches_skimage(seed, shave):
    sr, hr = _noisy_pair(seed)
    s = slice(shave, -shave if shave else None)
    ref = peak_signal_noise_ratio(hr[s, s], sr[s, s], data_range=255)
    assert psnr(sr, hr, shave=shave) == pytest.approx(ref, abs=1e-10)
    ref_y = peak_signal_noise_ratio(_exact_rounded_y(hr)[s, s], _exact_rounded_y(sr)[s, s], data_range=255)
    assert psnr(sr, hr, shave=shave, y_channel=True) == pytest.approx(ref_y, abs=1e-10)
    ref_yf = peak_signal_noise_ratio(rgb_to_y(hr, y_round=False)[s, s], rgb_to_y(sr, y_round=False)[s, s],
                                     data_range=255)
    assert psnr(sr, hr, shave=shave, y_channel=True, y_round=False) == pytest.approx(ref_yf, abs=1e-10)


def test_psnr_grayscale_uses_gray_values():
    sr, hr = _noisy_pair(3, shape=(30, 30))
    ref = peak_signal_noise_ratio(hr[4:-4, 4:-4], sr[4:-4, 4:-4], data_range=255)
    assert psnr(sr, hr) == pytest.approx(ref, abs=1e-10)
    assert psnr(sr, hr, y_channel=True) == pytest.approx(ref, abs=1e-10)


@given(st.integers(0, 2**32 - 1), st.integers(1, 40))
@settings(max_examples=15)
def test_psnr_decreases_with_more_noise(seed, noise):
    sr1, hr = _noisy_pair(seed, shape=(24, 24, 3), noise=noise)
    rng = np.random.default_rng(seed + 1)
    extra = rng.integers(1, 20, hr.shape)
    # push every sr value further away from hr (away from the nearer bound)
    direction = np.where(sr1.astype(np.int64) >= hr, 1, -1)
    sr2 = np.clip(sr1.astype(np.int64) + direction * extra, 0, 255).astype(np.uint8)
    assert psnr(sr2, hr, shave=0) <= psnr(sr1, hr, shave=0)


def test_psnr_and_ssim_argument_errors():
    a = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, np.zeros((32, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="sr"):
        psnr(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="hr"):
        ssim(a, a.astype(np.uint16))
    with pytest.raises(ValueError, match="hr"):
        psnr(a, np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="shave"):
        psnr(a, a, shave=-1)
    with pytest.raises(ValueError, match="shave"):
        psnr(a, a, shave=16)
    with pytest.raises(ValueError, match="shave"):
        ssim(a, a, shave=11)  # 10 x 10 left: smaller than the 11 x 11 window
    with pytest.raises(TypeError, match="sr"):
        psnr(a.tolist(), a)


# --------------------------------------------------------------------------- SSIM
def test_gaussian_window():
    g = gaussian_window(11, 1.5)
    assert g.shape == (11,) and g.sum() == pytest.approx(1.0, abs=1e-15)
    assert g[5] / g[6] == pytest.approx(math.exp(1 / (2 * 1.5**2)), rel=1e-12)
    np.testing.assert_allclose(g, g[::-1], rtol=0, atol=0)


def test_ssim_matches_direct_window_sum():
    """Brute force: SSIM at every fully-inside window position from explicit weighted sums."""
    sr, hr = _noisy_pair(4, shape=(16, 14), noise=40)
    x, y = sr.astype(np.float64), hr.astype(np.float64)
    g = gaussian_window()
    w = np.outer(g, g)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * px * px).sum() - mx * mx, (w * py * py).sum() - my * my
            cxy = (w * px * py).sum() - mx * my
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    assert ssim(sr, hr, shave=0) == pytest.approx(np.mean(vals), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 5])
def test_ssim_matches_skimage(seed):
    """skimage filters the whole image and then crops the 5-pixel window radius before averaging:
    the same 'valid' region as ours, so the two agree to rounding error."""
    sr, hr = _noisy_pair(seed, shape=(48, 40, 3), noise=30)
    ref_rgb = _sk_ssim(sr[4:-4, 4:-4], hr[4:-4, 4:-4], channel_axis=-1)
    assert ssim(sr, hr, shave=4, y_channel=False) == pytest.approx(ref_rgb, abs=1e-9)
    ref_y = _sk_ssim(_exact_rounded_y(sr)[4:-4, 4:-4].astype(np.float64),
                     _exact_rounded_y(hr)[4:-4, 4:-4].astype(np.float64))
    assert ssim(sr, hr, shave=4, y_channel=True) == pytest.approx(ref_y, abs=1e-9)
    ref_yf = _sk_ssim(rgb_to_y(sr, y_round=False)[4:-4, 4:-4], rgb_to_y(hr, y_round=False)[4:-4, 4:-4])
    assert ssim(sr, hr, shave=4, y_channel=True, y_round=False) == pytest.approx(ref_yf, abs=1e-9)
    gray_sr, gray_hr = sr[:, :, 0], hr[:, :, 0]
    assert ssim(gray_sr, gray_hr, shave=0) == pytest.approx(_sk_ssim(gray_sr, gray_hr), abs=1e-9)


def test_ssim_properties():
    sr, hr = _noisy_pair(7, shape=(32, 32, 3), noise=25)
    assert ssim(hr, hr.copy()) == pytest.approx(1.0, abs=1e-12)
    assert ssim(sr, hr) == pytest.approx(ssim(hr, sr), abs=1e-12)
    assert 0.0 < ssim(sr, hr) < 1.0
    sr_worse, _ = _noisy_pair(7, shape=(32, 32, 3), noise=80)
    assert ssim(sr_worse, hr) < ssim(sr, hr)
    # RGB SSIM is the mean of the per-channel values
    per_channel = [ssim(np.ascontiguousarray(sr[:, :, c]), np.ascontiguousarray(hr[:, :, c]))
                   for c in range(3)]
    assert ssim(sr, hr, y_channel=False) == pytest.approx(np.mean(per_channel), abs=1e-12)
