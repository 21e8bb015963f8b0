"""``effsr frontier``: one-shot (training-free) students at several budgets, one plot and table.

For each budget fraction ``f`` (of the teacher's parameters) and each method (``prune``, ``tucker``) the
teacher is compressed in closed form to ``<= floor(f * params)`` parameters on calibration patches from
``--calib-data`` (:mod:`effsr.shrink.compress`), then profiled (params, FLOPs, activations, convs in the
challenge convention, CPU runtime) and evaluated on every ``--eval-data`` set. ``DIR/frontier.json`` holds
the points, the teacher, bicubic and the peers found in the shared data's checkpoints; ``frontier.csv`` the
same table; ``frontier.png`` PSNR-Y vs params and vs FLOPs (:func:`effsr.shrink.report.plot_frontier`).
A student below bicubic on an eval set has ``below_bicubic`` listing the sets, a ``BELOW BICUBIC`` label in
the plot and the table, and a warning in the log: never silent. Every point's student is saved in
``DIR/students/`` (reloadable with ``effsr eval --weights``). ``resume=True`` keeps the points already in
``frontier.json`` (same settings) and computes only the others.
"""
from __future__ import annotations

from effsr.inference import input_range as model_input_range

import csv
import dataclasses
import hashlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from reparam.utils.io import write_json, write_text

from .config import CALIB_PATCH, CALIB_ROWS, IMPORTANCES, TUCKER_REFINE

__all__ = ["FrontierConfig", "run_frontier", "FRONTIER_METHODS"]

FRONTIER_METHODS = ("prune", "tucker")


@dataclasses.dataclass
class FrontierConfig:
    """Settings of ``effsr frontier`` (validated by :meth:`validate`, before any work)."""

    model: str
    weights: str
    calib_data: str
    eval_data: list[str]
    out: str
    budgets: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.8, 0.67, 0.5, 0.33])
    methods: list[str] = dataclasses.field(default_factory=lambda: list(FRONTIER_METHODS))
    calib_images: int = 64
    calib_rows: int | None = CALIB_ROWS
    calib_patch: int = CALIB_PATCH
    tucker_refine: int = TUCKER_REFINE
    importance: str = "recon"
    tucker_min_channels: int = 16
    seed: int = 0
    device: str = "cpu"
    resume: bool = False
    peers: bool | None = None
    peers_dir: str | None = None
    runtime_trials: int = 1
    max_eval_images: int | None = None
    y_round: bool = True
    progress: bool = True
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: a user's network: see :class:`effsr.shrink.ShrinkConfig`
    input_range: float | None = None
    scale: int | None = None
    weights_key: str | None = None

    def shrink_config(self, out: str) -> "ShrinkConfig":  # noqa: F821 - imported lazily
        """The :class:`~effsr.shrink.ShrinkConfig` naming the same teacher, data and calibration."""
        from .config import ShrinkConfig

        return ShrinkConfig(model=self.model, weights=self.weights, train_data=self.calib_data,
                            eval_data=list(self.eval_data), out=out, device=self.device,
                            max_eval_images=self.max_eval_images, peers=self.peers, peers_dir=self.peers_dir,
                            runtime_trials=self.runtime_trials, model_config=self.model_config,
                            tucker_min_channels=self.tucker_min_channels, seed=self.seed,
                            calib_images=self.calib_images, calib_rows=self.calib_rows,
                            calib_patch=self.calib_patch, tucker_refine=self.tucker_refine,
                            importance=self.importance, input_range=self.input_range, scale=self.scale,
                            weights_key=self.weights_key)

    def validate(self) -> "FrontierConfig":
        if not self.budgets:
            raise ValueError("--budgets: give at least one fraction")
        for b in self.budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not 0 < b < 1:
                raise ValueError(f"--budgets: each fraction of the teacher's params must be in (0, 1), got {b!r}")
        if not self.methods or any(m not in FRONTIER_METHODS for m in self.methods):
            raise ValueError(f"--method: a comma-separated list from {', '.join(FRONTIER_METHODS)}, got "
                             f"{','.join(map(str, self.methods))!r}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"--importance: unknown importance {self.importance!r}; choose from "
                             f"{', '.join(IMPORTANCES)}")
        if isinstance(self.calib_images, bool) or not isinstance(self.calib_images, int) or self.calib_images < 1:
            raise ValueError(f"--calib-images must be an int >= 1, got {self.calib_images!r}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: {self.out} exists and is not a directory")
        if (out / "frontier.json").is_file() and not self.resume:
            raise ValueError(f"--out: {self.out} already holds a frontier; pass --resume to continue it or "
                             "choose another folder")
        # the rest (model, weights, data folders, device, out's parent) as effsr shrink checks them
        try:
            self.shrink_config(str(out / ".check")).validate()
        except ValueError as err:
            raise ValueError(str(err).replace("--train-data", "--calib-data")) from None
        return self

    def fingerprint(self) -> str:
        keep = ("model", "calib_data", "calib_images", "calib_rows", "calib_patch", "tucker_refine",
                "importance",
                "tucker_min_channels", "seed", "y_round", "model_config", "max_eval_images")
        d = {k: getattr(self, k) for k in keep}
        d.update({k: getattr(self, k) for k in ("input_range", "scale", "weights_key") if getattr(self, k) is not None})
        d["weights"] = str(Path(self.weights).resolve())
        d["eval_data"] = [str(Path(e).resolve()) if e != "default" else e for e in self.eval_data]
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _key(method: str, fraction: float) -> str:
    return f"{method}@{fraction:g}"


