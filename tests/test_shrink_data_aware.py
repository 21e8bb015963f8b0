"""Tests for the data-aware path of effsr shrink (calibration, one-shot prune / Tucker to a budget, auto,
distillation) and ``effsr frontier``; tiny networks on scikit-image's photos, plus real-data ones on RFDN."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import effsr.shrink.commands  # noqa: F401 - registers `effsr shrink` / `effsr frontier`
from effsr import cli, data, inference, models
from effsr.shrink import ShrinkConfig, compress, load_student, save_student
from effsr.shrink.recipe import new_recipe
from conftest import write_benchmark_folder

TINY = {"nf": 12, "num_blocks": 2}


# end-to-end `effsr shrink` / `effsr frontier` runs: `pytest -m "not slow"` leaves them out
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def _train_teacher(pairs: list, steps: int = 150) -> torch.nn.Module:
    """A tiny RFDN trained briefly (a random-weight teacher's outputs are noise: nothing to compare)."""
    import distill

    torch.manual_seed(0)
    net = models.build("rfdn", **TINY)
    ds = data.PatchDataset(pairs, patch_size=24, augment=True, length=16, seed=0)
    distill.train_steps(distill.Supervised(net), ds, steps, lr=2e-3, batch_size=8, device="cpu", seed=0,
                        progress=False)
    return net.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data_aware")
    photos = {p.name: p.hr for p in data.default_images()}
    train = [(f"{n}{i}", np.ascontiguousarray(photos[n][i * 128:i * 128 + 128, 64:256]))
             for n in ("astronaut", "rocket", "chelsea") for i in range(2)]
    evals = [(n, np.ascontiguousarray(photos[n][100:228, 100:260])) for n in ("camera", "coffee")]
    train_dir = write_benchmark_folder(root / "train", train)
    teacher = _train_teacher(list(data.open_dataset(train_dir)))
    weights = root / "teacher.safetensors"
    save_student(teacher, new_recipe("rfdn", teacher.config), weights)
    return {"root": root, "weights": weights, "train": train_dir, "eval": write_benchmark_folder(root / "eval", evals),
            "params": sum(p.numel() for p in teacher.parameters())}


def _argv(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["shrink", "--model", "rfdn", "--weights", str(tiny["weights"]), "--train-data", str(tiny["train"]),
            "--eval-data", str(tiny["eval"]), "--calib-images", "16", "--tucker-min-channels", "4",
            "--batch-size", "4", "--patch-size", "24", "--device", "cpu", "--seed", "1", "--no-peers",
            "--runtime-trials", "1", "--no-progress", "--out", str(out), *extra]


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _student_psnr(out: Path) -> float:
    return next(m for m in _report(out)["models"] if m["kind"] == "student")["eval"]["eval"]["psnr_y"]


@pytest.fixture(scope="module")
def prune_run(tiny) -> Path:
    out = tiny["root"] / "prune0"
    target = int(0.6 * tiny["params"])
    assert cli.main(_argv(tiny, out, "--target-params", str(target), "--method", "prune", "--steps", "0")) == 0
    return out


# ----------------------------------------------------------------------------------------- shrink
def test_training_free_prune_meets_budget_beats_plain_l2_and_reloads(tiny, prune_run):
    rep = _report(prune_run)
    target = int(0.6 * tiny["params"])
    student = next(m for m in rep["models"] if m["kind"] == "student")
    comp = rep["stages"]["compress"]
    assert student["params"] <= target and comp["achieved"] <= target
    assert rep["stages"]["distill"] is None  # --steps 0: training-free, no distillation stage
    oneshot = comp["eval"]["eval"]["psnr_y"]
    assert oneshot == pytest.approx(student["eval"]["eval"]["psnr_y"], abs=0)
    # the plain weight-norm recipe (one uniform L2 ratio, no reconstruction) at the uniform allocation's
    # ratio (which fits the budget before its fill gives atoms back)
    assert comp["allocation"] == "uniform"
    ratio = comp["ratio"]
    plain = tiny["root"] / "plain_l2"
    assert cli.main(_argv(tiny, plain, "--prune", str(ratio), "--steps", "0")) == 0
    plain_rep = _report(plain)
    plain_student = next(m for m in plain_rep["models"] if m["kind"] == "student")
    assert plain_student["params"] <= target
    # the fill only adds back to what the ratio keeps, and adds params exactly when it restores atoms
    assert student["params"] >= plain_student["params"]
    assert (student["params"] > plain_student["params"]) == (comp["restored"] > 0)
    assert oneshot > plain_student["eval"]["eval"]["psnr_y"] + 0.05
    # the saved student reloads (recipe: prune history + reconstructed weights) and gives the same PSNR
    reloaded = load_student(prune_run / "student.safetensors")
    again = inference.evaluate(reloaded, data.open_dataset(tiny["eval"]), progress=False)["psnr_y"]
    assert again == oneshot
    assert sum(p.numel() for p in reloaded.parameters()) == student["params"]


def test_report_shows_oneshot_psnr_times_and_runtime(prune_run):
    rep = _report(prune_run)
    comp = rep["stages"]["compress"]
    for key in ("seconds", "calibration_seconds", "oneshot_seconds"):
        assert comp[key] > 0
    assert comp["reconstruction"]["layers"] > 0
    md = (prune_run / "report.md").read_text()
    assert "one-shot" in md and "compress" in md
    student = next(m for m in rep["models"] if m["kind"] == "student")
    assert student["runtime_ms"] > 0 and student["activations"] > 0 and student["convs"] > 0


def test_tucker_then_distill_reports_both_psnrs_and_reloads(tiny):
    out = tiny["root"] / "tucker2"
    target = int(0.7 * tiny["params"])
    assert cli.main(_argv(tiny, out, "--target-params", str(target), "--method", "tucker", "--steps", "3")) == 0
    rep = _report(out)
    comp, dist = rep["stages"]["compress"], rep["stages"]["distill"]
    assert comp["chosen"] == "tucker" and comp["achieved"] <= target
    assert dist["finetune"]["steps"] == 3 and dist["distill_seconds"] > 0
    assert "eval" in comp and "eval" in dist
    student = next(m for m in rep["models"] if m["kind"] == "student")
    assert student["params"] <= target
    assert student["convs"] > next(m for m in rep["models"] if m["kind"] == "teacher")["convs"]  # Tucker's extra convs
    assert dist["eval"]["eval"]["psnr_y"] == student["eval"]["eval"]["psnr_y"]
    reloaded = load_student(out / "student.safetensors")
    again = inference.evaluate(reloaded, data.open_dataset(tiny["eval"]), progress=False)["psnr_y"]
    assert again == student["eval"]["eval"]["psnr_y"]


def test_auto_keeps_the_better_held_out_candidate(tiny):
    out = tiny["root"] / "auto"
    target = int(0.6 * tiny["params"])
    assert cli.main(_argv(tiny, out, "--target-params", str(target), "--steps", "0")) == 0
    comp = _report(out)["stages"]["compress"]
    cands = comp["candidates"]
    assert set(cands) == {"prune", "tucker"}
    assert all(c["params"] <= target for c in cands.values())
    best = max(cands, key=lambda m: cands[m]["held_out_psnr_y"])
    assert comp["chosen"] == best


def test_block_refinement_fits_the_pruned_blocks_keeps_a_gain_and_reloads(tiny, prune_run):
    """``--refine-steps``: the pruned student's B1..Bn blocks, whose outputs lost channels, are fitted to the
    teacher's kept channels (read from the pruning history); the refined student is kept only when the held-out
    PSNR-Y rises, is recorded and logged, and reloads from its file to the same PSNR."""
    out = tiny["root"] / "prune0_refined"
    target = int(0.6 * tiny["params"])
    assert cli.main(_argv(tiny, out, "--target-params", str(target), "--method", "prune", "--steps", "0",
                          "--refine-steps", "30")) == 0
    comp = _report(out)["stages"]["compress"]
    ref = comp["refine"]
    assert ref["steps"] == 30 and ref["blocks"] == ["B1", "B2"] and not ref["skipped"]
    assert all(b["kept"] == (b["loss_after"] < b["loss_before"]) for b in ref["per_block"])
    assert any(b["kept"] for b in ref["per_block"])
    # the convs after the blocks are solved again on the refined features; the head before them is not
    assert ref["refit"]["layers"] == ["c.0", "LR_conv", "upsampler.0"]
    assert ref["kept"] == (ref["held_out_after"] > ref["held_out_before"])
    assert comp["held_out_psnr_y"] == (ref["held_out_after"] if ref["kept"] else ref["held_out_before"])
    assert "block refinement of 2 block(s), 30 steps each" in (out / "log.txt").read_text()
    off = tiny["root"] / "prune0_unrefined"
    assert cli.main(_argv(tiny, off, "--target-params", str(target), "--method", "prune", "--steps", "0",
                          "--refine-steps", "0")) == 0
    plain = _report(off)["stages"]["compress"]
    assert "refine" not in plain and plain["params"] == comp["params"]  # same structure, weights refined or not
    assert plain["held_out_psnr_y"] == ref["held_out_before"]  # the refinement starts from the same student
    student = next(m for m in _report(out)["models"] if m["kind"] == "student")
    reloaded = load_student(out / "student.safetensors")
    again = inference.evaluate(reloaded, data.open_dataset(tiny["eval"]), progress=False)["psnr_y"]
    assert again == student["eval"]["eval"]["psnr_y"]
    if ref["kept"]:
        assert student["eval"]["eval"]["psnr_y"] != _student_psnr(off)
    assert _report(prune_run)["stages"]["compress"]["refine"]["steps"] == 200  # on by default


def test_block_output_channels_follow_the_pruning_history(tiny):
    """The channel map of a pruned block's output is the kept output channels of its last conv (RFDB: c5)."""
    from prune.core import HISTORY_ATTR
    from prune.reconstruct import kept_channels

    from effsr.shrink.compress import block_output_channels

    teacher = load_student(tiny["weights"])
    import prune

    example = torch.rand(1, 3, 32, 32)
    pruned = prune.l2_filter_prune(teacher, example, 0.3, steps=1, flops_input_size=None, progress=False)
    chans = block_output_channels(teacher, pruned, ["B1", "B2"], example)
    keep = kept_channels(teacher, getattr(pruned, HISTORY_ATTR), example)
    assert set(chans) == {"B1", "B2"}
    for b in ("B1", "B2"):
        assert chans[b] == keep[f"{b}.c5"][0] and len(chans[b]) == pruned.get_submodule(f"{b}.c5").out_channels
    assert block_output_channels(teacher, teacher, ["B1"], example) == {}


def test_choose_by_runtime_within_tolerance():
    cands = {"prune": {"held_out_psnr_y": 30.00, "runtime_ms": 5.0},
             "tucker": {"held_out_psnr_y": 30.08, "runtime_ms": 9.0}}
    assert compress.choose(cands, "psnr", 0.1) == "tucker"
    assert compress.choose(cands, "runtime", 0.1) == "prune"
    assert compress.choose(cands, "runtime", 0.05) == "tucker"  # prune is 0.08 dB worse: outside the tolerance


def test_flops_budget_in_challenge_convention(tiny):
    from effsr import metrics

    teacher = load_student(tiny["weights"])
    lr, _ = compress.calibration_patches(list(data.open_dataset(tiny["train"])), 8, 24, 0)
    calib = compress.make_calibration(lr, 255.0, 0)
    target_g = 0.7 * metrics.profile(teacher).flops / 1e9
    for method in ("prune", "tucker"):
        model, info = compress.oneshot(method, teacher, teacher, calib, None, target_g, min_channels=4)
        assert metrics.profile(model).flops <= target_g * 1e9, method
        assert info["budget_kind"] == "flops"


@pytest.mark.parametrize("allocation, importance", [("sensitivity", "l2"), ("uniform", "recon")])
def test_oneshot_is_deterministic_for_a_seed(tiny, allocation, importance):
    teacher = load_student(tiny["weights"])
    pairs = list(data.open_dataset(tiny["train"]))
    target = int(0.6 * tiny["params"])
    states = []
    for _ in range(2):
        lr, _ = compress.calibration_patches(pairs, 8, 24, 5)
        model, _ = compress.oneshot("prune", teacher, teacher, compress.make_calibration(lr, 255.0, 5), target, None,
                                    importance=importance, allocation=allocation)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_calibration_draws_on_images_smaller_than_the_training_patch(tiny, tmp_path):
    """A 40 px training patch leaves the three 32 px-high LR images out of training, but 32 px
    calibration crops (``--calib-patch 32``) still come from all five images, and the log says from how
    many; the default 48 px patch comes from the two images that large."""
    from effsr.shrink.compress import calibration_patch_size

    photos = {p.name: p.hr for p in data.default_images()}
    imgs = [(f"small{i}", np.ascontiguousarray(photos["astronaut"][i * 128:i * 128 + 128, 64:256])) for i in range(3)]
    imgs += [(f"large{i}", np.ascontiguousarray(photos["rocket"][i * 192:i * 192 + 192, 100:292])) for i in range(2)]
    folder = write_benchmark_folder(tmp_path / "mixed", imgs)
    sel = data.select_patch_pairs(list(data.open_dataset(folder)), 40)
    assert (len(sel.pairs), len(sel.considered_pairs)) == (2, 5)
    assert calibration_patch_size(sel.considered_pairs, 32) == 32
    assert calibration_patch_size(sel.considered_pairs) == 48 == ShrinkConfig.calib_patch
    assert calibration_patch_size(sel.considered_pairs, 64) == 48  # no image that large: the largest side
    assert calibration_patch_size([p for p in sel.considered_pairs if p.name.startswith("small")], 48) == 32
    out = tmp_path / "run"
    argv = _argv(tiny, out, "--target-params", str(int(0.8 * tiny["params"])), "--method", "tucker",
                 "--steps", "0")
    argv[argv.index("--patch-size") + 1] = "40"
    argv[argv.index("--train-data") + 1] = str(folder)
    assert cli.main(argv + ["--calib-patch", "32"]) == 0
    assert "calibration: 16 LR patches of 32 px from 5 training image(s)" in (out / "log.txt").read_text()
    assert json.loads((out / "report.json").read_text())["stages"]["compress"]["calib_patch"] == 32
    argv[argv.index("--out") + 1] = str(tmp_path / "run48")
    assert cli.main(argv) == 0
    log48 = (tmp_path / "run48" / "log.txt").read_text()
    assert "calibration: 16 LR patches of 48 px from 2 training image(s)" in log48


def test_calibration_patches_are_aligned_lr_hr_crops(tiny):
    pairs = list(data.open_dataset(tiny["train"]))
    lr, hr = compress.calibration_patches(pairs, 5, 16, 0)
    assert lr.shape == (5, 3, 16, 16) and hr.shape == (5, 3, 64, 64)
    for i in range(5):  # each LR crop is the MATLAB bicubic x1/4 of some training image at that place
        assert any(_contains(p.lr, lr[i]) for p in pairs)


def _contains(img: np.ndarray, crop: torch.Tensor) -> bool:
    c = crop.permute(1, 2, 0).numpy().astype(np.uint8)
    h, w = c.shape[:2]
    ys, xs = np.nonzero((img[: img.shape[0] - h + 1, : img.shape[1] - w + 1] == c[0, 0]).all(-1))
    return any(np.array_equal(img[y:y + h, x:x + w], c) for y, x in zip(ys, xs))


@pytest.mark.parametrize("extra, needle", [
    (("--target-params", "10000000", "--method", "prune"), "--target-params"),
    (("--target-params", "10", "--method", "prune"), "--target-params"),
    (("--target-params", "10", "--method", "auto"), "cannot be reached"),
    (("--target-params", "1000", "--calib-images", "0"), "--calib-images"),
    (("--target-params", "1000", "--calib-rows", "-3"), "--calib-rows"),
    (("--target-params", "1000", "--calib-patch", "8"), "--calib-patch"),
    (("--target-params", "1000", "--tucker-refine", "-1"), "--tucker-refine"),
    (("--target-params", "1000", "--refine-steps", "-1"), "--refine-steps"),
    (("--target-params", "1000", "--refine-lr", "0"), "--refine-lr"),
    (("--target-params", "1000", "--method", "magic"), "--method"),
    (("--target-params", "1000", "--importance", "magic"), "--importance"),
    (("--target-params", "1000", "--prune", "0.3"), "--prune"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tiny, tmp_path, capsys, extra, needle):
    out = tmp_path / "run"
    assert cli.main(_argv(tiny, out, "--steps", "0", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------- frontier
def _frontier_argv(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["frontier", "--model", "rfdn", "--weights", str(tiny["weights"]), "--calib-data", str(tiny["train"]),
            "--eval-data", str(tiny["eval"]), "--budgets", "0.8,0.5", "--calib-images", "8",
            "--tucker-min-channels", "4", "--no-peers", "--no-progress", "--out", str(out), *extra]


def test_frontier_writes_json_csv_png_one_row_per_point_and_resumes(tiny, capsys):
    out = tiny["root"] / "frontier"
    assert cli.main(_frontier_argv(tiny, out)) == 0
    doc = json.loads((out / "frontier.json").read_text())
    assert set(doc["points"]) == {"prune@0.8", "prune@0.5", "tucker@0.8", "tucker@0.5"}
    for p in doc["points"].values():
        assert p["params"] <= p["target_params"] == int(p["fraction"] * tiny["params"])
        assert isinstance(p["below_bicubic"], list)
        reloaded = load_student(p["student_file"])
        assert sum(q.numel() for q in reloaded.parameters()) == p["params"]
    rows = list(csv.DictReader((out / "frontier.csv").open()))
    assert sorted(r["label"].split(" BELOW")[0] for r in rows if r["kind"] == "student") == \
        ["prune 0.5", "prune 0.8", "tucker 0.5", "tucker 0.8"]
    assert {r["kind"] for r in rows} >= {"teacher", "bicubic"}
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resume: the points already there are kept, a new budget is added
    before = (out / "students" / "prune_0.8.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    argv = _frontier_argv(tiny, out, "--resume")
    argv[argv.index("--budgets") + 1] = "0.8,0.5,0.4"
    assert cli.main(argv) == 0
    doc = json.loads((out / "frontier.json").read_text())
    assert len(doc["points"]) == 6
    assert (out / "students" / "prune_0.8.safetensors").stat().st_mtime_ns == before


def test_frontier_flags_a_student_below_bicubic(tmp_path, tiny, capsys):
    torch.manual_seed(0)
    noise = models.build("rfdn", **TINY).eval()  # random weights: every student is far below bicubic
    weights = tmp_path / "random.safetensors"
    save_student(noise, new_recipe("rfdn", noise.config), weights)
    out = tmp_path / "fr"
    argv = _frontier_argv(tiny, out, "--method", "prune")
    argv[argv.index("--weights") + 1] = str(weights)
    argv[argv.index("--budgets") + 1] = "0.6"
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    doc = json.loads((out / "frontier.json").read_text())
    point = doc["points"]["prune@0.6"]
    assert point["below_bicubic"] == ["eval"] and "BELOW BICUBIC" in point["label"]
    assert "BELOW BICUBIC" in printed.out
    assert "below bicubic" in (out / "log.txt").read_text()
    assert "eval" in next(r for r in csv.DictReader((out / "frontier.csv").open()) if r["kind"] == "student")[
        "below_bicubic"]


@pytest.mark.parametrize("change, needle", [
    (("--budgets", "0.5,1.2"), "--budgets"),
    (("--method", "prune,magic"), "--method"),
    (("--calib-images", "0"), "--calib-images"),
    (("--calib-patch", "12"), "--calib-patch"),
    (("--calib-rows", "-1"), "--calib-rows"),
    (("--tucker-refine", "-2"), "--tucker-refine"),
])
def test_frontier_bad_input(tiny, tmp_path, capsys, change, needle):
    out = tmp_path / "fr"
    argv = _frontier_argv(tiny, out)
    if change[0] in argv:
        argv[argv.index(change[0]) + 1] = change[1]
    else:
        argv += list(change)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------- real data
def test_official_rfdn_training_free_prune_beats_plain_l2(checkpoints, shared_data):
    """Official RFDN to MegSR's size with 16 calibration patches: the reconstructed student is far above the
    plain L2 one at the same size (Set5, first 2 images)."""
    teacher = models.load("rfdn", checkpoints / "rfdn_aim2020.pth").eval()
    pairs = list(data.open_dataset(shared_data / "t91"))[:16]
    lr, _ = compress.calibration_patches(pairs, 16, 32, 0)
    calib = compress.make_calibration(lr, 255.0, 0)
    model, info = compress.oneshot("prune", teacher, teacher, calib, 289_888, None)
    assert info["achieved"] <= 289_888
    plain = compress._prune_at(teacher, info["ratio"])          # the same uniform ratio, no fill, no reconstruction
    set5 = list(data.open_dataset(shared_data / "set5"))[:2]
    ours = inference.evaluate(model, set5, progress=False)["psnr_y"]
    base = inference.evaluate(plain, set5, progress=False)["psnr_y"]
    assert sum(p.numel() for p in plain.parameters()) <= 289_888
    assert ours > base + 1.0
