"""``effsr compare``: several networks and their compressed students in one quality-vs-size plot.

Each input is a folder written by ``effsr frontier`` (``frontier.json``) or ``effsr shrink`` (``report.json``).
Every teacher is drawn with its students, joined by a line, beside the published peers, so a user sees whether
shrinking a bigger network beats picking a smaller published one. Writes ``compare.json``, ``compare.csv`` and
``compare.png`` (PSNR-Y on the common first eval set vs params and vs FLOPs).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

from reparam.utils.io import atomic_write, write_json, write_text

__all__ = ["read_run", "merge_runs", "write_compare"]


def read_run(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The document of an ``effsr frontier`` (``frontier.json``) or ``effsr shrink`` (``report.json``) folder;
    ``ValueError`` naming the folder when it holds neither."""
    folder = Path(folder)
    for name in ("frontier.json", "report.json"):
        path = folder / name
        if path.is_file():
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"runs: cannot read {path}: {err}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("models"), list) or not doc.get("eval_sets"):
                raise ValueError(f"runs: {path} is not a frontier or shrink result")
            return doc
    raise ValueError(f"runs: {folder} holds no frontier.json (effsr frontier) or report.json (effsr shrink)")


def _family(doc: dict[str, Any], folder: str) -> str:
    teacher = next((m for m in doc["models"] if m.get("kind") == "teacher"), None)
    return str((teacher or {}).get("arch") or Path(folder).name)


def merge_runs(folders: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """One document of every run's teacher and students (``family`` = the teacher's network) and the peers
    (each once), on the first eval set all runs share."""
    if not folders:
        raise ValueError("runs: give at least one folder")
    docs = [(str(f), read_run(f)) for f in folders]
    common = [s for s in docs[0][1]["eval_sets"] if all(s in d["eval_sets"] for _, d in docs)]
    if not common:
        raise ValueError("runs: the folders share no eval set (" + "; ".join(
            f"{f}: {', '.join(d['eval_sets'])}" for f, d in docs) + ")")
    first = common[0]
    rows: list[dict[str, Any]] = []
    peers: dict[str, dict[str, Any]] = {}
    families = []
    for folder, doc in docs:
        family = _family(doc, folder)
        if family in families:
            family = f"{family} ({Path(folder).name})"
        families.append(family)
        for m in doc["models"]:
            y = (m.get("eval") or {}).get(first, {}).get("psnr_y")
            if y is None:
                continue
            row = {"family": family, "label": m["label"], "kind": m["kind"], "params": m["params"],
                   "flops": m.get("flops"), "runtime_ms": m.get("runtime_ms"), "psnr_y": y, "run": folder}
            if m["kind"] == "peer":
                peers.setdefault(m["label"], {**row, "family": "published"})
            else:
                rows.append(row)
    bic = [(d.get("bicubic") or {}).get(first, {}).get("psnr_y") for _, d in docs]
    return {"eval_set": first, "families": families, "models": rows + list(peers.values()),
            "bicubic": next((b for b in bic if b is not None), None), "runs": [f for f, _ in docs]}


def _csv(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["family", "label", "kind", "params", "flops_g", "runtime_ms", f"{doc['eval_set']}_psnr_y", "run"])
    for m in doc["models"]:
        w.writerow([m["family"], m["label"], m["kind"], m["params"],
                    "" if m.get("flops") is None else f"{m['flops'] / 1e9:.4f}",
                    "" if m.get("runtime_ms") is None else f"{m['runtime_ms']:.2f}", f"{m['psnr_y']:.4f}", m["run"]])
    return buf.getvalue()


def _figure(doc: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, scale, xlabel in ((axes[0], "params", 1e3, "parameters [K]"),
                                   (axes[1], "flops", 1e9, "FLOPs (MACs, 3x256x256) [G]")):
        for i, family in enumerate(doc["families"]):
            pts = sorted((m for m in doc["models"] if m["family"] == family and m.get(key) is not None),
                         key=lambda m: m[key])
            color = colors[i % len(colors)]
            ax.plot([m[key] / scale for m in pts], [m["psnr_y"] for m in pts], "-", color=color, lw=1, alpha=0.6)
            for m in pts:
                teacher = m["kind"] == "teacher"
                ax.scatter([m[key] / scale], [m["psnr_y"]], color=color, marker="o" if teacher else "*",
                           s=60 if teacher else 90, edgecolors="k", linewidths=0.5, zorder=3,
                           label=f"{family}" if teacher else None)
        for m in (m for m in doc["models"] if m["family"] == "published" and m.get(key) is not None):
            ax.scatter([m[key] / scale], [m["psnr_y"]], color="tab:gray", marker="s", s=40, zorder=3)
            ax.annotate(m["label"], (m[key] / scale, m["psnr_y"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points", color="dimgray")
        if doc.get("bicubic") is not None:
            ax.axhline(doc["bicubic"], color="tab:green", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"PSNR-Y on {doc['eval_set']} [dB]")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, [f"{t} (circle) and its students (stars)" for t in labels], loc="lower center",
               ncol=min(3, max(1, len(labels))), fontsize=8, frameon=False)
    fig.suptitle("networks and their compressed students (grey squares: published peers; dashed: bicubic)")
    fig.tight_layout(rect=(0, 0.06 * (-(-len(labels) // 3)) + 0.02, 1, 1))
    return fig


def write_compare(doc: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """``compare.json``, ``compare.csv`` and ``compare.png`` in ``out`` (each written atomically)."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", doc)
    write_text(out / "compare.csv", _csv(doc))
    fig = _figure(doc)
    try:
        atomic_write(out / "compare.png", lambda fh: fig.savefig(fh, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return out
