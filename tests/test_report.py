"""effsr.shrink.report: the summary table, report.md and frontier.png flag students below bicubic; the report
stage times every model on the same few images, reuses the stages' evaluations and caches the peers'."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

import effsr.shrink.commands  # noqa: F401 - registers `effsr shrink`
from conftest import write_benchmark_folder
from effsr import cli, data, inference, models
from effsr.shrink import save_student
from effsr.shrink.recipe import new_recipe
from effsr.shrink.report import (BELOW_COLOR, RUNTIME_IMAGES, below_bicubic, frontier_figure, markdown,
                                 plot_frontier, summary_table)
from effsr.shrink.runner import STOP_ENV

matplotlib.use("Agg", force=True)


def _row(label, kind, params, flops, y):
    return {"label": label, "kind": kind, "arch": "rfdn", "params": params, "flops": flops, "activations": 1e6,
            "convs": 10, "runtime_ms": 1.0, "runtime_device": "cpu", "eval": {"set5": {"psnr_y": y, "psnr_rgb": y - 1}}}


def _data():
    # close points (the labels of all of them would collide next to the markers)
    return {"eval_sets": ["set5"], "bicubic": {"set5": {"psnr_y": 28.42, "psnr_rgb": 26.7}},
            "models": [_row("teacher rfdn", "teacher", 433_448, 27.1e9, 32.14),
                       _row("rlfn", "peer", 317_218, 19.7e9, 32.10),
                       _row("rfdn_pruned", "peer", 289_888, 18.0e9, 32.09),
                       _row("student", "student", 300_000, 18.5e9, 27.90)],
            "config": {"model": "rfdn", "runtime_trials": 1}, "stages": {}}


def test_below_bicubic_lists_the_sets():
    d = _data()
    assert below_bicubic(d["models"][3], d["bicubic"]) == ["set5"]
    assert below_bicubic(d["models"][0], d["bicubic"]) == []
    assert below_bicubic(d["models"][0], None) == []


def test_table_and_markdown_flag_a_student_worse_than_bicubic():
    d = _data()
    table = summary_table(d, markdown_table=False)
    student_line = next(ln for ln in table.splitlines() if ln.startswith("student"))
    assert "below bicubic" in student_line
    assert all("below bicubic" not in ln for ln in table.splitlines() if ln.startswith(("teacher", "rlfn")))
    md = markdown(d)
    assert "**Warning: student is worse than bicubic upscaling** (set5 27.900 dB vs bicubic 28.420 dB)" in md


def test_frontier_legend_not_labels_bicubic_in_range_and_red(tmp_path):
    d = _data()
    fig = frontier_figure(d)
    try:
        for ax in fig.axes:
            assert len(ax.texts) == 0  # no labels next to points that could overlap
            lo, hi = ax.get_ylim()
            assert lo < 28.42 < hi and lo < 27.90 and hi > 32.14
        legend = fig.legends[0]
        names = [t.get_text() for t in legend.get_texts()]
        assert names[:3] == ["teacher rfdn", "rlfn", "rfdn_pruned"]
        assert names[3] == "student (below bicubic)" and names[4].startswith("bicubic 28.42")
        assert legend.get_texts()[3].get_color() == BELOW_COLOR
        student = fig.axes[0].collections[3]
        assert tuple(student.get_facecolor()[0][:3]) == pytest.approx(matplotlib.colors.to_rgb(BELOW_COLOR))
        assert tuple(fig.axes[0].collections[0].get_facecolor()[0][:3]) != pytest.approx(
            matplotlib.colors.to_rgb(BELOW_COLOR))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    out = plot_frontier(d, tmp_path / "frontier.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frontier_without_bicubic_and_prelabelled_rows():
    d = _data()
    d["bicubic"] = {}
    d["models"][3]["label"] = "student BELOW BICUBIC"
    d["models"][3]["below_bicubic"] = ["set5"]
    fig = frontier_figure(d)
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert names[-1] == "student BELOW BICUBIC"  # flagged once, not twice
    import matplotlib.pyplot as plt

    plt.close(fig)


# ------------------------------------------------------------------------- the report stage of a real run
_EVAL_KEYS = ("psnr_rgb", "psnr_y", "ssim_y", "images")


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """A tiny random-weight RFDN teacher, train / eval folders cut from scikit-image's photos (the eval set has
    more images than the report times), a second eval folder with the same set and image names but other
    pixels, a peers folder holding one full-size RFDN checkpoint, and a private effsr cache folder."""
    root = tmp_path_factory.mktemp("report")
    photos = {p.name: p.hr for p in data.default_images()}
    train = [(f"{n}{i}", np.ascontiguousarray(photos[n][i * 96:i * 96 + 96, 64:192])) for n in ("astronaut", "rocket")
             for i in range(2)]
    sizes = [(96, 128), (80, 112), (64, 96), (88, 100)]
    names = ["a_camera", "b_coffee", "c_astronaut", "d_chelsea"]
    sources = ["camera", "coffee", "astronaut", "chelsea"]
    evals = [(n, np.ascontiguousarray(photos[s][100:100 + h, 100:100 + w]))
             for n, s, (h, w) in zip(names, sources, sizes)]
    other = [(n, np.ascontiguousarray(photos[s][20:20 + h, 30:30 + w])) for n, s, (h, w) in zip(names, sources, sizes)]
    torch.manual_seed(0)
    teacher = models.build("rfdn", nf=8, num_blocks=2).eval()
    weights = root / "teacher.safetensors"
    save_student(teacher, new_recipe("rfdn", teacher.config), weights)
    peers = root / "checkpoints"
    peers.mkdir()
    torch.manual_seed(1)
    torch.save(models.build("rfdn").state_dict(), peers / "rfdn_aim2020.pth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFSR_CACHE", str(root / "cache"))
        yield {"root": root, "weights": weights, "train": write_benchmark_folder(root / "train", train),
               "eval": write_benchmark_folder(root / "one" / "eval", evals),
               "other": write_benchmark_folder(root / "two" / "eval", other), "peers": peers,
               "params": sum(p.numel() for p in teacher.parameters()), "cache": root / "cache"}


def _shrink(rig, out: Path, *extra: str, eval_data: str = "eval") -> int:
    return cli.main(["shrink", "--model", "rfdn", "--weights", str(rig["weights"]), "--train-data", str(rig["train"]),
                     "--eval-data", str(rig[eval_data]), "--target-params", str(int(0.7 * rig["params"])),
                     "--method", "tucker", "--calib-images", "8", "--tucker-min-channels", "4", "--batch-size", "2",
                     "--patch-size", "16", "--device", "cpu", "--seed", "1", "--runtime-trials", "2",
                     "--no-progress", "--out", str(out), *extra])


def _json(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _model(rep: dict, kind: str) -> dict:
    return next(m for m in rep["models"] if m["kind"] == kind)


def _fresh(model, folder: Path, per_image: bool = False) -> dict:
    r = inference.evaluate(model, data.open_dataset(folder), progress=False, device="cpu")
    return {k: r[k] for k in (*_EVAL_KEYS, "per_image") if per_image or k != "per_image"}


def _peer_entries(rig) -> list[Path]:
    return sorted((rig["cache"] / "report").glob("peer-*.json"))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_report_times_fixed_images_reuses_the_student_eval_and_caches_peers(rig):
    first = rig["root"] / "run1"
    assert _shrink(rig, first, "--steps", "0", "--peers-dir", str(rig["peers"])) == 0
    rep = _json(first)
    # runtime: the first RUNTIME_IMAGES LR images of the eval set, the same ones for every model
    lrs = [p.lr.shape[:2] for p in data.open_dataset(rig["eval"])]
    assert len(lrs) > RUNTIME_IMAGES == 3
    assert rep["runtime_images"] == [
        {"set": "eval", "name": n, "lr": list(lrs[i]), "hr": [4 * lrs[i][0], 4 * lrs[i][1]]}
        for i, n in enumerate(["a_camera", "b_coffee", "c_astronaut"])]
    assert [m["runtime_images"] for m in rep["models"]] == [RUNTIME_IMAGES] * 3
    assert "the same 3 LR image(s) of eval for every model: `a_camera`" in (first / "report.md").read_text()
    # --steps 0: the compress stage evaluated the final student; its numbers are the report's
    assert rep["stages"]["distill"] is None
    assert rep["student_eval_from"] == "compress" and rep["teacher_eval_from"] == "teacher"
    student = _model(rep, "student")
    assert student["eval"] == {s: {k: e[k] for k in _EVAL_KEYS} for s, e in rep["stages"]["compress"]["eval"].items()}
    assert student["per_image"] == {s: e["per_image"] for s, e in rep["stages"]["compress"]["eval"].items()}
    assert student["eval"]["eval"] == _fresh(models.load("rfdn", first / "student.safetensors"), rig["eval"])
    # the peer was evaluated and its evaluation cached (outside the data folders)
    peer = models.load("rfdn", rig["peers"] / "rfdn_aim2020.pth")
    fresh_peer = _fresh(peer, rig["eval"])
    assert rep["peers_cached"] == [] and _model(rep, "peer")["eval_cached"] == []
    assert _model(rep, "peer")["eval"]["eval"] == fresh_peer
    entries = _peer_entries(rig)
    assert len(entries) == 1 and rep["cache_dir"] == str(rig["cache"] / "report")
    assert json.loads(entries[0].read_text())["value"] == _fresh(peer, rig["eval"], per_image=True)
    # a second run reads it: the same numbers, exactly; the peer is still timed on the same images
    second = rig["root"] / "run2"
    assert _shrink(rig, second, "--steps", "0", "--peers-dir", str(rig["peers"])) == 0
    rep2 = _json(second)
    assert rep2["peers_cached"] == ["rfdn"] and _model(rep2, "peer")["eval_cached"] == ["eval"]
    assert _model(rep2, "peer")["eval"]["eval"] == fresh_peer
    assert _model(rep2, "peer")["per_image"] == _model(rep, "peer")["per_image"]
    assert _model(rep2, "peer")["runtime_images"] == RUNTIME_IMAGES and _model(rep2, "peer")["runtime_ms"] > 0
    assert rep2["bicubic"] == rep["bicubic"]
    assert "read from the cache" in (second / "report.md").read_text()
    # a corrupt entry is ignored, measured again and rewritten
    entries[0].write_text('{"key": {"kind": "peer"}, "val')
    third = rig["root"] / "run3"
    assert _shrink(rig, third, "--steps", "0", "--peers-dir", str(rig["peers"])) == 0
    rep3 = _json(third)
    assert rep3["peers_cached"] == [] and _model(rep3, "peer")["eval"]["eval"] == fresh_peer
    assert json.loads(entries[0].read_text())["value"] == _fresh(peer, rig["eval"], per_image=True)
    assert "unreadable" in (third / "log.txt").read_text()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_report_reuses_the_distill_eval_only_when_it_reproduces(rig, monkeypatch):
    # a run stopped after distillation, resumed on the same eval set: the distill stage's evaluation is reused
    same = rig["root"] / "stopped_same"
    monkeypatch.setenv(STOP_ENV, "distill")
    assert _shrink(rig, same, "--steps", "1", "--no-peers") == 130
    monkeypatch.delenv(STOP_ENV)
    other = rig["root"] / "stopped_other"
    shutil.copytree(same, other)
    assert _shrink(rig, same, "--steps", "1", "--no-peers", "--resume") == 0
    rep = _json(same)
    assert rep["student_eval_from"] == "distill" and rep["teacher_eval_from"] == "teacher"
    assert _model(rep, "student")["eval"] == {s: {k: e[k] for k in _EVAL_KEYS}
                                            for s, e in rep["stages"]["distill"]["eval"].items()}
    # resumed on other pixels under the same set and image names: both are evaluated again
    assert _shrink(rig, other, "--steps", "1", "--no-peers", "--resume", eval_data="other") == 0
    rep2 = _json(other)
    assert rep2["student_eval_from"] is None and rep2["teacher_eval_from"] is None
    student = models.load("rfdn", other / "student.safetensors")
    assert _model(rep2, "student")["eval"]["eval"] == _fresh(student, rig["other"])
    assert _model(rep2, "student")["eval"]["eval"] != rep2["stages"]["distill"]["eval"]["eval"]
    assert _model(rep2, "teacher")["eval"]["eval"] == _fresh(models.load("rfdn", rig["weights"]), rig["other"])
    assert "does not reproduce" in (other / "log.txt").read_text()
