"""Measuring teacher, student and peers, and writing ``report.json``, ``report.md`` and ``frontier.png``.

The report of a shrink run costs seconds: runtime is timed on the same few LR images for every model
(:data:`RUNTIME_IMAGES`), evaluations the stages already made of the teacher and of the final student are
reused, and the evaluations of the peer checkpoints (and of bicubic upscaling) are cached as JSON under
``effsr.data.cache_root()/report/`` -- keyed by what decides the numbers, so an entry is only read back
for the same checkpoint bytes, the same images, ``y_round``, device type, effsr / torch versions and
measuring code. Peer runtimes are measured on every run (they depend on the machine's load).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from reparam.utils.io import atomic_write, write_json, write_text

from .config import PEER_CHECKPOINTS

__all__ = ["PUBLISHED", "RUNTIME_IMAGES", "CACHE_FORMAT", "measure", "measure_all", "write_outputs", "markdown",
           "summary_table", "plot_frontier", "frontier_figure", "below_bicubic", "runtime_pairs",
           "runtime_images_info", "evals_match", "evals_reproduce", "eval_set_digest", "report_cache_dir",
           "ResultCache", "peer_evals", "cached_bicubic"]

#: Published numbers (Y-PSNR on Set5 x4, dB) of the peers, from their papers / the NTIRE 2022 ESR report.
PUBLISHED: dict[str, dict[str, Any]] = {
    "rfdn_pruned": {"params": 289_888, "psnr_y": {"set5": 32.12}, "source": "MegSR pruned RFDN, NTIRE 2022 ESR"},
    "imdn": {"params": 893_936, "psnr_y": {"set5": 32.21}, "source": "IMDN (AIM 2019)"},
}

#: A shrink report times every model (teacher, student, peers) on the first this-many LR images of the first
#: eval set (fewer when the set is smaller); ``report.json`` names them under ``runtime_images``.
RUNTIME_IMAGES = 3

#: Version of the layout of the report's cache entries (part of every key).
CACHE_FORMAT = 1

_EVAL_KEYS = ("psnr_rgb", "psnr_y", "ssim_y", "images")


def runtime_pairs(eval_sets: Mapping[str, Sequence[Any]], count: int = RUNTIME_IMAGES) -> list[Any]:
    """The pairs whose LR images a shrink report times every model on: the first ``count`` of the first set."""
    first = next(iter(eval_sets.values()))
    return list(first[:count])


def runtime_images_info(eval_sets: Mapping[str, Sequence[Any]], pairs: Sequence[Any]) -> list[dict[str, Any]]:
    """``report.json``'s ``runtime_images``: set, name and LR / HR size (``[height, width]``) of each timed image."""
    first = next(iter(eval_sets))
    return [{"set": first, "name": str(p.name), "lr": [int(p.lr.shape[0]), int(p.lr.shape[1])],
             "hr": [int(p.hr.shape[0]), int(p.hr.shape[1])]} for p in pairs]


def measure(label: str, kind: str, model: nn.Module, eval_sets: Mapping[str, list[Any]], device: Any,
            runtime_trials: int, evals: Mapping[str, Any] | None = None, progress: bool = False,
            y_round: bool = True, timed: Sequence[Any] | None = None) -> dict[str, Any]:
    """Challenge profile (3x256x256), runtime, and PSNR/SSIM per set (Y rounded to integers unless
    ``y_round=False``).

    Runtime is the best of ``runtime_trials`` passes over the LR images of ``timed`` (pairs; default: every
    pair of the first eval set). ``evals``: an evaluation already made (per set), used instead of evaluating.
    """
    from effsr import inference, metrics

    prof = metrics.profile(model).as_dict()
    if timed is None:
        timed = next(iter(eval_sets.values()))
    rt = metrics.runtime(model, [p.lr for p in timed], device=device, trials=runtime_trials, warmup=1)
    if evals is None:
        evals = {}
        for name, pairs in eval_sets.items():
            r = inference.evaluate(model, pairs, progress=progress, device=device, y_round=y_round)
            evals[name] = {**{k: r[k] for k in _EVAL_KEYS}, "per_image": r["per_image"]}
    return {"label": label, "kind": kind, "arch": getattr(model, "arch", None), **prof,
            "runtime_ms": rt["ms_per_image"], "runtime_device": rt["device"], "runtime_threads": rt.get("threads"),
            "runtime_images": rt["images"],
            "eval": {k: {kk: vv for kk, vv in v.items() if kk != "per_image"} for k, v in evals.items()},
            "per_image": {k: v.get("per_image") for k, v in evals.items() if v.get("per_image") is not None}}


