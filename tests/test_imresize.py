"""effsr.imresize: MATLAB-compatible bicubic resize (pixel-exact against MATLAB-made benchmark LR)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effsr.data import read_image
from effsr.imresize import contributions, cubic, imresize
from effsr.quality import psnr

SET14_NOT_MULTIPLE_OF_4 = {"comic", "flowers", "ppt3", "zebra"}


# --------------------------------------------------------------------------- kernel and weights
def test_cubic_kernel_values():
    x = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, -0.5, -1.5])
    # Keys a = -0.5: 1.5|x|^3 - 2.5|x|^2 + 1 on [0, 1]; -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2 on (1, 2]
    expected = [1.0, 0.8671875, 0.5625, 0.2265625, 0.0, -0.0703125, -0.0625, -0.0234375, 0.0, 0.0,
                0.5625, -0.0625]
    np.testing.assert_allclose(cubic(x), expected, rtol=0, atol=1e-15)


@given(st.floats(-1.0, 1.0))
@settings(max_examples=20)
def test_cubic_partition_of_unity(t):
    shifts = np.arange(-3, 4, dtype=np.float64)
    assert cubic(t - shifts).sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n_in, n_out, scale",
                         [(10, 3, 0.25), (7, 14, 2.0), (16, 4, 0.25), (5, 5, 1.0), (9, 3, 1 / 3)])
def test_contributions_normalized_and_in_range(n_in, n_out, scale):
    w, idx = contributions(n_in, n_out, scale)
    assert w.shape == idx.shape and w.shape[0] == n_out
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert idx.min() >= 0 and idx.max() < n_in


def test_upscale_hand_computed_edge_weights():
    """x2 along a row of 4: output 1 sits at u = 0.75, taps at -1..2 mirror to inputs 2, 1, 1, 2 (1-based)."""
    row = np.array([[10.0, 20.0, 30.0, 40.0]])
    out = imresize(row, output_shape=(1, 8))
    # 1.09375 a - 0.09375 b  and  0.796875 a + 0.2265625 b - 0.0234375 c
    assert out[0, 0] == pytest.approx(1.09375 * 10 - 0.09375 * 20, abs=1e-12)
    assert out[0, 1] == pytest.approx(0.796875 * 10 + 0.2265625 * 20 - 0.0234375 * 30, abs=1e-12)
    # mirror image at the other end
    assert out[0, 7] == pytest.approx(1.09375 * 40 - 0.09375 * 30, abs=1e-12)


def test_downscale_hand_computed_antialiased_weights():
    """/2 along a column of 4: the kernel stretches to width 8; u = 1.5 and taps -2..5 mirror into 1..4."""
    col = np.array([[10.0], [20.0], [30.0], [40.0]])
    out = imresize(col, 0.5)
    assert out.shape == (2, 1)
    w = np.array([0.546875, 0.3984375, 0.1015625, -0.046875])
    assert out[0, 0] == pytest.approx(w @ [10, 20, 30, 40], abs=1e-12)
    assert out[1, 0] == pytest.approx(w @ [40, 30, 20, 10], abs=1e-12)


# --------------------------------------------------------------------------- API behaviour
@pytest.mark.parametrize("shape, scale, expected", [((10, 7), 0.25, (3, 2)), ((9, 9, 3), 1 / 3, (3, 3, 3)),
                                                    ((5, 6), 4, (20, 24)), ((8, 8), 0.5, (4, 4))])
def test_output_size_is_ceil(shape, scale, expected):
    assert imresize(np.zeros(shape, np.uint8), scale).shape == expected


def test_output_shape_argument_and_dtypes():
    img = np.random.default_rng(0).random((12, 10, 3)).astype(np.float32)
    out = imresize(img, output_shape=(6, 20))
    assert out.shape == (6, 20, 3) and out.dtype == np.float32
    out64 = imresize(img.astype(np.float64), output_shape=(6, 20))
    assert out64.dtype == np.float64
    np.testing.assert_allclose(out, out64, rtol=0, atol=1e-6)
    u8 = imresize((img * 255).astype(np.uint8), 0.5)
    assert u8.dtype == np.uint8 and u8.shape == (6, 5, 3)


@given(st.integers(0, 255), st.sampled_from([0.25, 0.5, 1 / 3, 2.0, 3.0, 4.0]),
       st.integers(3, 13), st.integers(3, 13))
@settings(max_examples=20)
def test_constant_image_stays_constant(value, scale, h, w):
    img = np.full((h, w, 3), value, np.uint8)
    out = imresize(img, scale)
    assert out.shape == (math.ceil(h * scale), math.ceil(w * scale), 3)
    assert np.all(out == value)
    outf = imresize(img.astype(np.float64), scale)
    np.testing.assert_allclose(outf, value, rtol=0, atol=1e-9)


def test_float_output_not_clipped_uint8_saturated():
    step = np.zeros((4, 8), np.float64)
    step[:, 4:] = 1.0
    up = imresize(step, 4)
    assert up.max() > 1.0 and up.min() < 0.0  # bicubic overshoot at the edge
    up8 = imresize((step * 255).astype(np.uint8), 4)
    assert up8.max() == 255 and up8.min() == 0


def test_channels_independent():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)
    out = imresize(img, 0.25)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], imresize(np.ascontiguousarray(img[:, :, c]), 0.25))


def test_pass_order_smallest_scale_first_with_uint8_rounding_between():
    """MATLAB sorts the scales: here columns (x 1/4) go before rows (x 2), each pass returning uint8."""
    img = np.random.default_rng(2).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    both = imresize(img, output_shape=(48, 8))
    cols_then_rows = imresize(imresize(img, output_shape=(24, 8)), output_shape=(48, 8))
    rows_then_cols = imresize(imresize(img, output_shape=(48, 32)), output_shape=(48, 8))
    np.testing.assert_array_equal(both, cols_then_rows)
    assert np.count_nonzero(both != rows_then_cols) > 0
    # float images are not rounded between passes, so the order only changes rounding error
    f = img.astype(np.float64)
    np.testing.assert_allclose(imresize(f, output_shape=(48, 8)),
                               imresize(imresize(f, output_shape=(48, 32)), output_shape=(48, 8)), atol=1e-9)


def test_invalid_arguments():
    img = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="scale or output_shape"):
        imresize(img)
    with pytest.raises(ValueError, match="scale"):
        imresize(img, -0.5)
    with pytest.raises(ValueError, match="scale"):
        imresize(img, float("nan"))
    with pytest.raises(ValueError, match="output_shape"):
        imresize(img, output_shape=(0, 4))
    with pytest.raises(ValueError, match="dtype"):
        imresize(img.astype(np.int32), 0.5)
    with pytest.raises(ValueError, match="img"):
        imresize(np.zeros((0, 4), np.uint8), 2)
    with pytest.raises(TypeError, match="img"):
        imresize([[1, 2], [3, 4]], 2)


# --------------------------------------------------------------------------- real data (MATLAB-made LR)
def _benchmark(shared_data: Path, name: str):
    root = shared_data / name
    if not (root / "HR").is_dir():
        pytest.skip(f"{name} not in shared data")
    for hr_path in sorted((root / "HR").glob("*.png")):
        lr = read_image(root / "LR_bicubic" / "X4" / f"{hr_path.stem}x4.png", keep_gray=True)
        hr = read_image(hr_path, keep_gray=True)
        yield hr_path.stem, hr, lr


@pytest.mark.data
@pytest.mark.parametrize("dataset, count", [("set5", 5), ("set14", 14)])
def test_matches_matlab_lr_pixel_for_pixel(shared_data, dataset, count):
    seen, mismatches, cropped = 0, {}, set()
    for name, hr, lr in _benchmark(shared_data, dataset):
        if hr.shape[0] != 4 * lr.shape[0] or hr.shape[1] != 4 * lr.shape[1]:
            cropped.add(name)
            hr = hr[:4 * lr.shape[0], :4 * lr.shape[1]]
        out = imresize(hr, 0.25)
        assert out.shape == lr.shape and out.dtype == np.uint8
        mismatches[name] = int(np.count_nonzero(out != lr))
        seen += 1
    assert seen == count
    assert mismatches == {k: 0 for k in mismatches}
    if dataset == "set14":
        assert cropped == SET14_NOT_MULTIPLE_OF_4


@pytest.mark.data
@pytest.mark.parametrize("dataset, published", [("set5", 28.42), ("set14", 26.00)])
def test_bicubic_upsampling_reproduces_published_y_psnr(shared_data, dataset, published):
    """Bicubic x4 of the benchmark LR, Y-PSNR with shave 4 (gray images measured on their gray values).

    On integer Y (the default, as MATLAB and the NTIRE code) we get 28.416 (Set5) and 25.990 (Set14); on
    unrounded Y 28.429 and 25.994: all within 0.01 dB of the published two-decimal numbers."""
    values = []
    for _, hr, lr in _benchmark(shared_data, dataset):
        hr = hr[:4 * lr.shape[0], :4 * lr.shape[1]]
        values.append(psnr(imresize(lr, 4), hr, shave=4, y_channel=True))
    assert float(np.mean(values)) == pytest.approx(published, abs=0.01)