def _log(out: Path, msg: str) -> None:
    from .log import log

    log(msg, True, out / "log.txt")


def _row_flags(row: dict[str, Any], bicubic: dict[str, Any]) -> None:
    from .report import below_bicubic

    below = below_bicubic(row, bicubic)
    row["below_bicubic"] = below
    if below and "BELOW BICUBIC" not in row["label"]:
        row["label"] += " BELOW BICUBIC"


def _csv(doc: dict[str, Any]) -> str:
    sets = doc["eval_sets"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "kind", "method", "fraction", "target_params", "params", "flops_g", "activations_m",
                "convs", "runtime_ms", *[f"{s}_psnr_y" for s in sets], "oneshot_seconds", "below_bicubic"])
    for m in doc["models"]:
        w.writerow([m["label"], m["kind"], m.get("method", ""), m.get("fraction", ""), m.get("target_params", ""),
                    m["params"], f"{m['flops'] / 1e9:.4f}", f"{m['activations'] / 1e6:.3f}", m["convs"],
                    "" if m.get("runtime_ms") is None else f"{m['runtime_ms']:.2f}",
                    *[f"{m['eval'].get(s, {}).get('psnr_y', float('nan')):.4f}" for s in sets],
                    m.get("seconds", ""), ";".join(m.get("below_bicubic", []))])
    for s, v in [("bicubic", doc.get("bicubic") or {})]:
        w.writerow([s, "bicubic", "", "", "", 0, "", "", 0, "", *[f"{v.get(x, {}).get('psnr_y', float('nan')):.4f}"
                                                                 for x in sets], "", ""])
    return buf.getvalue()


def _write(out: Path, doc: dict[str, Any]) -> None:
    from .report import plot_frontier

    doc["models"] = [doc["teacher"], *doc.get("peers", []),
                     *sorted(doc["points"].values(), key=lambda r: (r["method"], -r["fraction"]))]
    write_json(out / "frontier.json", doc)
    write_text(out / "frontier.csv", _csv(doc))
    if doc["points"]:
        plot_frontier(doc, out / "frontier.png")


