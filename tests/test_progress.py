"""reparam.utils.progress: a bar on a terminal, occasional plain lines on anything else."""
from __future__ import annotations

import io

import pytest

from reparam.utils.progress import ENV, PlainProgress, progress, write


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def test_not_a_terminal_prints_a_plain_line_every_ten_percent():
    out = io.StringIO()
    bar = progress(total=100, desc="teacher training", unit="step", file=out, every_seconds=1e9)
    assert isinstance(bar, PlainProgress)
    for i in range(100):
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 11  # 0 %, 10 %, ..., 100 %
    assert lines[0].startswith("teacher training: 0/100 step (0%)")
    assert lines[-1].startswith("teacher training: 100/100 step (100%)") and lines[-1].endswith("loss=0.010")


def test_plain_lines_also_come_by_time(monkeypatch):
    clock = iter(range(0, 10_000, 40))  # 40 s per call of time.monotonic
    monkeypatch.setattr("reparam.utils.progress.time.monotonic", lambda: float(next(clock)))
    out = io.StringIO()
    bar = progress(total=10_000, desc="x", file=out, every_seconds=30)
    for _ in range(3):
        bar.update(1)  # 0.01 % each, far below every_percent: only the clock makes lines
    assert len(out.getvalue().splitlines()) == 4


def test_iteration_disable_and_unknown_total():
    out = io.StringIO()
    assert list(progress(range(5), desc="eval", file=out)) == list(range(5))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("eval: 0/5") and lines[-1].startswith("eval: 5/5")
    quiet = io.StringIO()
    assert list(progress(range(3), desc="q", file=quiet, disable=True)) == [0, 1, 2]
    assert quiet.getvalue() == ""
    out = io.StringIO()
    with progress(iter(range(3)), desc="gen", file=out) as bar:
        for _ in bar:
            pass
    assert out.getvalue().splitlines()[-1].startswith("gen: 3 it")


def test_terminal_gets_a_tqdm_bar_and_env_overrides(monkeypatch):
    from tqdm import tqdm

    tty = _Tty()
    bar = progress(total=4, desc="bar", file=tty)
    assert isinstance(bar, tqdm)
    bar.update(4)
    bar.close()
    assert "\r" in tty.getvalue() and "bar" in tty.getvalue()
    monkeypatch.setenv(ENV, "plain")
    assert isinstance(progress(total=2, file=_Tty()), PlainProgress)
    monkeypatch.setenv(ENV, "off")
    off = io.StringIO()
    progress(total=2, desc="z", file=off).update(2)
    write("hello", file=off)
    assert off.getvalue() == "hello\n"
