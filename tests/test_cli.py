"""Tests for the ``effsr`` command line (effsr.cli), mostly in-process through ``main(argv)``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from effsr import cli


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    """The CLI's error message: exactly one line, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def rfdn_weights(tmp_path_factory) -> Path:
    """A randomly initialised but valid RFDN checkpoint (no real data needed)."""
    from effsr import models

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "rfdn_random.pth"
    torch.save(models.build("rfdn").state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------- basics
def test_python_dash_m_help_subprocess():
    res = subprocess.run([sys.executable, "-m", "effsr", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "profile" in res.stdout and "eval" in res.stdout


def test_no_command_and_argparse_errors_exit_2(capsys):
    code, _, err = _run(capsys)
    assert code == 2 and "usage" in err
    code, _, err = _run(capsys, "eval", "--model", "rfdn")          # --weights missing
    assert code == 2 and "--weights" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _run(capsys, "eval", "--model", "rfdn", "--weights", "w.pth", "--tile", "x")
    assert code == 2 and err.strip().splitlines() == [
        "effsr eval: error: argument --tile: invalid int value: 'x' (see effsr eval --help)"], err
    code, _, _ = _run(capsys, "--help")
    assert code == 0


def test_registry_rejects_duplicate_command():
    with pytest.raises(ValueError, match="name"):
        cli.command("profile", help="dup", arguments=lambda p: None)(lambda a: 0)


# ------------------------------------------------------------------------------------------ profile
def test_profile_json_round_trip(tmp_path, capsys):
    from effsr import metrics, models

    out = tmp_path / "sub" / "rfdn.json"
    code, stdout, _ = _run(capsys, "profile", "--model", "rfdn", "--json", str(out))
    assert code == 0
    row = next(ln for ln in stdout.splitlines() if ln.startswith("rfdn"))
    assert row.split()[1:6] == ["433,448", "0.433", "27.10", "112.03", "64"]   # exact count and [M]
    data = json.loads(out.read_text())
    expected = metrics.profile(models.build("rfdn")).as_dict()
    for key in ("params", "flops", "activations", "convs", "aten_flops"):
        assert type(data[key]) is int and data[key] == expected[key]
    assert data["params"] == 433_448 and data["convs"] == 64 and data["model"] == "rfdn"
    assert [p.name for p in out.parent.iterdir()] == ["rfdn.json"]     # no temp file left behind


def test_profile_several_models_and_input_size(tmp_path, capsys):
    out = tmp_path / "two.json"
    code, _, _ = _run(capsys, "profile", "--model", "rlfn", "imdn", "--input-size", "3", "64", "32",
                      "--json", str(out))
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data) == {"rlfn", "imdn"}
    assert data["imdn"]["input_size"] == [3, 64, 32]
    assert data["imdn"]["params"] == 893_936 and data["rlfn"]["params"] == 317_218


@pytest.mark.parametrize("argv,needle", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "rfdn", "--input-size", "3", "0", "8"], "input_size"),
])
def test_profile_errors_write_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "p.json"
    code, _, err = _run(capsys, "profile", *argv, "--json", str(out))
    assert code == 2 and needle in _error_line(err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_json_path_that_is_a_directory_is_rejected_before_work(tmp_path, capsys):
    code, stdout, err = _run(capsys, "profile", "--model", "rfdn", "--json", str(tmp_path))
    assert code == 2 and "is a directory" in _error_line(err) and stdout == ""


# --------------------------------------------------------------------------------------------- eval
def _tiny_dataset(root: Path, n: int = 2, seed: int = 0, lr_size=(6, 5)) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        hr = rng.integers(0, 256, (lr_size[0] * 4, lr_size[1] * 4, 3), dtype=np.uint8)
        _png(root / "HR" / f"im{i}.png", hr)
        _png(root / "LR_bicubic" / "X4" / f"im{i}x4.png", hr[::4, ::4])
    return root


def test_eval_on_folder_json_and_images(tmp_path, capsys, rfdn_weights):
    data = _tiny_dataset(tmp_path / "ds")
    out, imgs = tmp_path / "res.json", tmp_path / "sr"
    code, stdout, _ = _run(capsys, "eval", "--model", "rfdn", "--weights", str(rfdn_weights),
                           "--data", str(data),
                           "--device", "cpu", "--json", str(out), "--save-images", str(imgs), "--no-progress")
    assert code == 0
    res = json.loads(out.read_text())
    assert [r["name"] for r in res["per_image"]] == ["im0", "im1"]
    assert res["psnr_y"] == pytest.approx(np.mean([r["psnr_y"] for r in res["per_image"]]))
    assert sorted(p.name for p in imgs.iterdir()) == ["im0.png", "im1.png"]
    assert "mean" in stdout and "im1" in stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # staging removed


def test_eval_y_float_switches_the_luma_convention(tmp_path, capsys, rfdn_weights):
    """Default: integer Y (NTIRE/MATLAB); --y-float: unrounded Y. Both match quality.psnr on the saved images."""
    from effsr import data as sr_data
    from effsr import quality

    ds = _tiny_dataset(tmp_path / "ds")
    res = {}
    for flag in ((), ("--y-float",)):
        out, imgs = tmp_path / f"r{len(flag)}.json", tmp_path / f"sr{len(flag)}"
        code, stdout, _ = _run(capsys, "eval", "--model", "rfdn", "--weights", str(rfdn_weights), "--data",
                               str(ds), "--device", "cpu", "--json", str(out), "--save-images", str(imgs),
                               "--no-progress", *flag)
        assert code == 0
        assert ("unrounded Y" in stdout) == bool(flag)
        res[bool(flag)] = json.loads(out.read_text())
        for row in res[bool(flag)]["per_image"]:
            sr = sr_data.read_image(imgs / f"{row['name']}.png")
            hr = sr_data.read_image(ds / "HR" / f"{row['name']}.png")
            assert row["psnr_y"] == quality.psnr(sr, hr, shave=4, y_channel=True, y_round=not flag)
            assert row["ssim_y"] == quality.ssim(sr, hr, shave=4, y_round=not flag)
    assert res[False]["y_round"] is True and res[True]["y_round"] is False
    assert res[False]["psnr_rgb"] == res[True]["psnr_rgb"]
    assert res[False]["psnr_y"] != res[True]["psnr_y"]


def test_shrink_y_float_reaches_the_config_and_the_report_bicubic(tmp_path, rfdn_weights):
    from effsr.shrink import commands, report
    from effsr.shrink.config import ShrinkConfig

    ds = _tiny_dataset(tmp_path / "ds")
    parser = cli.build_parser()
    base = ["shrink", "--model", "rfdn", "--weights", str(rfdn_weights), "--train-data", str(ds),
            "--eval-data", str(ds), "--out", str(tmp_path / "run")]
    assert commands._config(parser.parse_args(base)).y_round is True
    cfg = commands._config(parser.parse_args(base + ["--y-float"]))
    assert cfg.y_round is False
    assert cfg.fingerprint() != commands._config(parser.parse_args(base)).fingerprint()  # resume keeps one convention
    assert commands._config(parser.parse_args(base)).channels_last is True
    nchw = commands._config(parser.parse_args(base + ["--no-channels-last"]))
    assert nchw.channels_last is False  # a resumed run keeps its memory format (other float rounding):
    assert nchw.fingerprint() != commands._config(parser.parse_args(base)).fingerprint()
    with pytest.raises(TypeError, match="y_round"):
        ShrinkConfig(model="rfdn", weights=str(rfdn_weights), train_data=str(ds), eval_data=[str(ds)],
                     out=str(tmp_path / "r2"), y_round="yes").validate()
    from effsr import data as sr_data

    pairs = list(sr_data.SRFolder(ds, scale=4))
    rounded, unrounded = report.bicubic({"ds": pairs}), report.bicubic({"ds": pairs}, y_round=False)
    assert rounded["ds"]["psnr_rgb"] == unrounded["ds"]["psnr_rgb"]
    assert rounded["ds"]["psnr_y"] != unrounded["ds"]["psnr_y"]


def test_eval_missing_weights_and_data(tmp_path, capsys, rfdn_weights):
    out = tmp_path / "r.json"
    code, _, err = _run(capsys, "eval", "--model", "rfdn", "--weights", str(tmp_path / "none.pth"),
                        "--data", str(tmp_path), "--json", str(out))
    assert code == 2 and "--weights: file not found" in _error_line(err)
    code, _, err = _run(capsys, "eval", "--model", "rfdn", "--weights", str(rfdn_weights),
                        "--data", str(tmp_path / "missing"), "--json", str(out))
    assert code == 2 and "data not found" in _error_line(err)
    assert not out.exists()


def test_eval_wrong_architecture_names_keys(tmp_path, capsys):
    from effsr import models

    wrong = tmp_path / "imdn.pth"
    torch.save(models.build("imdn").state_dict(), wrong)
    out = tmp_path / "r.json"
    code, _, err = _run(capsys, "eval", "--model", "rfdn", "--weights", str(wrong), "--data", str(tmp_path),
                        "--json", str(out))
    line = _error_line(err)
    assert code == 2 and "fea_conv.weight" in line and str(wrong) in line
    assert not out.exists()


def test_eval_wrong_architecture_hint_reaches_the_user(tmp_path, capsys):
    """The API's "looks like the official 'imdn' network" hint leads the line; the key listings may be cut."""
    from effsr import models

    wrong = tmp_path / "imdn.pth"
    torch.save(models.build("imdn").state_dict(), wrong)
    code, _, err = _run(capsys, "eval", "--model", "rlfn", "--weights", str(wrong), "--data", str(tmp_path))
    line = _error_line(err)
    assert code == 2 and "looks like the official 'imdn' network (try --model imdn)" in line
    assert line.index("looks like") < line.index("unexpected key")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_eval_truncated_checkpoint_is_one_clean_line(tmp_path, capsys, suffix):
    from safetensors.torch import save_file

    from effsr import models

    full = tmp_path / f"full{suffix}"
    sd = {k: v.contiguous() for k, v in models.build("rfdn").state_dict().items()}
    save_file(sd, str(full)) if suffix == ".safetensors" else torch.save(sd, full)
    cut = tmp_path / f"t{suffix}"
    cut.write_bytes(full.read_bytes()[:10000])  # head -c 10000
    out = tmp_path / "r.json"
    code, _, err = _run(capsys, "eval", "--model", "rfdn", "--weights", str(cut), "--data", "default",
                        "--json", str(out), "--no-progress")
    line = _error_line(err)
    assert code == 2 and str(cut) in line and not out.exists()


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, err = _run(capsys)
    assert code == 2 and "usage: effsr" in err and "profile" in err and "shrink" in err


def test_version(capsys):
    from importlib.metadata import version

    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out.strip() == f"effsr {version('effsr')}"


@pytest.mark.parametrize("command", ["profile", "eval", "runtime", "shrink", "demo"])
def test_help_lists_model_names_and_every_default(capsys, command):
    from effsr import models

    code, out, _ = _run(capsys, command, "--help")
    assert code == 0
    text = " ".join(out.split())
    if command != "demo":
        assert all(name in text for name in models.names()), text
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.dest == "help" or action.required or action.nargs == 0:  # flags have no value to default
            continue
        shown = formatter._expand_help(action)
        assert "default" in shown, f"{command} {action.option_strings} hides its default: {shown!r}"
        if action.default not in (None, False) and "%(default)" in formatter._get_help_string(action):
            assert str(action.default) in shown


def test_eval_unreadable_image_writes_nothing(tmp_path, capsys, rfdn_weights):
    data = _tiny_dataset(tmp_path / "ds", n=1)
    (data / "HR" / "zz.png").write_bytes(b"not a png")                   # second image, after a good one
    (data / "LR_bicubic" / "X4" / "zzx4.png").write_bytes(b"not a png")
    out, imgs = tmp_path / "r.json", tmp_path / "new" / "sr"
    code, _, err = _run(capsys, "eval", "--model", "rfdn", "--weights", str(rfdn_weights),
                           "--data", str(data),
                        "--json", str(out), "--save-images", str(imgs), "--no-progress")
    assert code == 2 and "zz" in _error_line(err)
    assert not out.exists() and not imgs.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_failed_eval_on_hr_only_folder_leaves_the_data_folder_untouched(tmp_path, capsys, rfdn_weights,
                                                                        monkeypatch):
    monkeypatch.setenv("EFFSR_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "hr_only"
    _png(data / "a.png", np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8))
    (data / "b.png").write_bytes(b"not a png")  # fails after the first LR image was generated
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    out = tmp_path / "r.json"
    code, _, err = _run(capsys, "eval", "--model", "rfdn", "--weights", str(rfdn_weights), "--data", str(data),
                        "--json", str(out), "--no-progress")
    assert code == 2 and "b.png" in _error_line(err) and not out.exists()
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # no .effsr_cache/ in the data


def test_eval_size_mismatch(tmp_path, capsys, rfdn_weights):
    data = _tiny_dataset(tmp_path / "ds", n=1)
    _png(data / "LR_bicubic" / "X4" / "im0x4.png", np.zeros((3, 3, 3), np.uint8))
    code, _, err = _run(capsys, "eval", "--model", "rfdn", "--weights", str(rfdn_weights),
                           "--data", str(data),
                        "--no-progress")
    assert code == 2 and "does not match" in _error_line(err)


@pytest.mark.data
def test_eval_set5_official_rfdn(tmp_path, capsys, shared_data, checkpoints, one_thread):
    out = tmp_path / "set5.json"
    code, stdout, _ = _run(capsys, "eval", "--model", "rfdn",
                           "--weights", str(checkpoints / "rfdn_aim2020.pth"),
                           "--data", str(shared_data / "set5"), "--device", "cpu", "--json", str(out))
    assert code == 0
    res = json.loads(out.read_text())
    assert len(res["per_image"]) == 5
    # Published RFDN x4 Set5: 32.24 dB Y-PSNR; bicubic is 28.42 dB.
    assert 31.8 < res["psnr_y"] < 32.6
    assert 0.88 < res["ssim_y"] < 0.91
    assert res["psnr_rgb"] < res["psnr_y"]
    assert f"{res['psnr_y']:6.3f}" in stdout


def test_runtime_command_json(tmp_path, capsys, rfdn_weights):
    data = _tiny_dataset(tmp_path / "ds", n=1)
    out = tmp_path / "rt.json"
    code, stdout, _ = _run(capsys, "runtime", "--model", "rfdn", "--weights", str(rfdn_weights), "--data",
                           str(data), "--device", "cpu", "--trials", "2", "--warmup", "0", "--json", str(out))
    assert code == 0 and "ms/image" in stdout
    res = json.loads(out.read_text())
    assert len(res["trials_ms"]) == 2 and res["ms_per_image"] == min(res["trials_ms"])


def test_evaluate_gray_sources_ntire_by_default_gray_channel_as_option() -> None:
    """A gray HR (Set14 bridge) is measured by default as the NTIRE code reads it (three identical
    channels); ``gray_channel=True`` compares it on its gray channel (the MATLAB papers' convention)."""
    import numpy as np
    import torch.nn.functional as F
    from torch import nn

    from effsr.data import make_pair
    from effsr.inference import evaluate

    class Bicubicish(nn.Module):
        scale, input_range = 4, 255.0

        def forward(self, x):
            return F.interpolate(x, scale_factor=4, mode="nearest") + torch.tensor([0.0, 3.0, -3.0]).view(1, 3, 1, 1)

    gray = np.full((32, 36), 100, dtype=np.uint8)
    pair = make_pair("g", np.repeat(gray[:, :, None], 3, axis=2), scale=4, gray=True)
    as_rgb = make_pair("g", np.repeat(gray[:, :, None], 3, axis=2), scale=4, gray=False)
    net = Bicubicish()
    g = evaluate(net, [pair], progress=False, gray_channel=True)
    d, c = evaluate(net, [pair], progress=False), evaluate(net, [as_rgb], progress=False)
    # the +3/-3 channel offsets cancel in the gray mean (exact output), not in the RGB measurement
    assert g["psnr_rgb"] == float("inf") and g["psnr_y"] == float("inf")
    assert c["psnr_rgb"] == pytest.approx(10 * np.log10(255.0**2 / 6.0))
    # default: the gray pair is measured exactly like its RGB copy; integer Y: HR 16 + 219*100/255 -> 102,
    # SR 16 + (65.481*100 + 128.553*103 + 24.966*97)/255 = 103.10 -> 103, so one grey level everywhere
    assert d["psnr_rgb"] == c["psnr_rgb"] and d["psnr_y"] == c["psnr_y"]
    assert d["psnr_y"] == pytest.approx(10 * np.log10(255.0**2 / 1.0))
    with pytest.raises(TypeError, match="gray_channel"):
        evaluate(net, [pair], progress=False, gray_channel=1)


# ------------------------------------------------------------------------------------ shrink / demo
@pytest.mark.parametrize("command", ["shrink", "demo"])
def test_out_under_a_file_fails_before_any_work(tmp_path, capsys, rfdn_weights, command):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    out = blocker / "run"
    argv = (["shrink", "--model", "rfdn", "--weights", str(rfdn_weights), "--train-data", "default",
             "--eval-data", "default"] if command == "shrink" else ["demo", "--teacher-steps", "1", "--steps", "1"])
    code, stdout, err = _run(capsys, *argv, "--out", str(out))
    line = _error_line(err)
    assert code == 2 and "--out" in line and "is not a directory" in line and "Error" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and stdout == ""


def test_shrink_truncated_weights_is_one_clean_line(tmp_path, capsys):
    from safetensors.torch import save_file

    from effsr import models

    full = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in models.build("rfdn").state_dict().items()}, str(full))
    cut = tmp_path / "t.safetensors"
    cut.write_bytes(full.read_bytes()[:10000])
    out = tmp_path / "run"
    code, _, err = _run(capsys, "shrink", "--model", "rfdn", "--weights", str(cut), "--train-data", "default",
                        "--eval-data", "default", "--out", str(out), "--no-progress")
    line = _error_line(err)
    assert code == 2 and "--weights" in line and str(cut) in line and "truncated or corrupt" in line
    assert not out.exists()


