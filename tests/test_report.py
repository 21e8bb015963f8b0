"""effsr.shrink.report: the summary table, report.md and frontier.png flag students below bicubic."""
from __future__ import annotations

import matplotlib
import pytest

from effsr.shrink.report import (BELOW_COLOR, below_bicubic, frontier_figure, markdown, plot_frontier,
                                 summary_table)

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
