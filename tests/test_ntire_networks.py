"""The published NTIRE networks of ``../shared/data/ntire2024`` named as a user names them: ``effsr eval`` equals
the authors' own loading code scored with the NTIRE convention, and ``effsr profile`` gives the report's row."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from effsr import cli

pytestmark = [pytest.mark.data, pytest.mark.slow]

#: Set5 PSNR-Y (integer Y, shave 4) of each network loaded with its authors' code and official weights.
TEACHER_PSNR_Y = {"dipnet": 31.784, "span": 31.718, "safmnpp": 31.997, "quicksrnet_large": 31.939,
                  "lightrlfn": 32.017, "rcn": 31.956, "lkfn": 31.985}


def _entries(shared: Path | None) -> list[dict]:
    if shared is None or not (shared / "ntire2024" / "networks.json").is_file():
        return []
    return json.loads((shared / "ntire2024" / "networks.json").read_text())["networks"]


from conftest import shared_data_dir  # noqa: E402

NETWORKS = _entries(shared_data_dir())


@pytest.fixture(scope="module")
def ntire(shared_data: Path) -> Path:
    root = shared_data / "ntire2024"
    if not (root / "networks.json").is_file():
        pytest.skip("ntire2024 networks not found in the shared data")
    return root


def model_args(root: Path, e: dict) -> list[str]:
    """The command-line options that name network ``e`` of networks.json."""
    args = ["--model", f"{root / e['file']}:{e['cls']}", "--weights", str(root / e["checkpoint"]),
            "--input-range", str(e["input_range"])]
    if e["kwargs"]:
        args += ["--model-config", json.dumps(e["kwargs"])]
    if e["state_dict_key"]:
        args += ["--weights-key", e["state_dict_key"]]
    return args


def _authors_psnr_y(root: Path, e: dict, set5: Path) -> float:
    """Load the network as its authors' test code does and score Set5 with the NTIRE convention."""
    from PIL import Image

    from effsr.quality import psnr

    spec = importlib.util.spec_from_file_location(f"authors_{e['name']}", root / e["file"])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    net = getattr(mod, e["cls"])(**e["kwargs"])
    sd = torch.load(root / e["checkpoint"], map_location="cpu", weights_only=True)
    net.load_state_dict(sd[e["state_dict_key"]] if e["state_dict_key"] else sd, strict=True)
    net.eval()
    rng = float(e["input_range"])
    scores = []
    for hr_path in sorted((set5 / "HR").glob("*.png")):
        lr = np.asarray(Image.open(set5 / "LR_bicubic" / "X4" / f"{hr_path.stem}x4.png").convert("RGB"))
        hr = np.asarray(Image.open(hr_path).convert("RGB"))
        x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255.0 * rng
        with torch.no_grad():
            y = net(x).clamp(0, rng) / rng
        sr = (y[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        scores.append(psnr(sr, hr[: sr.shape[0], : sr.shape[1]], shave=4, y_channel=True))
    return float(np.mean(scores))


@pytest.mark.parametrize("entry", NETWORKS, ids=[e["name"] for e in NETWORKS])
def test_eval_equals_authors_loading(ntire, shared_data, entry, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = cli.main(["eval", *model_args(ntire, entry), "--data", str(shared_data / "set5"), "--no-progress",
                     "--json", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    ours = json.loads(out.read_text())["psnr_y"]
    assert ours == pytest.approx(_authors_psnr_y(ntire, entry, shared_data / "set5"), abs=1e-3)
    assert ours == pytest.approx(TEACHER_PSNR_Y[entry["name"]], abs=1.5e-3)


def test_profile_dipnet_is_the_report_row(ntire, capsys, tmp_path):
    out = tmp_path / "p.json"
    assert cli.main(["profile", "--model", f"{ntire / 'models' / 'DIPNet.py'}:DIPNet", "--json", str(out)]) == 0
    capsys.readouterr()
    p = json.loads(out.read_text())
    assert p["params"] == 243_252 and p["convs"] == 39
    assert round(p["flops"] / 1e9, 2) == 14.90 and round(p["activations"] / 1e6, 2) == 72.97


@pytest.mark.parametrize("entry", NETWORKS, ids=[e["name"] for e in NETWORKS])
def test_shrink_end_to_end_and_reload(ntire, shared_data, entry, tmp_path, capsys):
    """``effsr shrink`` of each published network to 90 % of its params (training-free, small calibration), then
    ``effsr eval`` of the student file with no --model: the same PSNR."""
    from effsr import models

    teacher = models.open_model(f"{ntire / entry['file']}:{entry['cls']}", ntire / entry["checkpoint"],
                                config=entry["kwargs"], input_range=entry["input_range"],
                                weights_key=entry["state_dict_key"])
    target = int(0.9 * sum(p.numel() for p in teacher.parameters()))
    out = tmp_path / "run"
    code = cli.main(["shrink", *model_args(ntire, entry), "--train-data", str(shared_data / "t91"),
                     "--eval-data", str(shared_data / "set5"), "--max-eval-images", "1", "--max-train-images", "8",
                     "--calib-images", "8", "--calib-rows", "512", "--target-params", str(target), "--method", "prune",
                     "--steps", "0", "--refine-steps", "10", "--no-peers", "--runtime-trials", "1", "--no-progress",
                     "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    student = next(m for m in report["models"] if m["kind"] == "student")
    assert student["params"] <= target
    locked = json.loads(next((out / "stages").glob("*_compress.json")).read_text())["result"]["locked"]
    assert locked and all(isinstance(why, str) and why for why in locked.values())
    if entry["name"] == "rcn":  # its LayerNorm2d (a custom autograd Function over C): caught by the zeroing check
        assert any(n.endswith(".c5") and "not the same as zeroing" in why for n, why in locked.items()), locked
    code = cli.main(["eval", "--weights", str(out / "student.safetensors"), "--data", str(shared_data / "set5"),
                     "--no-progress", "--json", str(tmp_path / "e.json")])
    assert code == 0, capsys.readouterr()[1]
    first = json.loads((tmp_path / "e.json").read_text())["per_image"][0]
    assert first["psnr_y"] == pytest.approx(student["per_image"]["set5"][0]["psnr_y"], abs=1e-9)