def test_shrink_patch_size_argument(tmp_path, capsys, rfdn_weights):
    from effsr.shrink.config import patch_size_arg

    assert patch_size_arg("auto") is None and patch_size_arg("24") == 24
    code, _, err = _run(capsys, "shrink", "--model", "rfdn", "--weights", str(rfdn_weights), "--train-data",
                        "default", "--eval-data", "default", "--patch-size", "big", "--out", str(tmp_path / "r"))
    assert code == 2 and "--patch-size" in err and "'auto'" in err
    code, _, err = _run(capsys, "shrink", "--model", "rfdn", "--weights", str(rfdn_weights), "--train-data",
                        "default", "--eval-data", "default", "--patch-size", "8", "--out", str(tmp_path / "r"))
    assert code == 2 and "--patch-size" in _error_line(err) and not (tmp_path / "r").exists()


def test_shrink_wrong_architecture_hint_reaches_the_user(tmp_path, capsys):
    from effsr import models

    wrong = tmp_path / "imdn.pth"
    torch.save(models.build("imdn").state_dict(), wrong)
    code, _, err = _run(capsys, "shrink", "--model", "rfdn", "--weights", str(wrong), "--train-data", "default",
                        "--eval-data", "default", "--out", str(tmp_path / "run"), "--no-progress")
    line = _error_line(err)
    assert code == 2 and line.startswith("effsr shrink: error: --weights")
    assert "looks like the official 'imdn' network (try --model imdn)" in line
    assert not (tmp_path / "run").exists()
