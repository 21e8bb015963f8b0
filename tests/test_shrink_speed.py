"""Runtime budgets of effsr shrink (--target-speedup / --target-runtime): the search, the run, bad input.

Timing is not asserted here (it depends on the machine): the search is driven by a deterministic stand-in for
``time_pair`` whose milliseconds are the networks' parameter counts, so which ratio meets a budget is known.
The real timings are measured in ``benchmarks/``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import effsr.shrink.commands  # noqa: F401 - registers `effsr shrink`
from effsr import cli, data, models
from effsr.shrink import save_student, speed
from effsr.shrink.compress import MAX_PRUNE_RATIO, _prune_at
from effsr.shrink.recipe import new_recipe
from conftest import write_benchmark_folder

TINY = {"nf": 8, "num_blocks": 2}
pytestmark = pytest.mark.usefixtures("one_thread")


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture
def by_params(monkeypatch):
    """``time_pair`` whose "milliseconds" are parameter counts (so a speed-up is a ratio of sizes)."""
    calls = []

    def fake(teacher, student, x, trials=5, warmup=1):
        calls.append(tuple(x.shape))
        t, s = float(_params(teacher)), float(_params(student))
        return t, s, t / s

    monkeypatch.setattr(speed, "time_pair", fake)
    return calls


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speed")
    photos = {p.name: p.hr for p in data.default_images()}
    train = [(f"{n}{i}", np.ascontiguousarray(photos[n][i * 128:i * 128 + 128, 64:256]))
             for n in ("astronaut", "rocket") for i in range(2)]
    evals = [("camera", np.ascontiguousarray(photos["camera"][100:196, 100:228]))]
    torch.manual_seed(0)
    teacher = models.build("rfdn", **TINY).eval()
    weights = root / "teacher.safetensors"
    save_student(teacher, new_recipe("rfdn", teacher.config), weights)
    return {"root": root, "weights": weights, "train": write_benchmark_folder(root / "train", train),
            "eval": write_benchmark_folder(root / "eval", evals), "teacher": teacher}


def _argv(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["shrink", "--model", "rfdn", "--weights", str(tiny["weights"]), "--train-data", str(tiny["train"]),
            "--eval-data", str(tiny["eval"]), "--calib-images", "8", "--tucker-min-channels", "4", "--steps", "0",
            "--patch-size", "24", "--device", "cpu", "--no-peers", "--runtime-trials", "1", "--no-progress",
            "--out", str(out), *extra]


def test_search_finds_the_least_pruning_that_meets_the_speedup(tiny, by_params):
    teacher = tiny["teacher"]
    found = speed.params_for_runtime(teacher, teacher, _prune_at, MAX_PRUNE_RATIO, target_speedup=1.5,
                                     size=(20, 24))
    n = _params(teacher)
    assert n / found["target_params"] >= 1.5 and found["predicted_speedup"] >= 1.5
    assert found["size"] == [20, 24] and set(by_params) == {(1, 3, 20, 24)}
    rows = found["search"]
    assert len(rows) == 1 + speed.SEARCH_STEPS and rows[0]["ratio"] == MAX_PRUNE_RATIO
    # bisection: the chosen ratio meets the budget and every ratio below it that was tried does not
    chosen = found["ratio"]
    assert all(not r["meets"] for r in rows if r["ratio"] < chosen) and all(r["meets"] for r in rows
                                                                            if r["ratio"] >= chosen)
    assert chosen - max(r["ratio"] for r in rows if r["ratio"] < chosen) <= MAX_PRUNE_RATIO / 2 ** speed.SEARCH_STEPS
    # a runtime in "ms" (here: params) is the same search on the absolute number
    found = speed.params_for_runtime(teacher, teacher, _prune_at, MAX_PRUNE_RATIO, target_runtime=n / 2, size=(20, 24))
    assert found["target_params"] <= n / 2 and found["predicted_ms"] <= n / 2


def test_unreachable_speedup_names_the_fastest_runtime(tiny, by_params):
    teacher = tiny["teacher"]
    fastest = _params(_prune_at(teacher, MAX_PRUNE_RATIO))
    with pytest.raises(ValueError, match=r"--target-speedup: cannot be reached .* at best") as err:
        speed.params_for_runtime(teacher, teacher, _prune_at, MAX_PRUNE_RATIO, target_speedup=1000.0)
    assert f"{_params(teacher) / fastest:.2f}x" in str(err.value)


def test_shrink_with_a_speedup_budget_prunes_to_the_searched_size(tiny, by_params):
    out = tiny["root"] / "speed2"
    assert cli.main(_argv(tiny, out, "--target-speedup", "2", "--runtime-size", "32", "40")) == 0
    rep = json.loads((out / "report.json").read_text())
    comp = rep["stages"]["compress"]
    rb = comp["runtime_budget"]
    assert comp["chosen"] == "prune" and set(comp["candidates"]) == {"prune"}  # auto: pruning only
    assert comp["achieved"] <= rb["target_params"] and rb["target_speedup"] == 2.0 and rb["size"] == [32, 40]
    assert rb["met"] and rb["speedup"] >= 2.0  # by the stand-in clock: parameters
    student = next(m for m in rep["models"] if m["kind"] == "student")
    assert student["params"] == comp["achieved"]
    log = (out / "log.txt").read_text()
    assert "runtime budget: pruning to" in log and "runtime budget: the student runs" in log


@pytest.mark.parametrize("extra, needle", [
    (("--target-speedup", "1"), "--target-speedup"),
    (("--target-speedup", "0.5"), "--target-speedup"),
    (("--target-speedup", "inf"), "--target-speedup"),
    (("--target-runtime", "0"), "--target-runtime"),
    (("--target-speedup", "2", "--target-params", "1000"), "give one budget"),
    (("--target-speedup", "2", "--target-runtime", "5"), "give one budget"),
    (("--target-speedup", "2", "--method", "tucker"), "--method prune or auto"),
    (("--target-speedup", "2", "--runtime-size", "8", "8"), "--runtime-size"),
    (("--target-speedup", "1000"), "cannot be reached"),
    (("--target-speedup", "2", "--device", "cuda:7"), "--device"),
])
def test_bad_runtime_budgets_are_one_line_exit_2_nothing_written(tiny, tmp_path, capsys, by_params, extra, needle):
    out = tmp_path / "run"
    assert cli.main(_argv(tiny, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


@pytest.mark.slow
def test_demo_with_a_speedup_budget(tmp_path, capsys, by_params):
    """``effsr demo --target-speedup X``: the demo's student is pruned to the runtime budget (auto: pruning only)
    instead of a parameter fraction."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--teacher-steps", "3", "--steps", "1", "--nf", "8",
                     "--target-speedup", "1.8", "--no-progress"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    comp = report["stages"]["compress"]
    assert comp["chosen"] == "prune" and comp["runtime_budget"]["target_speedup"] == 1.8
    teacher, student = report["models"][0]["params"], report["models"][1]["params"]
    assert teacher / student >= 1.8 and student <= comp["runtime_budget"]["target_params"]


def test_time_pair_takes_the_fastest_times_and_the_median_back_to_back_ratio(monkeypatch):
    """Timings under changing load: teacher/student pairs timed back to back share the load, so the speed-up is
    the median of the pairs' ratios (2.0 here) although the single times swing by 3x."""
    times = iter([10.0, 5.0, 30.0, 15.0, 20.0, 10.0, 12.0, 3.0, 40.0, 40.0])  # ratios 2, 2, 2, 4, 1
    monkeypatch.setattr(speed, "_ms", lambda model, x: next(times))
    net = torch.nn.Conv2d(3, 3, 1)
    t, s, ratio = speed.time_pair(net, net, torch.zeros(1, 3, 4, 4), trials=5, warmup=1)
    assert (t, s, ratio) == (10.0, 3.0, 2.0)