def evals_match(evals: Mapping[str, Any] | None, eval_sets: Mapping[str, Sequence[Any]]) -> bool:
    """Whether ``evals`` (an evaluation per set with its per-image results, as the shrink stages record it)
    covers exactly ``eval_sets``: the same set names in order, and in each the same image names in order."""
    if not evals or list(evals) != list(eval_sets):
        return False
    for name, pairs in eval_sets.items():
        e = evals[name]
        if not isinstance(e, Mapping) or any(k not in e for k in _EVAL_KEYS) or e["images"] != len(pairs):
            return False
        per = e.get("per_image")
        if not isinstance(per, list) or [str(x.get("name")) if isinstance(x, Mapping) else None for x in per] != [
                str(p.name) for p in pairs]:
            return False
    return True


def evals_reproduce(model: nn.Module, evals: Mapping[str, Any], eval_sets: Mapping[str, Sequence[Any]],
                    device: Any, y_round: bool = True) -> bool:
    """Whether ``evals`` is an evaluation of ``model`` on ``eval_sets``: it covers them (:func:`evals_match`)
    and evaluating ``model`` again on the smallest image of each set gives exactly the recorded per-image
    PSNR-RGB, PSNR-Y and SSIM-Y (other image content, weights or device show up there)."""
    from effsr import inference

    if not evals_match(evals, eval_sets):
        return False
    for name, pairs in eval_sets.items():
        i = min(range(len(pairs)), key=lambda j: pairs[j].lr.shape[0] * pairs[j].lr.shape[1])
        again = inference.evaluate(model, [pairs[i]], progress=False, device=device, y_round=y_round)["per_image"][0]
        recorded = evals[name]["per_image"][i]
        if any(again[k] != recorded.get(k) for k in ("psnr_rgb", "psnr_y", "ssim_y")):
            return False
    return True


# ---------------------------------------------------------------------------------------------- cache
def report_cache_dir() -> Path:
    """Where shrink reports cache peer and bicubic evaluations: ``effsr.data.cache_root()/report``."""
    from effsr.data import cache_root

    return cache_root() / "report"


def eval_set_digest(pairs: Sequence[Any]) -> str:
    """SHA-256 of an eval set's content: every pair's name, gray flag, LR and HR arrays (shape, dtype, bytes)."""
    import numpy as np

    h = hashlib.sha256()
    for p in pairs:
        lr, hr = np.ascontiguousarray(p.lr), np.ascontiguousarray(p.hr)
        h.update(json.dumps([str(p.name), bool(getattr(p, "gray", False)), list(lr.shape), str(lr.dtype),
                             list(hr.shape), str(hr.dtype)]).encode())
        h.update(lr.tobytes())
        h.update(hr.tobytes())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _code_digest(module_names: set[str]) -> str:
    """SHA-256 of the source files of ``module_names`` (torch's own modules are covered by its version)."""
    files = set()
    for name in module_names:
        if name.split(".")[0] in ("torch", "builtins"):
            continue
        mod = sys.modules.get(name)
        try:
            src = inspect.getsourcefile(mod) if mod is not None else None
        except TypeError:  # a built-in module
            src = None
        files.add(Path(src).resolve() if src else name)
    h = hashlib.sha256()
    for f in sorted(files, key=str):
        h.update(str(f).encode() + b"\0")
        if isinstance(f, Path) and f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import importlib.metadata

    import torch

    try:
        effsr_version = importlib.metadata.version("effsr")
    except importlib.metadata.PackageNotFoundError:
        effsr_version = "unknown"
    return {"effsr": effsr_version, "torch": torch.__version__}


