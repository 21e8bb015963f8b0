"""effsr.export: ONNX fp32 equals PyTorch, INT8 QDQ graphs run and cost a measured amount, `effsr export` CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

from effsr import data, export, models  # noqa: E402
from effsr.cli import main  # noqa: E402
from effsr.inference import evaluate  # noqa: E402
from effsr.shrink.recipe import new_recipe, save_student  # noqa: E402

# ONNX export and onnxruntime sessions: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow


def tiny_sr(seed: int = 0) -> torch.nn.Module:
    """A 1-block RFDN (nf=8) that upsamples like nearest neighbour plus a small learned-looking residual.

    Random weights alone give outputs unrelated to the image (PSNR ~6 dB), where a quantization error could
    hide; this network is a real (if poor) SR model whose INT8 cost shows in PSNR against HR.
    """
    g = torch.Generator().manual_seed(seed)
    net = models.build("rfdn", nf=8, num_blocks=1, esa_channels=4).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        w = net.fea_conv.weight
        w.zero_()
        net.fea_conv.bias.zero_()
        for c in range(3):
            w[c, c, 1, 1] = 1.0  # feature channels 0-2 carry the RGB input
        up = net.upsampler[0]
        up.weight.mul_(0.02)
        up.bias.zero_()
        s2 = net.scale**2
        for c in range(3):
            up.weight[c * s2:(c + 1) * s2, c, 1, 1] += 1.0  # PixelShuffle of a copy: nearest-neighbour x4
        net.LR_conv.weight.mul_(0.01)  # a small residual: fp32 ~ nearest neighbour, quantization only hurts
    return net


@pytest.fixture(scope="module")
def pairs():
    return data.default_images()[:2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = tiny_sr()
    path = export.to_onnx(net, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return net, path


@pytest.fixture(scope="module")
def calib(pairs):
    return export.calibration_patches(pairs, count=8, size=48, input_range=255.0, seed=0)


# ------------------------------------------------------------------------------------------------ fp32
def test_fp32_onnx_equals_pytorch_on_odd_sizes_and_batch_two(exported) -> None:
    net, path = exported
    graph = export.OnnxSR(path)
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 17, 23), (2, 3, 19, 16), (1, 3, 31, 45)]:
        x = torch.rand(shape, generator=g) * 255
        with torch.no_grad():
            ref = net(x).numpy()
        out = graph.run_numpy(x.numpy())
        assert out.shape == (shape[0], 3, shape[2] * 4, shape[3] * 4)
        assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5


def test_verify_on_real_images_reports_batch_and_metadata(exported, pairs) -> None:
    net, path = exported
    result = export.verify(net, path, pairs)
    assert result["passed"] and result["max_rel_error"] <= export.FP32_TOLERANCE
    assert len(result["per_image"]) == 2 and result["batch"]["shape"][0] == 2
    assert export.read_meta(path) == {"arch": "rfdn", "scale": "4", "input_range": "255.0"}
    # Convs keep their PyTorch names: the layer map is what keep-fp32 uses.
    layers = export.conv_layers(path)
    assert {"fea_conv", "B1.c1_r", "B1.esa.conv4", "upsampler.0"} <= set(layers)


def test_verify_fails_loudly_on_a_different_network(exported, pairs) -> None:
    net, path = exported
    other = tiny_sr(seed=1)
    with pytest.raises(export.ExportMismatchError, match="max relative error"):
        export.verify(other, path, pairs)


def test_rep_blocks_are_fused_before_export(tmp_path, pairs) -> None:
    import reparam

    net = models.build("rfdn", nf=8, num_blocks=1, esa_channels=4, conv="ecb").eval()
    reparam.set_mode(net, "branches")
    path = export.to_onnx(net, tmp_path / "ecb.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Conv" in ops
    assert export.verify(net, path, pairs)["passed"]  # fused graph == the ECB training form


def test_a_model_that_cannot_be_fused_is_a_clean_value_error(tmp_path) -> None:
    from reparam.base import RepBlock

    class Broken(RepBlock):
        def forward(self, x):
            return x

        def fuse(self):
            raise NotImplementedError("no closed form")

    net = tiny_sr()
    net.LR_conv = Broken.__new__(Broken)
    torch.nn.Module.__init__(net.LR_conv)
    with pytest.raises(ValueError, match="model: cannot be fused"):
        export.to_onnx(net, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ValueError, match="scale"):
        export.to_onnx(torch.nn.Conv2d(3, 3, 3), tmp_path / "y.onnx")


# ------------------------------------------------------------------------------------------------ int8
def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.clip(a, 0, 255) - np.clip(b, 0, 255)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_int8_graph_has_qdq_nodes_and_stays_close_to_fp32(exported, calib, pairs, tmp_path) -> None:
    net, path = exported
    info = export.quantize_int8(path, calib, tmp_path / "tiny.int8.onnx")
    qdq = info["qdq"]
    n_convs = len(export.conv_layers(path))
    assert qdq["convs_int8"] == n_convs and qdq["convs_fp32"] == 0
    assert qdq["QuantizeLinear"] >= n_convs and qdq["DequantizeLinear"] >= 2 * n_convs  # activations + weights
    int8 = export.OnnxSR(tmp_path / "tiny.int8.onnx")
    assert int8.scale == 4 and int8.input_range == 255.0
    x = torch.from_numpy(calib[:2])
    assert _psnr(int8.run_numpy(x.numpy()), net(x).detach().numpy()) > 35.0
    fp32 = evaluate(net, pairs, progress=False)["psnr_y"]
    q = evaluate(int8, pairs, progress=False)["psnr_y"]
    assert 20.0 < fp32 < 40.0  # the tiny network is a real (nearest-neighbour-like) upscaler
    assert abs(fp32 - q) < 0.3


def test_keep_fp32_leaves_the_named_convs_in_float(exported, calib, tmp_path) -> None:
    _, path = exported
    info = export.quantize_int8(path, calib, tmp_path / "k.onnx", keep_fp32=["fea_conv", "B1.esa.conv4"])
    layers = export.conv_layers(path)
    assert sorted(info["qdq"]["fp32_conv_nodes"]) == sorted([layers["fea_conv"], layers["B1.esa.conv4"]])
    with pytest.raises(ValueError, match="keep_fp32: no conv layer"):
        export.quantize_int8(path, calib, tmp_path / "bad.onnx", keep_fp32=["nope"])


def test_pinned_input_range_makes_pixel_inputs_lossless(exported, calib, tmp_path) -> None:
    """With pin_io the input's QuantizeLinear has scale 1 (0-255 net): integer pixels survive exactly."""
    from onnx import numpy_helper

    _, path = exported
    export.quantize_int8(path, calib, tmp_path / "p.onnx", pin_io=True)
    graph = onnx.load(str(tmp_path / "p.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    q_in = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == export.INPUT_NAME)
    assert float(inits[q_in.input[1]]) == pytest.approx(1.0, abs=1e-7)
    assert int(inits[q_in.input[2]]) == 0


def test_more_calibration_patches_cost_less_psnr(exported, pairs, calib, tmp_path) -> None:
    net, path = exported
    one = export.calibration_patches(pairs, count=1, size=16, input_range=255.0, seed=0)
    drop = {}
    fp32 = evaluate(net, pairs, progress=False)["psnr_y"]
    for name, patches in (("one", one), ("eight", calib)):
        export.quantize_int8(path, patches, tmp_path / f"{name}.onnx")
        drop[name] = fp32 - evaluate(export.OnnxSR(tmp_path / f"{name}.onnx"), pairs, progress=False)["psnr_y"]
    assert drop["one"] > 0.1  # one 16 x 16 patch: its range clips the features of whole images
    assert drop["eight"] < drop["one"] - 0.1


def test_sensitivity_ranks_every_conv(exported, calib) -> None:
    _, path = exported
    with export.Int8Quantizer(path, calib[:4]) as q:
        sens = q.sensitivity("minmax", candidates=["fea_conv", "B1.c1_r", "upsampler.0"])
    assert [r["layer"] for r in sens["layers"]] != []
    assert {r["layer"] for r in sens["layers"]} == {"fea_conv", "B1.c1_r", "upsampler.0"}
    gains = [r["gain_db"] for r in sens["layers"]]
    assert gains == sorted(gains, reverse=True)
    assert 20.0 < sens["psnr_all"] < math.inf
    assert export.pick_keep_fp32(sens, count=1, min_gain_db=-math.inf) == [sens["layers"][0]["layer"]]


def test_calibration_patches_bad_inputs(pairs) -> None:
    p = export.calibration_patches(pairs, count=5, size=32, input_range=1.0)
    assert p.shape == (5, 3, 32, 32) and p.dtype == np.float32 and 0.0 <= p.min() and p.max() <= 1.0
    with pytest.raises(ValueError, match="pairs: no calibration images"):
        export.calibration_patches([], count=4)
    with pytest.raises(ValueError, match="lower the patch size"):
        export.calibration_patches([np.zeros((20, 20, 3), np.uint8)], count=4, size=32)


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    net = tiny_sr()
    path = tmp_path_factory.mktemp("student") / "tiny.safetensors"
    save_student(net, new_recipe("rfdn", net.config), path)
    return path


# A deliberately poor calibration (one 16 x 16 patch): its range clips the features of whole images.
SLOPPY = ["--int8", "--calib-data", "default", "--calib-count", "1", "--calib-patch", "16",
          "--max-eval-images", "2", "--runtime-trials", "1", "--no-progress"]


@pytest.fixture(scope="module")
def cli_run(student, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "exp"
    code = main(["export", "--model", "rfdn", "--weights", str(student), "--out", str(out), *SLOPPY])
    return code, out


def test_cli_writes_report_with_every_variant(cli_run, capsys) -> None:
    code, out = cli_run
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "rfdn.int8.onnx", "rfdn.onnx"]
    rep = json.loads((out / "export.json").read_text())
    for key in ("torch_fp32", "onnx_fp32", "onnx_int8"):
        v = rep["variants"][key]
        assert v["size_bytes"] > 0 and v["runtime_ms"] > 0
        assert set(v["eval"]["default"]) >= {"psnr_y", "psnr_rgb", "ssim_y"}
    assert rep["verify"]["max_rel_error"] <= 1e-5
    fp32, int8 = rep["variants"]["onnx_fp32"], rep["variants"]["onnx_int8"]
    assert abs(fp32["drop"]["default"]["psnr_y"]) < 1e-3  # fp32 ONNX: same images as PyTorch
    assert int8["drop"]["default"]["psnr_y"] == pytest.approx(rep["int8_max_drop_psnr_y"])
    assert rep["int8"]["qdq"]["convs_int8"] > 0 and int8["speedup"] > 0


def test_cli_max_drop_below_the_measured_drop_fails_and_writes_nothing(cli_run, student, tmp_path, capsys) -> None:
    code, out = cli_run
    drop = json.loads((out / "export.json").read_text())["int8_max_drop_psnr_y"]
    assert drop > 0.0  # the sloppy calibration must cost something, else this test proves nothing
    target = tmp_path / "strict"
    code = main(["export", "--model", "rfdn", "--weights", str(student), "--out", str(target), *SLOPPY,
                 "--max-drop", f"{drop / 2:.6f}"])
    assert code == 1
    assert "--max-drop" in capsys.readouterr().err
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--int8"], "--int8 needs calibration data"),
    (["--int8", "--calib-data", "EMPTY"], "no images"),
    (["--int8", "--calib-data", "MISSING"], "data not found"),
    (["--eval-data", "EMPTY"], "no images"),
    (["--max-drop", "0.1"], "--max-drop needs --int8"),
    (["--int8", "--calib-data", "default", "--calib-patch", "4096"], "lower the patch size"),
    (["--int8", "--calib-data", "default", "--keep-fp32", "no.such.layer"], "--keep-fp32: no conv layer"),
])
def test_cli_bad_inputs_one_line_exit_2(student, tmp_path, capsys, extra, message) -> None:
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / "empty") if a == "EMPTY" else str(tmp_path / "missing") if a == "MISSING" else a
             for a in extra]
    out = tmp_path / "out"
    code = main(["export", "--model", "rfdn", "--weights", str(student), "--out", str(out), "--no-progress",
                 "--max-eval-images", "1", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_wrong_checkpoint_is_exit_2(tmp_path, capsys) -> None:
    bad = tmp_path / "imdn_like.pth"
    torch.save(models.build("imdn", nf=8, num_blocks=1).state_dict(), bad)
    code = main(["export", "--model", "rfdn", "--weights", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot load" in err


# -------------------------------------------------------------------------------------------- real data
@pytest.mark.data
def test_official_rfdn_int8_on_a_set5_crop(checkpoints, shared_data, tmp_path) -> None:
    net = models.load("rfdn", checkpoints / "rfdn_aim2020.pth")
    set5 = data.open_dataset(shared_data / "set5")
    crop = [data.SRPair(p.name, p.lr[:48, :48], p.hr[:192, :192]) for p in list(set5)[:3]]
    path = export.to_onnx(net, tmp_path / "rfdn.onnx")
    assert export.verify(net, path, crop)["max_rel_error"] <= 1e-5
    calib = export.calibration_patches(list(set5), count=8, size=48, input_range=255.0)
    export.quantize_int8(path, calib, tmp_path / "rfdn.int8.onnx")
    fp32 = evaluate(net, crop, progress=False)["psnr_y"]
    int8 = evaluate(export.OnnxSR(tmp_path / "rfdn.int8.onnx"), crop, progress=False)["psnr_y"]
    assert fp32 - int8 < 1.5  # measured ~0.6 dB on full Set5 with 7-bit weights (docs/export.md)


def test_int8_when_onnxruntime_shape_inference_gives_up(exported, calib, tmp_path, monkeypatch) -> None:
    """onnxruntime's symbolic shape inference fails on some graphs (SAFMN++ at a fixed size): quantization goes
    on without it; when its pre-processing fails altogether, one ValueError line names the graph."""
    import onnxruntime.quantization.shape_inference as si

    real = si.quant_pre_process

    def symbolic_fails(src, dst, skip_symbolic_shape=False, **kw):
        if not skip_symbolic_shape:  # as onnxruntime does: a temporary file left in the working directory
            Path("sym_shape_infer_temp.onnx").write_bytes(b"x")
            raise Exception("Incomplete symbolic shape inference")
        return real(src, dst, skip_symbolic_shape=True, **kw)

    _, path = exported
    monkeypatch.setattr(si, "quant_pre_process", symbolic_fails)
    user_dir = tmp_path / "user_dir"
    user_dir.mkdir()
    monkeypatch.chdir(user_dir)
    info = export.quantize_int8(path, calib, tmp_path / "ok.onnx")
    assert (tmp_path / "ok.onnx").is_file() and info
    assert list(user_dir.iterdir()) == []  # nothing left in the user's working directory

    def always_fails(*a, **kw):
        raise RuntimeError("broken graph\nsecond line")

    monkeypatch.setattr(si, "quant_pre_process", always_fails)
    with pytest.raises(ValueError, match=r"^onnx_path: onnxruntime cannot prepare .* RuntimeError: broken graph$"):
        export.quantize_int8(path, calib, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
