"""``effsr shrink`` / ``frontier`` / ``export`` on a user's network named by its file: data-aware compression to a
budget, distillation at its repeated blocks, a student that reloads from its file alone."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_benchmark_folder
from effsr import cli, data, models

# end-to-end `effsr shrink` runs on a user's network: `pytest -m "not slow"` leaves them out
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

NET_CODE = textwrap.dedent('''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, nf):
            super().__init__()
            self.c1 = nn.Conv2d(nf, nf, 3, padding=1)
            self.c2 = nn.Conv2d(nf, nf, 3, padding=1)

        def forward(self, x):
            return x + self.c2(torch.relu(self.c1(x)))


    class BlockSR(nn.Module):
        def __init__(self, nf=16, n_blocks=3):
            super().__init__()
            self.head = nn.Conv2d(3, nf, 3, padding=1)
            self.body = nn.Sequential(*[Block(nf) for _ in range(n_blocks)])
            self.tail = nn.Conv2d(nf, 48, 3, padding=1)
            self.up = nn.PixelShuffle(4)

        def forward(self, x):
            f = self.head(x)
            return self.up(self.tail(self.body(f) + f))


    class DWBlock(nn.Module):
        def __init__(self, nf):
            super().__init__()
            self.dw = nn.Conv2d(nf, nf, 5, padding=2, groups=nf)
            self.pw1 = nn.Conv2d(nf, 2 * nf, 1)
            self.pw2 = nn.Conv2d(2 * nf, nf, 1)

        def forward(self, x):
            return x + self.pw2(torch.relu(self.pw1(self.dw(x))))


    class DWSR(nn.Module):
        """Depthwise and 1x1 convs only, besides a 3-channel head and tail."""

        def __init__(self, nf=16):
            super().__init__()
            self.head = nn.Conv2d(3, nf, 3, padding=1)
            self.body = nn.Sequential(DWBlock(nf), DWBlock(nf))
            self.tail = nn.Conv2d(nf, 48, 1)
            self.up = nn.PixelShuffle(4)

        def forward(self, x):
            return self.up(self.tail(self.body(self.head(x))))
''')


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> dict:
    import distill

    root = tmp_path_factory.mktemp("user_net")
    code = root / "my_sr.py"
    code.write_text(NET_CODE)
    photos = {p.name: p.hr for p in data.default_images()}
    train = [(f"{n}{i}", np.ascontiguousarray(photos[n][i * 128:i * 128 + 128, 64:256]))
             for n in ("astronaut", "rocket", "chelsea") for i in range(2)]
    evals = [("camera", np.ascontiguousarray(photos["camera"][100:228, 100:260]))]
    train_dir = write_benchmark_folder(root / "train", train)
    torch.manual_seed(0)
    net = models.open_model(f"{code}:BlockSR", input_range=1.0)
    ds = data.PatchDataset(list(data.open_dataset(train_dir)), patch_size=24, augment=True, length=16, seed=0)
    distill.train_steps(distill.Supervised(net.train()), ds, 120, lr=2e-3, batch_size=8, device="cpu", seed=0,
                        progress=False)
    weights = root / "my_sr.pth"
    torch.save({"state_dict": net.state_dict()}, weights)
    return {"root": root, "spec": f"{code}:BlockSR", "code": code, "weights": weights, "train": train_dir,
            "eval": write_benchmark_folder(root / "eval", evals),
            "params": sum(p.numel() for p in net.parameters())}


def _argv(user: dict, out: Path, *extra: str) -> list[str]:
    return ["shrink", "--model", user["spec"], "--weights", str(user["weights"]), "--input-range", "1",
            "--train-data", str(user["train"]), "--eval-data", str(user["eval"]), "--calib-images", "16",
            "--tucker-min-channels", "4", "--batch-size", "4", "--patch-size", "24", "--seed", "1", "--no-peers",
            "--runtime-trials", "1", "--no-progress", "--out", str(out), *extra]


def _student_row(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    return next(m for m in report["models"] if m["kind"] == "student")


@pytest.mark.parametrize("method", ["prune", "tucker"])
def test_shrink_user_network_to_budget_distils_blocks_and_reloads(user, method, capsys):
    out = user["root"] / f"run_{method}"
    target = int(0.67 * user["params"])
    code = cli.main(_argv(user, out, "--target-params", str(target), "--method", method, "--steps", "3",
                          "--feature-layers", "blocks"))
    _, err = capsys.readouterr()
    assert code == 0, err
    row = _student_row(out)
    assert row["params"] <= target
    if method == "prune":  # the conv feeding PixelShuffle keeps 3 x 4^2 channels: locked and named
        comp = json.loads(next((out / "stages").glob("*_compress.json")).read_text())["result"]
        assert "output channels" in comp["locked"]["tail"]
        assert "group(s) locked, kept whole: tail" in (out / "log.txt").read_text()
    distilled = json.loads(next((out / "stages").glob("*_distill.json")).read_text())
    info = json.dumps(distilled)
    assert '"pairs": ["body.0", "body.1", "body.2"]' in info and "the network's repeated blocks" in info
    student = models.open_model(None, out / "student.safetensors")  # no --model: the recipe names the file
    assert sum(p.numel() for p in student.parameters()) == row["params"]
    from effsr.inference import evaluate

    again = evaluate(student, data.open_dataset(user["eval"]), progress=False)["psnr_y"]
    assert again == pytest.approx(row["eval"]["eval"]["psnr_y"], abs=1e-9)


def test_output_only_by_default(user, capsys):
    out = user["root"] / "run_default"
    code = cli.main(_argv(user, out, "--target-params", str(int(0.8 * user["params"])), "--method", "prune",
                          "--steps", "1"))
    assert code == 0, capsys.readouterr()[1]
    info = json.dumps(json.loads(next((out / "stages").glob("*_distill.json")).read_text()))
    assert '"pairs": []' in info and "the default for a user's network" in info


def test_output_only_when_asked(user, capsys):
    out = user["root"] / "run_none"
    code = cli.main(_argv(user, out, "--target-params", str(int(0.8 * user["params"])), "--method", "prune",
                          "--steps", "1", "--feature-layers", "none"))
    assert code == 0, capsys.readouterr()[1]
    info = json.loads(next((out / "stages").glob("*_distill.json")).read_text())
    assert '"pairs": []' in json.dumps(info)


@pytest.mark.parametrize("extra,needle", [
    (["--target-params", "100", "--feature-layers", "body.7"], "--feature-layers: the teacher has no module 'body.7'"),
    (["--prune", "0.5"], "--repify/--prune/--tucker: the weight-norm recipe rebuilds zoo networks only"),
    (["--target-params", "1000", "--scale", "2"], "--scale: BlockSR upscales x4, not x2"),
])
def test_bad_input_one_line_nothing_written(user, tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    code = cli.main(_argv(user, out, *extra))
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not out.exists()


def test_tucker_reaches_a_budget_of_1x1_convs(user, capsys):
    """A network of depthwise and 1x1 convs: the k x k convs alone cannot reach the budget, so the 1x1 convs are
    factorised too; the student meets the budget and reloads."""
    torch.manual_seed(3)
    net = models.open_model(f"{user['code']}:DWSR", input_range=1.0)
    weights = user["root"] / "dwsr.pth"
    torch.save(net.state_dict(), weights)
    n = sum(p.numel() for p in net.parameters())
    argv = _argv(user, user["root"] / "run_dw", "--target-params", str(int(0.67 * n)), "--method", "tucker",
                 "--steps", "0")
    argv[argv.index("--model") + 1] = f"{user['code']}:DWSR"
    argv[argv.index("--weights") + 1] = str(weights)
    code = cli.main(argv)
    assert code == 0, capsys.readouterr()[1]
    comp = json.loads(next((user["root"] / "run_dw" / "stages").glob("*_compress.json")).read_text())["result"]
    assert comp["include_1x1"] is True and comp["achieved"] <= int(0.67 * n)
    assert any(name.endswith("pw1") or name.endswith("pw2") for name in comp["ranks"])
    student = models.open_model(None, user["root"] / "run_dw" / "student.safetensors")
    assert sum(p.numel() for p in student.parameters()) == comp["achieved"]


def test_frontier_and_compare_on_a_user_network(user, capsys):
    shrink_out = user["root"] / "cmp_shrink"
    assert cli.main(_argv(user, shrink_out, "--target-params", str(int(0.67 * user["params"])), "--method", "tucker",
                          "--steps", "0")) == 0
    front = user["root"] / "cmp_frontier"
    code = cli.main(["frontier", "--model", user["spec"], "--weights", str(user["weights"]), "--input-range", "1",
                     "--calib-data", str(user["train"]), "--eval-data", str(user["eval"]), "--budgets", "0.8,0.5",
                     "--method", "prune", "--calib-images", "16", "--no-peers", "--no-progress",
                     "--out", str(front)])
    assert code == 0, capsys.readouterr()[1]
    points = json.loads((front / "frontier.json").read_text())["points"]
    assert {k: v["params"] <= v["target_params"] for k, v in points.items()} == {"prune@0.8": True, "prune@0.5": True}
    capsys.readouterr()
    out = user["root"] / "cmp"
    assert cli.main(["compare", str(shrink_out), str(front), "--out", str(out)]) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["families"] == ["BlockSR", "BlockSR (cmp_frontier)"] and doc["eval_set"] == "eval"
    assert len([m for m in doc["models"] if m["kind"] == "student"]) == 3
    assert (out / "compare.png").stat().st_size > 0 and (out / "compare.csv").read_text().count("\n") == 6
    bad = user["root"] / "cmp_bad"
    assert cli.main(["compare", str(shrink_out), str(user["root"]), "--out", str(bad)]) == 2
    assert "holds no frontier.json" in capsys.readouterr()[1] and not bad.exists()
