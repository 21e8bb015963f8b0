"""``effsr demo``: the whole shrink pipeline on a fresh machine, offline, in a few minutes on CPU.

1. Teacher: a small RFDN (``nf=24``) whose 3x3 convs are ECB blocks, trained briefly in "online" mode on four
   of the photographs bundled with scikit-image (``effsr.data.default_images``), then fused into plain convs
   and verified against its training form on real images.
2. Student: the fused teacher compressed by the data-aware path to at most half its parameters
   (``--target-params``: calibration patches, one-shot pruning + least-squares reconstruction and data-aware
   Tucker, the better kept, then distillation) -- the same :func:`effsr.shrink.run_shrink` as ``effsr shrink``.
   ``--prune`` / ``--tucker`` with ``--target-fraction 0`` run the plain weight-norm recipe instead.
3. Report: ``report.json``, ``report.md``, ``frontier.png`` for teacher and student, evaluated on the two
   held-out photographs (``camera``, ``coffee``).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from .config import ShrinkConfig
from .log import log as shrink_log
from .seeds import seed_everything
from .verify import verify_same
from .recipe import has_recipe, load_student, new_recipe, save_student

__all__ = ["run_demo", "DEMO_TRAIN", "DEMO_EVAL", "split_default_images"]

DEMO_TRAIN = ("astronaut", "chelsea", "rocket", "motorcycle")
DEMO_EVAL = ("camera", "coffee")
#: The demo's student keeps at most this fraction of its teacher's parameters (data-aware path).
DEMO_TARGET_FRACTION = 0.5


def split_default_images() -> tuple[list[Any], list[Any]]:
    """(training pairs, evaluation pairs) from scikit-image's bundled photographs."""
    from effsr.data import default_images

    pairs = {p.name: p for p in default_images()}
    return [pairs[n] for n in DEMO_TRAIN if n in pairs], [pairs[n] for n in DEMO_EVAL if n in pairs]