def run_frontier(cfg: FrontierConfig) -> dict[str, Any]:
    """Compute (or, with ``cfg.resume``, complete) the frontier in ``cfg.out``; returns the document."""
    from . import compress
    from .inputs import open_eval_sets, open_train_pairs
    from .recipe import add_op, recipe_for, save_student
    from .report import PUBLISHED, bicubic, measure
    from .runner import load_teacher

    cfg.validate()
    out = Path(cfg.out)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    shrink_cfg = cfg.shrink_config(str(out))
    teacher = load_teacher(shrink_cfg).to(device).eval()
    n_teacher = sum(p.numel() for p in teacher.parameters())
    targets = {_key(m, f): int(math.floor(f * n_teacher)) for m in cfg.methods for f in cfg.budgets}
    for m in cfg.methods:  # every point checked before anything is written
        for f in cfg.budgets:
            compress.check_budget(teacher, m, targets[_key(m, f)], None, cfg.tucker_min_channels)
    try:
        sel = open_train_pairs(cfg.calib_data, None)
    except ValueError as err:
        raise ValueError(str(err).replace("--train-data", "--calib-data")) from None
    patch = compress.calibration_patch_size(list(sel.pairs), cfg.calib_patch)
    eval_sets = open_eval_sets(cfg.eval_data, cfg.max_eval_images)
    out.mkdir(parents=True, exist_ok=True)
    fp = cfg.fingerprint()
    doc: dict[str, Any] | None = None
    if cfg.resume and (out / "frontier.json").is_file():
        doc = json.loads((out / "frontier.json").read_text(encoding="utf-8"))
        if doc.get("fingerprint") != fp:
            raise ValueError(f"--resume: {out / 'frontier.json'} was made with other settings; use a new --out")
        _log(out, f"frontier: resuming, {len(doc['points'])} point(s) done")
    rng = model_input_range(teacher)
    lr, _ = compress.calibration_patches(list(sel.pairs), cfg.calib_images, patch, cfg.seed)
    calib = compress.make_calibration(lr, rng, cfg.seed, rows=cfg.calib_rows)
    if doc is None:
        bic = bicubic(eval_sets, y_round=cfg.y_round)
        trow = measure("teacher", "teacher", teacher, eval_sets, device, cfg.runtime_trials, y_round=cfg.y_round)
        trow.pop("per_image", None)
        peers = _peers(shrink_cfg, eval_sets, device, cfg, out)
        for row in [trow, *peers]:
            for name, pub in PUBLISHED.items():
                if row["arch"] == name or row["label"] == name:
                    row["published"] = pub
        doc = {"fingerprint": fp, "config": dataclasses.asdict(cfg), "eval_sets": list(eval_sets),
               "bicubic": bic, "y_round": cfg.y_round, "teacher": trow, "peers": peers, "points": {},
               "calibration": {"patches": cfg.calib_images, "patch": patch, "data": cfg.calib_data,
                               "rows": cfg.calib_rows, "tucker_refine": cfg.tucker_refine}}
        _write(out, doc)
    todo = [(m, f) for m in cfg.methods for f in cfg.budgets if _key(m, f) not in doc["points"]]
    base_recipe = recipe_for(teacher)
    for i, (m, f) in enumerate(todo, 1):
        k = _key(m, f)
        _log(out, f"frontier [{i}/{len(todo)}] {m} to {f:g} of the teacher (<= {targets[k]:,} params) ...")
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        model, info = compress.oneshot(m, teacher, teacher, calib, targets[k], None, importance=cfg.importance,
                                       min_channels=cfg.tucker_min_channels, progress=cfg.progress,
                                       refine=cfg.tucker_refine)
        seconds = time.perf_counter() - t0
        row = measure(f"{m} {f:g}", "student", model, eval_sets, device, cfg.runtime_trials, y_round=cfg.y_round)
        row.pop("per_image", None)
        row.update({"method": m, "fraction": f, "target_params": targets[k], "seconds": round(seconds, 2)})
        _row_flags(row, doc["bicubic"])
        if m == "prune":
            recipe = add_op(base_recipe, {"op": "prune", "history": info["history"],
                                          "input_shape": list(compress.PRUNE_EXAMPLE_SHAPE)})
        else:
            recipe = add_op(base_recipe, {"op": "tucker", "ranks": info["ranks"], "data_aware": True})
        path = out / "students" / f"{m}_{f:g}.safetensors"
        save_student(model.cpu(), recipe, path)
        row["student_file"] = str(path)
        doc["points"][k] = row
        _write(out, doc)
        first = doc["eval_sets"][0]
        msg = (f"  {row['params']:,} params, {row['flops'] / 1e9:.2f} G FLOPs, {row['convs']} convs: {first} PSNR-Y "
               f"{row['eval'][first]['psnr_y']:.3f} dB in {seconds:.1f} s")
        if row["below_bicubic"]:
            msg += f"  WARNING: below bicubic on {', '.join(row['below_bicubic'])}"
        _log(out, msg)
    _write(out, doc)
    _log(out, f"wrote {out / 'frontier.json'}, frontier.csv, frontier.png")
    return doc


def _peers(shrink_cfg: Any, eval_sets: dict[str, Sequence[Any]], device: torch.device, cfg: FrontierConfig,
           out: Path) -> list[dict[str, Any]]:
    from effsr import models

    from .config import PEER_CHECKPOINTS
    from .report import measure

    d = shrink_cfg.use_peers()
    rows = []
    if d is None:
        return rows
    mine = Path(cfg.weights).resolve()
    for fname, name in PEER_CHECKPOINTS.items():
        path = d / fname
        if not path.is_file() or path.resolve() == mine:
            continue
        try:
            peer = models.load(name, path)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            _log(out, f"peer {fname} skipped: {err}")
            continue
        row = measure(name, "peer", peer, eval_sets, device, cfg.runtime_trials, y_round=cfg.y_round)
        row.pop("per_image", None)
        rows.append(row)
    return rows