class ResultCache:
    """JSON entries under ``folder``, one file per key (a JSON-able dict) named by its hash.

    An entry is read back only when the key stored in it equals the key asked for; an unreadable or
    malformed entry counts as missing (and is overwritten by :meth:`put`). A folder that cannot be written
    only costs one warning through ``log``.
    """

    def __init__(self, folder: str | os.PathLike[str], log: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.log = log or (lambda msg: None)
        self._warned = False

    def path(self, key: Mapping[str, Any]) -> Path:
        text = json.dumps(key, sort_keys=True, default=str)
        return self.folder / f"{key.get('kind', 'entry')}-{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"

    def get(self, key: Mapping[str, Any], valid: Callable[[Any], bool]) -> Any | None:
        """The value stored for ``key`` if there is a readable entry for exactly that key and ``valid(value)``."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            self.log(f"cache entry {path} unreadable ({type(err).__name__}): measuring again")
            return None
        expected = json.loads(json.dumps(key, sort_keys=True, default=str))
        if not isinstance(entry, dict) or entry.get("key") != expected or not valid(entry.get("value")):
            self.log(f"cache entry {path} malformed: measuring again")
            return None
        return entry["value"]

    def put(self, key: Mapping[str, Any], value: Any) -> Path | None:
        """Store ``value`` for ``key`` (atomically); None when the folder cannot be written."""
        path = self.path(key)
        try:
            return write_json(path, {"key": json.loads(json.dumps(key, sort_keys=True, default=str)),
                                     "value": value})
        except OSError as err:
            if not self._warned:
                self.log(f"WARNING: cannot write the report cache {self.folder}: {err}")
                self._warned = True
            return None


def _valid_eval(value: Any) -> bool:
    return (isinstance(value, dict) and all(isinstance(value.get(k), (int, float)) for k in _EVAL_KEYS)
            and not isinstance(value.get("images"), bool))


def _valid_bicubic(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(k), (int, float)) for k in ("psnr_y", "psnr_rgb"))


def peer_evals(name: str, path: Path, model: nn.Module, eval_sets: Mapping[str, Sequence[Any]],
               digests: Mapping[str, str], device: Any, y_round: bool, cache: ResultCache,
               progress: bool = False) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """PSNR/SSIM of peer ``name`` (checkpoint ``path``, loaded as ``model``) on each eval set, read from
    ``cache`` where an entry for exactly this checkpoint, set content, ``y_round``, device type, versions and
    code exists, else evaluated and stored. Returns the evaluations and the names of the sets read from cache.
    """
    import torch

    from effsr import inference

    base = {"kind": "peer", "format": CACHE_FORMAT, "model": name, "checkpoint_sha256": _file_digest(path),
            "checkpoint_size": path.stat().st_size, "y_round": bool(y_round), "device": torch.device(device).type,
            **_versions(),
            "code": _code_digest({"effsr.inference", "effsr.quality", *(type(m).__module__ for m in model.modules())})}
    evals, cached = {}, []
    for set_name, pairs in eval_sets.items():
        key = {**base, "eval_set": digests[set_name], "images": len(pairs)}
        hit = cache.get(key, _valid_eval)
        if hit is not None:
            evals[set_name] = {k: hit[k] for k in (*_EVAL_KEYS, "per_image") if k in hit}
            cached.append(set_name)
            continue
        r = inference.evaluate(model, pairs, progress=progress, device=device, y_round=y_round)
        evals[set_name] = {**{k: r[k] for k in _EVAL_KEYS}, "per_image": r["per_image"]}
        cache.put(key, evals[set_name])
    return evals, cached


def cached_bicubic(eval_sets: Mapping[str, Sequence[Any]], digests: Mapping[str, str], y_round: bool,
                   cache: ResultCache) -> dict[str, dict[str, float]]:
    """:func:`bicubic` per eval set, read from ``cache`` where an entry for the same content exists."""
    base = {"kind": "bicubic", "format": CACHE_FORMAT, "y_round": bool(y_round), **_versions(),
            "code": _code_digest({"effsr.imresize", "effsr.quality", __name__})}
    out = {}
    for set_name, pairs in eval_sets.items():
        key = {**base, "eval_set": digests[set_name], "images": len(pairs)}
        hit = cache.get(key, _valid_bicubic)
        if hit is None:
            hit = bicubic({set_name: pairs}, y_round=y_round)[set_name]
            cache.put(key, hit)
        out[set_name] = {"psnr_y": hit["psnr_y"], "psnr_rgb": hit["psnr_rgb"]}
    return out


def measure_all(state: Any, student: nn.Module, teacher_eval: Mapping[str, Any] | None,
                student_eval: Mapping[str, Any] | None = None,
                student_eval_stage: str | None = None) -> dict[str, Any]:
    """Rows for the teacher, the student and every peer checkpoint found (``state`` is a pipeline RunState).

    ``teacher_eval`` / ``student_eval``: evaluations the stages already made (``student_eval`` by stage
    ``student_eval_stage``, of exactly the final student's weights); each is used when it reproduces on the
    current eval sets (:func:`evals_reproduce`), else the model is evaluated again. Every model is timed on the
    same :func:`runtime_pairs`. Peer and bicubic evaluations come from the cache where possible.
    """
    from effsr import models

    cfg = state.cfg
    timed = runtime_pairs(state.eval_sets)
    timed_info = runtime_images_info(state.eval_sets, timed)
    state.log(f"report: runtime on {len(timed)} image(s) of {timed_info[0]['set']} ("
              + ", ".join(f"{t['name']} {t['lr'][1]}x{t['lr'][0]}" for t in timed_info)
              + f"), best of {cfg.runtime_trials}")
    cache = ResultCache(report_cache_dir(), state.log)
    digests = {name: eval_set_digest(pairs) for name, pairs in state.eval_sets.items()}
    teacher_ok = teacher_eval is not None and evals_reproduce(state.teacher, teacher_eval, state.eval_sets,
                                                             state.device, cfg.y_round)
    student_ok = student_eval is not None and evals_reproduce(student, student_eval, state.eval_sets, state.device,
                                                             cfg.y_round)
    if teacher_eval is not None and not teacher_ok:
        state.log("report: the teacher stage's evaluation does not reproduce on these eval sets: evaluating again")
    if student_eval is not None and not student_ok:
        state.log(f"report: stage {student_eval_stage}'s evaluation of the student does not reproduce on these "
                  "eval sets: evaluating again")
    state.log("report: student " + (f"evaluation of stage {student_eval_stage} reused" if student_ok else
                                    "evaluated"))
    rows = [
        measure(state.teacher_label, "teacher", state.teacher, state.eval_sets, state.device, cfg.runtime_trials,
                evals=teacher_eval if teacher_ok else None, progress=cfg.progress, y_round=cfg.y_round,
                timed=timed),
        measure("student", "student", student, state.eval_sets, state.device, cfg.runtime_trials,
                evals=student_eval if student_ok else None, progress=cfg.progress, y_round=cfg.y_round,
                timed=timed),
    ]
    state.log(f"student: {rows[1]['params']:,} params, {rows[1]['flops'] / 1e9:.2f} G FLOPs; " + ", ".join(
        f"{k} PSNR-Y {v['psnr_y']:.3f}" for k, v in rows[1]["eval"].items()))
    peers_dir = cfg.use_peers()
    skipped, peers_cached = [], []
    if peers_dir is not None:
        teacher_file = Path(cfg.weights).resolve()
        for fname, name in PEER_CHECKPOINTS.items():
            path = peers_dir / fname
            if not path.is_file():
                skipped.append(f"{fname} (not found)")
                continue
            if path.resolve() == teacher_file:
                rows[0]["label"] = f"{state.teacher_label} ({name})"
                continue
            try:
                peer = models.load(name, path)
            except (ValueError, KeyError, RuntimeError, OSError) as err:
                skipped.append(f"{fname} ({err})")
                continue
            evals, cached = peer_evals(name, path.resolve(), peer, state.eval_sets, digests, state.device,
                                       cfg.y_round, cache, progress=cfg.progress)
            rows.append(measure(name, "peer", peer, state.eval_sets, state.device, cfg.runtime_trials,
                                evals=evals, progress=cfg.progress, y_round=cfg.y_round, timed=timed))
            rows[-1]["eval_cached"] = cached
            if len(cached) == len(state.eval_sets):
                peers_cached.append(name)
            state.log(f"peer {name}: " + ", ".join(f"{k} PSNR-Y {v['psnr_y']:.3f}" for k, v in rows[-1]["eval"].items())
                      + (f" (read from the cache: {', '.join(cached)})" if cached else ""))
    for row in rows:
        for name, pub in PUBLISHED.items():
            if row["arch"] == name or row["label"] == name:
                row["published"] = pub
    bic = cached_bicubic(state.eval_sets, digests, cfg.y_round, cache)
    for row in rows:
        row["below_bicubic"] = below_bicubic(row, bic)
        if row["below_bicubic"]:
            state.log(f"WARNING: {row['label']} is worse than bicubic upscaling on {', '.join(row['below_bicubic'])} "
                      "(PSNR-Y): it has not learned super-resolution (too few steps, or a broken checkpoint?)")
    return {"models": rows, "bicubic": bic, "y_round": cfg.y_round,
            "eval_sets": list(state.eval_sets),
            "peers_dir": str(peers_dir) if peers_dir else None, "peers_skipped": skipped,
            "runtime_images": timed_info, "peers_cached": peers_cached, "cache_dir": str(cache.folder),
            "teacher_eval_from": "teacher" if teacher_ok else None,
            "student_eval_from": student_eval_stage if student_ok else None}


def below_bicubic(row: Mapping[str, Any], bicubic: Mapping[str, Any] | None) -> list[str]:
    """The eval sets on which model ``row`` (a report row) has a lower PSNR-Y than bicubic upscaling."""
    out = []
    for name, e in (row.get("eval") or {}).items():
        b = (bicubic or {}).get(name, {}).get("psnr_y")
        y = e.get("psnr_y")
        if b is not None and y is not None and y < b:
            out.append(name)
    return out


def _below(row: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    return list(row["below_bicubic"]) if "below_bicubic" in row else below_bicubic(row, data.get("bicubic"))


def bicubic(eval_sets: Mapping[str, list[Any]], y_round: bool = True) -> dict[str, dict[str, float]]:
    """PSNR-Y / PSNR-RGB of MATLAB-style bicubic upscaling per eval set (the floor any network must beat);
    Y rounded to integers unless ``y_round=False``."""
    import numpy as np

    from effsr import quality
    from effsr.imresize import imresize

    out = {}
    for name, pairs in eval_sets.items():
        ys, rgbs = [], []
        for p in pairs:
            sr = imresize(p.lr, scale=4.0)
            hr = p.hr[: sr.shape[0], : sr.shape[1]]
            sr = sr[: hr.shape[0], : hr.shape[1]]
            ys.append(quality.psnr(sr, hr, shave=4, y_channel=True, y_round=y_round))
            rgbs.append(quality.psnr(sr, hr, shave=4, y_channel=False))
        out[name] = {"psnr_y": float(np.mean(ys)), "psnr_rgb": float(np.mean(rgbs))}
    return out


# ---------------------------------------------------------------------------------------------- files
def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def summary_table(data: Mapping[str, Any], markdown_table: bool = True) -> str:
    """The models table (params, FLOPs, activations, convs, runtime, PSNR-Y / PSNR-RGB per set)."""
    sets = list(data["eval_sets"])
    head = ["model", "params", "FLOPs [G]", "acts [M]", "convs", "runtime [ms/img]"]
    for s in sets:
        head += [f"{s} PSNR-Y", f"{s} PSNR-RGB"]
    head.append("published")
    rows = []
    for m in data["models"]:
        flag = " (below bicubic!)" if _below(m, data) and "BELOW BICUBIC" not in m["label"] else ""
        r = [m["label"] + flag, f"{m['params']:,}", _fmt(m["flops"] / 1e9, ".2f"), _fmt(m["activations"] / 1e6, ".2f"),
             str(m["convs"]), _fmt(m["runtime_ms"], ".1f") + (f" ({m['runtime_device']})" if markdown_table else "")]
        for s in sets:
            e = m["eval"].get(s, {})
            r += [_fmt(e.get("psnr_y"), ".3f"), _fmt(e.get("psnr_rgb"), ".3f")]
        pub = m.get("published")
        r.append(", ".join(f"{k} Y {v}" for k, v in pub["psnr_y"].items()) if pub else "")
        rows.append(r)
    if data.get("bicubic"):
        r = ["bicubic", "0", "–", "–", "0", "–"]
        for s in sets:
            e = data["bicubic"].get(s, {})
            r += [_fmt(e.get("psnr_y"), ".3f"), _fmt(e.get("psnr_rgb"), ".3f")]
        rows.append(r + [""])
    if markdown_table:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in rows])


def markdown(data: Mapping[str, Any]) -> str:
    """The text of ``report.md``."""
    cfg = data.get("config", {})
    stages = data.get("stages", {})
    lines = ["# effsr shrink report", "",
             f"Teacher `{cfg.get('model')}` from `{cfg.get('weights')}`; student weights `{data.get('student_file')}` "
             f"(reload: `effsr eval --model {cfg.get('model')} --weights {data.get('student_file')}` or "
             "`effsr.shrink.load_student`).", "",
             "FLOPs = multiply-accumulates on a 3x256x256 input, activations = conv output elements, convs = conv "
             f"layers run (NTIRE ESR convention); runtime = best of {cfg.get('runtime_trials')} passes over "
             f"{_timed_text(data)}; PSNR on RGB uint8 outputs, 4 px shaved, Y = BT.601.", "", summary_table(data), ""]
    for m in data["models"]:
        below = _below(m, data)
        if below:
            worse = ", ".join(f"{s} {m['eval'][s]['psnr_y']:.3f} dB vs bicubic {data['bicubic'][s]['psnr_y']:.3f} dB"
                              for s in below)
            lines += [f"**Warning: {m['label']} is worse than bicubic upscaling** ({worse}): it has not learned "
                      "super-resolution; train or distil longer, or check the checkpoint.", ""]
    lines += ["## Stages", ""]
    for name, info in stages.items():
        if not info:
            lines.append(f"* **{name}**: skipped")
            continue
        extra = []
        if name == "teacher":
            extra.append(f"{info.get('arch')} with {info.get('params'):,} params" + "".join(
                f"; {k} PSNR-Y {v['psnr_y']:.3f} dB" for k, v in (info.get("eval") or {}).items()))
        if name == "repify":
            extra.append(f"block {info.get('block')}, training-form params {info.get('params_training_form'):,}")
        if name == "prune":
            extra.append(f"ratio {info.get('ratio')}: params {info.get('params_before'):,} -> "
                         f"{info.get('params_after'):,}")
            fts = [h["finetune"] for h in info.get("history", []) if isinstance(h.get("finetune"), dict)]
            if fts:
                extra.append(f"{len(fts)} step(s) of {fts[0].get('steps')} distillation steps, last loss "
                             f"{_fmt(fts[-1].get('loss_last'), '.4g')}")
        if name == "fuse":
            v = info.get("verify_branches", {})
            extra.append(f"fused vs training form: max relative error {_fmt(v.get('max_rel_error'), '.3g')} on "
                         f"{v.get('images')} real image(s) (tolerance {v.get('tolerance')})")
        if name == "tucker":
            extra.append(f"keep {info.get('fraction')}: {info.get('decomposed')} conv(s) decomposed, params "
                         f"{info.get('params_before'):,} -> {info.get('params_after'):,}")
        if name == "compress":
            extra.append(_compress_line(info))
        if name == "distill" and info.get("eval"):
            extra.append("after distillation " + ", ".join(f"{k} PSNR-Y {v['psnr_y']:.3f} dB"
                                                           for k, v in info["eval"].items()))
        ft = info.get("finetune")
        if isinstance(ft, dict) and ft.get("steps"):
            extra.append(f"{ft['steps']} distillation steps, loss {_fmt(ft.get('loss_first'), '.4g')} -> "
                         f"{_fmt(ft.get('loss_last'), '.4g')}")
        lines.append(f"* **{name}** ({_fmt(info.get('seconds'), '.1f')} s): " + "; ".join(extra))
    rc = data.get("reload_check")
    if rc:
        lines += ["", f"Reloaded student vs in-memory student: max relative error {rc['max_rel_error']:.3g}."]
    if data.get("peers_skipped"):
        lines += ["", "Peers not evaluated: " + ", ".join(data["peers_skipped"])]
    if data.get("peers_cached"):
        lines += ["", "Peer PSNR/SSIM read from the cache (same checkpoint, images and settings): "
                  + ", ".join(data["peers_cached"]) + "."]
    lines += ["", "![frontier](frontier.png)", ""]
    return "\n".join(lines)


def _timed_text(data: Mapping[str, Any]) -> str:
    """What the runtime column was timed on, for report.md."""
    timed = data.get("runtime_images")
    if not timed:
        return "the first eval set's LR images"
    names = ", ".join(f"`{t['name']}` ({t['lr'][1]}x{t['lr'][0]})" for t in timed)
    return f"the same {len(timed)} LR image(s) of {timed[0]['set']} for every model: {names}"


def _compress_line(info: Mapping[str, Any]) -> str:
    """The report.md line of the data-aware compress stage: method, budget, one-shot PSNR, times."""
    unit = "params" if info.get("budget_kind") == "params" else "FLOPs"
    budget, got = info.get("budget") or 0, info.get("achieved") or 0
    text = (f"data-aware {info.get('chosen')} to {unit} <= {budget:,.0f} (got {got:,.0f}); calibration "
            f"{info.get('calib_patches')} patches of {info.get('calib_patch')} px, "
            f"{_fmt(info.get('calibration_seconds'), '.1f')} s; "
            f"one-shot in {_fmt(info.get('oneshot_seconds'), '.1f')} s")
    cands = info.get("candidates") or {}
    if len(cands) > 1:
        text += "; auto candidates: " + ", ".join(
            f"{m} held-out PSNR-Y {_fmt(c.get('held_out_psnr_y'), '.3f')} ({c.get('convs')} convs)"
            for m, c in cands.items())
    if info.get("eval"):
        text += "; one-shot " + ", ".join(f"{k} PSNR-Y {v['psnr_y']:.3f} dB" for k, v in info["eval"].items())
    return text


#: frontier.png colours by kind; any model below bicubic is drawn in :data:`BELOW_COLOR`.
KIND_COLORS = {"teacher": "tab:blue", "student": "tab:purple", "peer": "tab:gray"}
BELOW_COLOR = "red"
_MARKERS = "o^sDvP<>Xph"


def frontier_figure(data: Mapping[str, Any]) -> Any:
    """The matplotlib figure of ``frontier.png`` (see :func:`plot_frontier`)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    first = data["eval_sets"][0]
    bic = (data.get("bicubic") or {}).get(first, {}).get("psnr_y")
    points = [m for m in data["models"] if m["eval"].get(first, {}).get("psnr_y") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    handles = []
    for ax, key, scale, xlabel in ((axes[0], "params", 1e3, "parameters [K]"),
                                   (axes[1], "flops", 1e9, "FLOPs (MACs, 3x256x256) [G]")):
        handles = []
        for i, m in enumerate(points):
            below = first in _below(m, data)
            label = m["label"] + (" (below bicubic)" if below and "BELOW BICUBIC" not in m["label"] else "")
            student = m["kind"] == "student"
            h = ax.scatter([m[key] / scale], [m["eval"][first]["psnr_y"]], zorder=3, label=label,
                           color=BELOW_COLOR if below else KIND_COLORS.get(m["kind"], "k"),
                           marker="*" if student else _MARKERS[i % len(_MARKERS)], s=110 if student else 45,
                           edgecolors="k", linewidths=0.5)
            handles.append(h)
        ys = [m["eval"][first]["psnr_y"] for m in points] + ([bic] if bic is not None else [])
        if bic is not None:
            handles.append(ax.axhline(bic, color="tab:green", ls="--", lw=1, label=f"bicubic {bic:.2f} dB"))
        if ys:  # the y-axis always spans bicubic too, so the gap above it is drawn to scale
            lo, hi = min(ys), max(ys)
            pad = max(0.05 * (hi - lo), 0.05)
            ax.set_ylim(lo - pad, hi + pad)
        ax.margins(x=0.08)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"PSNR-Y on {first} [dB]")
        ax.grid(True, alpha=0.3)
    # one legend under both panels instead of labels next to the points: labels can never overlap
    fig.legend(handles=handles, loc="lower center", ncol=min(3, max(1, len(handles))), fontsize=8, frameon=False)
    for text, h in zip(fig.legends[0].get_texts(), handles):
        if "below bicubic" in text.get_text().lower():
            text.set_color(BELOW_COLOR)
    rows = -(-len(handles) // 3)
    fig.suptitle("effsr shrink: quality vs size")
    fig.tight_layout(rect=(0, min(0.45, 0.06 * rows + 0.02), 1, 1))
    return fig


def plot_frontier(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """``frontier.png``: PSNR-Y on the first eval set vs params and vs FLOPs.

    Every model is a marker named in one legend under the plots (no labels next to points, so none overlap);
    the y-axis spans bicubic's PSNR-Y (dashed line) as well; a model below bicubic is drawn and named in red.
    """
    import matplotlib.pyplot as plt

    fig = frontier_figure(data)
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, dpi=110, format="png"))
    finally:
        plt.close(fig)


def write_outputs(run_dir: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """``report.json``, ``report.md`` and ``frontier.png`` in ``run_dir`` (each written atomically)."""
    run_dir = Path(run_dir)
    write_json(run_dir / "report.json", data)
    write_text(run_dir / "report.md", markdown(data))
    plot_frontier(data, run_dir / "frontier.png")


def read_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``report.json`` of a finished run."""
    return json.loads((Path(run_dir) / "report.json").read_text(encoding="utf-8"))