def train_teacher(train_pairs: list[Any], eval_pairs: list[Any], steps: int, nf: int, seed: int, batch_size: int,
                  patch_size: int, lr: float, device: str, progress: bool, log: Any,
                  checkpoint: Path | None = None, resume: bool = False,
                  checkpoint_every: int = 50, channels_last: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train ``rfdn(nf, conv="ecb")`` online on ``train_pairs``; return the fused network and what was checked.

    With ``checkpoint`` the training is checkpointed every ``checkpoint_every`` steps and on interruption, and
    ``resume`` continues from it (same final weights as an uninterrupted training)."""
    from .finetune import stop_hook
    import distill
    import reparam
    from effsr import models
    from effsr.data import PatchDataset

    seed_everything(seed)
    net = models.build("rfdn", nf=nf, conv="ecb")
    reparam.set_mode(net, "online")
    ds = PatchDataset(train_pairs, patch_size=patch_size, augment=True, length=max(len(train_pairs), batch_size),
                      seed=seed)

    def sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.05)

    t0 = time.perf_counter()
    res = distill.train_steps(distill.Supervised(net), ds, steps, lr=lr, batch_size=batch_size, device=device,
                              seed=seed, progress=progress, scheduler_fn=sched, log_every=max(1, steps // 20),
                              desc="teacher training", checkpoint=checkpoint, resume=resume,
                              checkpoint_every=checkpoint_every, on_step=stop_hook("teacher_training", 0),
                              channels_last=channels_last)
    if res.start_step:
        log(f"teacher: resumed training at step {res.start_step} from {checkpoint}")
    net = net.cpu().eval()
    fused = reparam.fuse_all(net)
    reparam.set_mode(net, "branches")
    inputs = [torch.from_numpy(p.lr.transpose(2, 0, 1).copy()).float()[None] for p in eval_pairs]
    check = verify_same(net, fused, inputs, "demo teacher (fused vs ECB training form)", 1e-4)
    log(f"teacher: {steps} steps in {time.perf_counter() - t0:.1f} s, loss "
        f"{res.history[0]['loss'] if res.history else float('nan'):.4f} -> "
        f"{res.history[-1]['loss'] if res.history else float('nan'):.4f}; fused vs ECB form max relative error "
        f"{check['max_rel_error']:.2g}")
    fused.config = {**fused.config, "conv": "conv"}  # fused ECB slots are plain convs with the deploy keys
    return fused, {"steps": steps, "seconds": time.perf_counter() - t0, "verify": check,
                   "params_training_form": sum(p.numel() for p in net.parameters())}


def run_demo(out: str | Path = "runs/demo", *, steps: int = 100, teacher_steps: int = 800, seed: int = 0, nf: int = 24,
             prune: float = 0.0, prune_steps: int = 2, tucker: float | None = None, batch_size: int = 8,
             patch_size: int = 32, teacher_lr: float = 2e-3, lr: float = 5e-4, device: str = "cpu",
             progress: bool = True, peers: bool = False, resume: bool = False,
             runtime_trials: int = 3, target_fraction: float | None = DEMO_TARGET_FRACTION,
             target_speedup: float | None = None,
             method: str = "auto", channels_last: bool = True) -> dict[str, Any]:
    """Run the demo into ``out``; returns the report data (also in ``out/report.json``).

    Default: the data-aware path, a student of at most ``target_fraction`` of the teacher's parameters
    (``method``: prune / tucker / auto), ``steps`` distillation steps; with ``target_speedup`` a student that
    many times faster than the teacher instead (a runtime budget, met by pruning: :mod:`effsr.shrink.speed`).
    With ``prune > 0`` or ``tucker`` set (and ``target_fraction=None``) the plain weight-norm recipe runs
    instead (``steps`` after each stage).
    ``channels_last``: teacher training and distillation in NHWC memory format (faster on CPU).
    """
    from effsr import models

    from .runner import run_shrink
    from .report import read_report

    out = Path(out)
    teacher_path = out / "teacher.safetensors"
    if target_fraction is not None and (isinstance(target_fraction, bool)
                                        or not isinstance(target_fraction, (int, float))
                                        or not 0 < target_fraction < 1):
        raise ValueError(f"--target-fraction must be in (0, 1), got {target_fraction!r}")
    budget = None
    if target_speedup is None and target_fraction is not None and not (prune or tucker is not None):
        n = sum(p.numel() for p in models.build("rfdn", nf=nf).parameters()) if isinstance(nf, int) and nf >= 4 else 0
        budget = int(target_fraction * n)
    cfg = ShrinkConfig(model="rfdn", weights=str(teacher_path), train_data="default", eval_data=["default"],
                       target_params=budget, target_speedup=target_speedup, method=method,
                       out=str(out), prune=prune, prune_steps=prune_steps, tucker=tucker, steps=steps,
                       batch_size=batch_size, patch_size=patch_size, lr=lr, device=device, seed=seed, resume=resume,
                       peers=peers, runtime_trials=runtime_trials, progress=progress, tucker_min_channels=8,
                       channels_last=channels_last)
    if not (isinstance(teacher_steps, int) and not isinstance(teacher_steps, bool) and teacher_steps >= 0):
        raise ValueError(f"--teacher-steps must be an int >= 0, got {teacher_steps!r}")
    if not (isinstance(nf, int) and not isinstance(nf, bool) and nf >= 4):
        raise ValueError(f"--nf must be an int >= 4, got {nf!r}")
    cfg.validate(check_files=False)  # every argument checked before any work
    train_pairs, eval_pairs = split_default_images()
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: shrink_log(msg, True, out / "log.txt")  # noqa: E731
    t0 = time.perf_counter()
    if resume and has_recipe(teacher_path):
        log(f"teacher: reusing {teacher_path}")
    else:
        log(f"demo: training a teacher rfdn(nf={nf}, conv='ecb') for {teacher_steps} steps on "
            f"{[p.name for p in train_pairs]} (scikit-image photos)")
        settings = [nf, seed, teacher_steps, batch_size, patch_size, teacher_lr, channels_last]
        key = hashlib.sha256(json.dumps(settings).encode())
        ckpt = out / f".teacher_training-{key.hexdigest()[:12]}.pt"  # settings in the name: never a stale one
        teacher, _ = train_teacher(train_pairs, eval_pairs, teacher_steps, nf, seed, batch_size, patch_size,
                                   teacher_lr, device, progress, log, checkpoint=ckpt, resume=resume,
                                   channels_last=channels_last)
        config = {k: v for k, v in teacher.config.items()}
        save_student(teacher, new_recipe("rfdn", config), teacher_path)
        ckpt.unlink(missing_ok=True)
        reloaded = load_student(teacher_path)
        verify_same(teacher, reloaded, [torch.rand(1, 3, 32, 32) * 255], "demo teacher reload", 0.0)
    run_shrink(cfg, train_pairs=train_pairs, eval_sets={"skimage": eval_pairs},
               teacher_label=f"teacher rfdn nf={nf} (ECB-trained, fused)")
    data = read_report(out)
    from effsr.export.demo import available, export_student  # the student leaves as ONNX fp32 + INT8

    if available():
        data["export"] = export_student(out / "student.safetensors", out / "export", train_pairs,
                                        {"skimage": eval_pairs}, log)
    else:
        log("export: skipped (pip install effsr[export] for the ONNX fp32 + INT8 step)")
    data["demo_seconds"] = time.perf_counter() - t0
    return data
