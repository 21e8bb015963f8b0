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

from .config import IMPORTANCES, ShrinkConfig
from .options import SettingError, SettingTypeError, arg, either, inverted, like, setting

__all__ = ["FrontierConfig", "run_frontier", "FRONTIER_METHODS"]

FRONTIER_METHODS = ("prune", "tucker")
#: Where ``--out`` is added: by the command (``--help`` lists it before ``--resume``).
_COMMAND = "the command"


def budgets_arg(text: str) -> list[float]:
    """``--budgets``: comma-separated fractions."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--budgets: expected comma-separated numbers, got {text!r}") from None


def methods_arg(text: str) -> list[str]:
    """``--method``: comma-separated methods."""
    return [m.strip() for m in text.split(",") if m.strip()]


@dataclasses.dataclass
class FrontierConfig:
    """Settings of ``effsr frontier`` (validated by :meth:`validate`, before any work). Each field declares its
    option (:func:`effsr.shrink.options.setting`; those it shares with ``effsr shrink`` taken from
    :class:`~effsr.shrink.ShrinkConfig`), in the order ``effsr frontier --help`` lists them."""

    model: str = like(ShrinkConfig, "model")
    weights: str = like(ShrinkConfig, "weights")
    calib_data: str = setting(flag="--calib-data", required=True, metavar="DIR",
                              help="calibration images: HR/ [+ LR_bicubic/X4/], HR-only, or 'default' (scikit-image "
                                   "photos)")
    eval_data: list[str] = setting(flag="--eval-data", convert=list, required=True, action="append", metavar="DIR",
                                   help="evaluation set (repeat for several); the plot uses the first")
    out: str = setting(flag="--out", added_by=_COMMAND)
    budgets: list[float] = setting(flag="--budgets", default_factory=lambda: [0.9, 0.8, 0.67, 0.5, 0.33],
                                   convert=budgets_arg, cli_default="0.9,0.8,0.67,0.5,0.33", metavar="F,F,...",
                                   help="fractions of the teacher's params, each in (0, 1)")
    methods: list[str] = setting(flag="--method", default_factory=lambda: list(FRONTIER_METHODS), convert=methods_arg,
                                 cli_default="prune,tucker", metavar="M,M",
                                 help="one-shot methods: prune (+ least-squares reconstruction), tucker (data-aware)")
    importance: str = setting("recon", flag="--importance", metavar="l2|activation|recon", help="pruning importance")
    calib_images: int = like(ShrinkConfig, "calib_images")
    calib_patch: int = like(ShrinkConfig, "calib_patch")
    calib_rows: int | None = like(ShrinkConfig, "calib_rows")
    tucker_refine: int = like(ShrinkConfig, "tucker_refine")
    tucker_min_channels: int = setting(16, flag="--tucker-min-channels", type=int, metavar="N",
                                       help="Tucker skips convs with fewer channels")
    resume: bool = setting(False, flag="--resume", action="store_true",
                           help="keep the points already in DIR/frontier.json")
    peers: bool | None = like(ShrinkConfig, "peers")
    peers_dir: str | None = setting(None, flag="--peers-dir", metavar="DIR", help="folder of the official checkpoints")
    max_eval_images: int | None = setting(None, flag="--max-eval-images", type=int, metavar="N",
                                          help="at most N images per eval set")
    runtime_trials: int = setting(1, flag="--runtime-trials", type=int, metavar="N", help="timed passes per model")
    seed: int = setting(0, flag="--seed", type=int, metavar="N", help="seed of the calibration patches")
    device: str = setting("cpu", flag="--device", help="cpu, cuda, cuda:1, ... or auto")
    y_round: bool = setting(True, flag="--y-float", convert=inverted, action="store_true",
                            help="PSNR-Y on unrounded luma")
    progress: bool = like(ShrinkConfig, "progress")
    #: a user's network: see :class:`effsr.shrink.ShrinkConfig`
    model_config: dict[str, Any] = like(ShrinkConfig, "model_config")
    input_range: float | None = like(ShrinkConfig, "input_range")
    scale: int | None = like(ShrinkConfig, "scale")
    weights_key: str | None = like(ShrinkConfig, "weights_key")

    def shrink_config(self, out: str) -> ShrinkConfig:
        """The :class:`~effsr.shrink.ShrinkConfig` naming the same teacher, data and calibration."""
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
        """Check every setting; returns self. A bad one raises :class:`~effsr.shrink.options.SettingError` (a
        ``ValueError``) or ``SettingTypeError`` naming the argument; ``effsr frontier`` names the flag."""
        if not self.budgets:
            raise SettingError(f"{arg('budgets')}: give at least one fraction")
        for b in self.budgets:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not 0 < b < 1:
                raise SettingError(f"{arg('budgets')}: each fraction of the teacher's params must be in (0, 1), "
                                   f"got {b!r}")
        if not self.methods or any(m not in FRONTIER_METHODS for m in self.methods):
            raise SettingError(f"{arg('methods')}: {either('a list', 'a comma-separated list')} from "
                               f"{', '.join(FRONTIER_METHODS)}, got {','.join(map(str, self.methods))!r}")
        if self.importance not in IMPORTANCES:
            raise SettingError(f"{arg('importance')}: unknown importance {self.importance!r}; choose from "
                               f"{', '.join(IMPORTANCES)}")
        if isinstance(self.calib_images, bool) or not isinstance(self.calib_images, int) or self.calib_images < 1:
            raise SettingError(f"{arg('calib_images')} must be an int >= 1, got {self.calib_images!r}")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise SettingError(f"{arg('out')}: {self.out} exists and is not a directory")
        if (out / "frontier.json").is_file() and not self.resume:
            raise SettingError(f"{arg('out')}: {self.out} already holds a frontier; pass "
                               f"{either('resume=True', '--resume')} to continue it or choose another folder")
        # the rest (model, weights, data folders, device, out's parent) as effsr shrink checks them
        try:
            self.shrink_config(str(out / ".check")).validate()
        except (SettingError, SettingTypeError) as err:
            raise err.renamed({"train_data": "calib_data"}) from None
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
