"""``ShrinkConfig``: every setting of a shrink run, validated up front (before any work is done)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from reparam.utils.validate import is_int, is_number

#: Output pixels per calibration batch each layer's statistics keep (a seeded subsample; None: all). 2048 of
#: the 8192 a batch of eight 32 px patches has: measured on RFDN, the same data-aware Tucker PSNR within
#: 0.03 dB at three quarters of the time (bench_results/oneshot_tucker*.json).
CALIB_ROWS = 2048
#: LR side of the calibration patches (``--calib-patch``): the training patch's default, 48 px. At 32 px
#: ESA's strided conv + 7x7/3 max-pool leave a 3x3 map (6x6 at 48 px), far from what whole images give;
#: 48 px calibration is +0.16 dB Set5 one-shot pruned / +0.02 Tucker on RFDN (docs/shrink.md)
CALIB_PATCH = 48
#: Alternating refinement rounds of each data-aware Tucker fit (RFDN at -33 %: +0.07 dB Set5 for 1.3x the time).
TUCKER_REFINE = 2

#: Distillation steps of every fine-tune when neither ``--steps`` nor ``--train-minutes`` is given.
DEFAULT_STEPS = 100
#: The step cap of a fine-tune given only ``--train-minutes`` (the time budget ends it long before).
TIME_BUDGET_STEPS = 1_000_000

#: Adam steps per block of the one-shot students' block refinement (``--refine-steps``) and their lr.
REFINE_STEPS = 0
REFINE_LR = 1e-3

#: Learning-rate schedules of the distillation fine-tunes (``--lr-schedule``).
LR_SCHEDULES = ("constant", "cosine")
#: Where a cosine schedule ends, as a fraction of ``lr``.
COSINE_FLOOR = 0.05

#: The data-aware path's choices (``--method``, ``--importance``, ``--objective``); ``ALLOCATIONS`` (``--allocation``,
#: how pruning spreads a budget) is :data:`prune.budget.ALLOCATIONS`, read from there on first use (importing
#: ``prune.budget`` loads torch-pruning, which ``effsr --help`` does not need).
METHODS = ("prune", "tucker", "auto")
IMPORTANCES = ("l2", "activation", "recon")
OBJECTIVES = ("psnr", "runtime")

#: Settings added after runs were written, with their "off" value: left out of the fingerprint while off, so
#: ``--resume`` still accepts the stages those runs wrote.
_ADDED_OFF: dict[str, Any] = {"ema_decay": None, "train_minutes": None, "target_speedup": None,
                              "target_runtime": None, "runtime_size": None, "refine_steps": 0, "refine_lr": REFINE_LR,
                              "input_range": None, "scale": None,
                              "weights_key": None, "feature_layers": None}

__all__ = ["ShrinkConfig", "LR_SCHEDULES", "COSINE_FLOOR", "find_peers_dir", "PEER_CHECKPOINTS", "METHODS",
           "IMPORTANCES", "OBJECTIVES"]


def __getattr__(name: str) -> Any:
    if name == "ALLOCATIONS":  # prune.budget's, imported on first use (so not in __all__)
        from prune.budget import ALLOCATIONS

        return ALLOCATIONS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Official checkpoints of the shared data set and the network each one is (file name -> model name).
PEER_CHECKPOINTS = {
    "rfdn_aim2020.pth": "rfdn",
    "rfdn_pruned_ntire2022.pth": "rfdn_pruned",
    "rlfn_ntire2022.pth": "rlfn",
    "fmen_ntire2022.pth": "fmen",
    "imdn_aim2019.pth": "imdn",
}


def find_peers_dir(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The shared-data checkpoints folder: ``explicit``, else ``$EFFSR_DATA/checkpoints``, else
    ``../shared/data/checkpoints`` relative to the current directory; None when none exists."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("EFFSR_DATA")
    candidates = [Path(env) / "checkpoints"] if env else []
    candidates.append(Path.cwd().parent / "shared" / "data" / "checkpoints")
    return next((c for c in candidates if c.is_dir()), None)


@dataclasses.dataclass
class ShrinkConfig:
    """Settings of ``effsr shrink`` (see docs/shrink.md). Call :meth:`validate` before running.

    ``prune=0`` skips pruning, ``tucker=None`` skips Tucker, ``repify=None`` skips repify. ``steps`` is
    the number of distillation fine-tuning steps after repify, after *each* pruning step and after Tucker
    (None: 100, or as many as ``train_minutes`` allows when that is set; ``validate`` fills it in).
    ``train_data`` / ``eval_data`` are folders (``HR/`` [+ ``LR_bicubic/X4``]) or ``"default"``
    (scikit-image photos); ``model_config`` is passed to ``effsr.models.load`` (e.g. ``{"nf": 24}``).
    """

    model: str
    weights: str
    train_data: str
    eval_data: list[str]
    out: str
    prune: float = 0.0
    prune_steps: int = 1
    tucker: float | None = None
    repify: str | None = None
    steps: int | None = None
    batch_size: int = 16
    patch_size: int | None = 48  #: LR patch side; None = auto (:func:`effsr.data.select_patch_pairs`)
    lr: float = 1e-4
    #: learning-rate schedule of every distillation fine-tune: "constant" or "cosine" (to ``lr`` x
    #: COSINE_FLOOR over that fine-tune's steps)
    lr_schedule: str = "constant"
    #: distil in ``torch.channels_last`` (NHWC) memory format (``--no-channels-last``: NCHW); on 2 CPU cores
    #: 1.6x faster per step (``benchmarks/train_speed.py``), the same values up to float rounding
    channels_last: bool = True
    feature_weight: float = 0.1
    #: feature distillation points (module names in teacher and student): None = automatic (the zoo's B1..Bn
    #: blocks; a user's network: the output only, measured better at short budgets, docs/results.md);
    #: ``"blocks"`` = the network's repeated blocks (:func:`distill.blocks.block_layers`); ``[]`` = output only
    feature_layers: list[str] | str | None = None
    #: distil toward an exponential moving average of the student's weights (``--ema-decay``; None: off),
    #: see :class:`distill.ema.WeightEMA`
    ema_decay: float | None = None
    #: a time budget of every distillation fine-tune in minutes (``--train-minutes``; None: ``steps`` only):
    #: a fine-tune ends after ``steps`` or this much training time, whichever comes first
    train_minutes: float | None = None
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    peers: bool | None = None
    peers_dir: str | None = None
    max_train_images: int | None = None
    max_eval_images: int | None = None
    runtime_trials: int = 3
    verify_images: int = 3
    verify_tolerance: float = 1e-4
    tucker_min_channels: int = 16
    progress: bool = True
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: a user's network (``model`` = ``file.py:Class`` / ``module:factory``): the range it takes and returns
    #: (required unless it declares one), its scale (measured; checked when given) and the checkpoint's
    #: wrapper key (found automatically when None)
    input_range: float | None = None
    scale: int | None = None
    weights_key: str | None = None
    #: write a mid-stage checkpoint every N distillation steps (and always when interrupted)
    checkpoint_every: int = 50
    #: PSNR-Y/SSIM-Y on integer Y (the NTIRE/MATLAB convention); False: unrounded Y (``--y-float``)
    y_round: bool = True
    #: data-aware path (effsr.shrink.compress): a budget, the method and its options
    target_params: int | None = None
    target_flops: float | None = None  #: G MACs on 3x256x256 (challenge convention)
    #: runtime budgets (:mod:`effsr.shrink.speed`), met by pruning and timed on ``device``: times faster than the
    #: teacher, or milliseconds per forward, at a ``runtime_size`` LR input (None: 256 x 256)
    target_speedup: float | None = None
    target_runtime: float | None = None
    runtime_size: list[int] | None = None
    method: str = "auto"
    importance: str = "recon"
    calib_images: int = 64
    calib_rows: int | None = CALIB_ROWS
    calib_patch: int = CALIB_PATCH
    tucker_refine: int = TUCKER_REFINE
    objective: str = "psnr"
    objective_tolerance: float = 0.1
    #: block refinement of each one-shot student (:func:`distill.local.refine_blocks`): Adam steps per block on
    #: the calibration patches (0: off) and their learning rate
    refine_steps: int = REFINE_STEPS
    refine_lr: float = REFINE_LR
    allocation: str = "uniform"

    # ----------------------------------------------------------------------------------- validation
    def validate(self, check_files: bool = True) -> "ShrinkConfig":
        """Raise ``ValueError``/``TypeError`` naming the argument for any invalid setting; returns self."""
        from effsr import models

        if not isinstance(self.model, str):
            raise TypeError(f"--model must be a str, got {type(self.model).__name__}")
        if models.is_user_spec(self.model):
            if check_files:
                try:
                    models.parse_model(self.model)
                except ValueError as err:
                    raise ValueError("--" + str(err)) from None
            if self.repify is not None or float(self.prune) > 0 or self.tucker is not None:
                raise ValueError("--repify/--prune/--tucker: the weight-norm recipe rebuilds zoo networks only; "
                                 "give a user's network a budget (--target-params or --target-flops)")
        elif self.model not in models.names():
            raise ValueError(f"--model: unknown model {self.model!r}; choose from {', '.join(models.names())}, or "
                             "name your own as path/to/file.py:Class or package.module:factory")
        if self.input_range is not None and (not is_number(self.input_range) or not float(self.input_range) > 0):
            raise ValueError(f"--input-range must be a number > 0, got {self.input_range!r}")
        if self.scale is not None and (not is_int(self.scale) or self.scale < 1):
            raise ValueError(f"--scale must be an int >= 1, got {self.scale!r}")
        if self.weights_key is not None and (not isinstance(self.weights_key, str) or not self.weights_key):
            raise ValueError(f"--weights-key must be a non-empty string, got {self.weights_key!r}")
        if not is_number(self.prune) or not 0.0 <= float(self.prune) < 1.0:
            raise ValueError(f"--prune: the ratio of filters to remove must be in [0, 1), got {self.prune!r}")
        if not is_int(self.prune_steps) or self.prune_steps < 1:
            raise ValueError(f"--prune-steps must be an int >= 1, got {self.prune_steps!r}")
        if self.tucker is not None and (not is_number(self.tucker) or not 0.0 < float(self.tucker) <= 1.0):
            raise ValueError(f"--tucker: the fraction of conv parameters to keep must be in (0, 1], "
                             f"got {self.tucker!r}")
        if self.repify is not None:
            self._check_block(self.repify)
        if self.train_minutes is not None and (not is_number(self.train_minutes)
                                               or not math.isfinite(float(self.train_minutes))
                                               or not float(self.train_minutes) > 0):
            raise ValueError(f"--train-minutes must be a number > 0, got {self.train_minutes!r}")
        if self.steps is None:
            self.steps = DEFAULT_STEPS if self.train_minutes is None else TIME_BUDGET_STEPS
        if not is_int(self.steps) or self.steps < 0:
            raise ValueError(f"--steps must be an int >= 0, got {self.steps!r}")
        for name in ("batch_size", "runtime_trials", "verify_images", "tucker_min_channels", "checkpoint_every"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {v!r}")
        if self.patch_size is not None and (not is_int(self.patch_size) or self.patch_size < 16):
            raise ValueError(f"--patch-size must be 'auto' or an int >= 16 LR pixels (ESA pools 7x7 after a "
                             f"stride-2 conv), got {self.patch_size!r}")
        for name in ("max_train_images", "max_eval_images"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {v!r}")
        if not is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"--lr must be a number > 0, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule: unknown schedule {self.lr_schedule!r}; choose from "
                             f"{', '.join(LR_SCHEDULES)}")
        if not is_int(self.refine_steps) or self.refine_steps < 0:
            raise ValueError(f"--refine-steps must be an int >= 0, got {self.refine_steps!r}")
        if not is_number(self.refine_lr) or not math.isfinite(float(self.refine_lr)) or self.refine_lr <= 0:
            raise ValueError(f"--refine-lr must be a number > 0, got {self.refine_lr!r}")
        if self.lr_schedule != "constant" and self.train_minutes is not None:
            raise ValueError(f"--lr-schedule {self.lr_schedule} decays over a known number of steps; with "
                             "--train-minutes the steps depend on the machine's speed: use the constant schedule")
        if not isinstance(self.channels_last, bool):
            raise TypeError(f"--channels-last must be a bool, got {type(self.channels_last).__name__}")
        if not is_number(self.feature_weight) or self.feature_weight < 0:
            raise ValueError(f"--feature-weight must be a number >= 0, got {self.feature_weight!r}")
        layers = self.feature_layers
        if layers is not None and layers != "blocks" and (
                not isinstance(layers, list) or not all(isinstance(n, str) and n for n in layers)):
            raise TypeError(f"--feature-layers must be 'blocks' or a list of module names, got {layers!r}")
        from distill.ema import check_ema_decay  # the one rule train_steps applies

        try:
            check_ema_decay(self.ema_decay)
        except ValueError:
            raise ValueError(f"--ema-decay must be a number in (0, 1), got {self.ema_decay!r}") from None
        if not is_number(self.verify_tolerance) or self.verify_tolerance <= 0:
            raise ValueError(f"verify_tolerance must be a number > 0, got {self.verify_tolerance!r}")
        if not is_int(self.seed):
            raise ValueError(f"--seed must be an int, got {self.seed!r}")
        if not isinstance(self.model_config, dict):
            raise TypeError(f"model_config must be a dict, got {type(self.model_config).__name__}")
        if not isinstance(self.y_round, bool):
            raise TypeError(f"y_round must be a bool, got {type(self.y_round).__name__}")
        self._check_budget()
        self._check_device()
        if isinstance(self.eval_data, (str, os.PathLike)):
            self.eval_data = [str(self.eval_data)]
        if not self.eval_data:
            raise ValueError("--eval-data: give at least one evaluation set")
        if check_files:
            self._check_files()
        self._check_out()
        return self

    @property
    def data_aware(self) -> bool:
        """Whether a budget was given (the data-aware compress + distill stages run)."""
        return (self.target_params is not None or self.target_flops is not None or self.target_speedup is not None
                or self.target_runtime is not None)

    @property
    def runtime_budget(self) -> bool:
        """Whether the budget is a runtime (``--target-speedup`` / ``--target-runtime``)."""
        return self.target_speedup is not None or self.target_runtime is not None

    def _check_budget(self) -> None:
        from prune.budget import ALLOCATIONS

        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"--allocation: unknown allocation {self.allocation!r}; choose from "
                             f"{', '.join(ALLOCATIONS)}")

        from .speed import check_runtime_budget

        given = [f for f, v in (("--target-params", self.target_params), ("--target-flops", self.target_flops),
                                ("--target-speedup", self.target_speedup), ("--target-runtime", self.target_runtime))
                 if v is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)}: give one budget, not several")
        check_runtime_budget(self.target_speedup, self.target_runtime)
        if self.runtime_size is not None and (not isinstance(self.runtime_size, (list, tuple))
                                              or len(self.runtime_size) != 2
                                              or not all(is_int(v) and v >= 16 for v in self.runtime_size)):
            raise ValueError(f"--runtime-size must be two ints >= 16 (LR height and width), got {self.runtime_size!r}")
        if self.runtime_budget and self.method == "tucker":
            raise ValueError(f"{given[0]}: a runtime budget is met by pruning (a narrower network of the same "
                             "layers; Tucker adds layers): use --method prune or auto")
        if self.target_params is not None and (not is_int(self.target_params) or self.target_params < 1):
            raise ValueError(f"--target-params must be an int >= 1, got {self.target_params!r}")
        if self.target_flops is not None and (not is_number(self.target_flops) or self.target_flops <= 0):
            raise ValueError(f"--target-flops must be a number of G FLOPs > 0, got {self.target_flops!r}")
        if self.method not in METHODS:
            raise ValueError(f"--method: unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.importance not in IMPORTANCES:
            raise ValueError(f"--importance: unknown importance {self.importance!r}; choose from "
                             f"{', '.join(IMPORTANCES)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective: unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if not is_int(self.calib_images) or self.calib_images < 1:
            raise ValueError(f"--calib-images must be an int >= 1, got {self.calib_images!r}")
        if not is_int(self.calib_patch) or self.calib_patch < 16:
            raise ValueError(f"--calib-patch must be an int >= 16 (ESA's strided conv and 7x7 pool), "
                             f"got {self.calib_patch!r}")
        if self.calib_rows is not None and (not is_int(self.calib_rows) or self.calib_rows < 1):
            raise ValueError(f"--calib-rows must be an int >= 1 (0 on the command line: all), got {self.calib_rows!r}")
        if not is_int(self.tucker_refine) or self.tucker_refine < 0:
            raise ValueError(f"--tucker-refine must be an int >= 0, got {self.tucker_refine!r}")
        if not is_number(self.objective_tolerance) or self.objective_tolerance < 0:
            raise ValueError(f"--objective-tolerance must be a number of dB >= 0, got {self.objective_tolerance!r}")
        if self.data_aware and (float(self.prune) > 0 or self.tucker is not None):
            raise ValueError("--target-params/--target-flops/--target-speedup/--target-runtime: the data-aware "
                             "path replaces --prune and --tucker "
                             "(give a budget, or the ratios of the plain weight-norm recipe, not both)")

    @staticmethod
    def _check_block(name: str) -> None:
        import reparam
        from effsr.models.conv import normalize_conv

        if not isinstance(name, str) or name.lower() not in reparam.BLOCKS:
            raise ValueError(f"--repify: unknown block {name!r}; choose from {', '.join(sorted(reparam.BLOCKS))}")
        try:
            normalize_conv(name)
        except (ValueError, TypeError) as err:
            raise ValueError(f"--repify: block {name!r} cannot replace a 3x3 conv ({err})") from None

    def _check_device(self) -> None:
        from reparam.utils.device import resolve_device

        self.device = str(resolve_device(self.device, arg="--device"))  # "auto" -> "cuda" or "cpu"

    def _check_files(self) -> None:
        w = Path(self.weights)
        if not w.is_file():
            raise ValueError(f"--weights: checkpoint file not found: {self.weights}")
        for arg, spec in [("--train-data", self.train_data)] + [("--eval-data", e) for e in self.eval_data]:
            if spec == "default":
                continue
            p = Path(spec)
            if not p.is_dir():
                raise ValueError(f"{arg}: data folder not found: {spec}")
        if self.peers_dir is not None and self.peers and not Path(self.peers_dir).is_dir():
            raise ValueError(f"--peers-dir: folder not found: {self.peers_dir}")

    def _check_out(self) -> None:
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: {self.out} exists and is not a directory")
        stages = out / "stages"
        if stages.is_dir() and any(stages.iterdir()) and not self.resume:
            raise ValueError(f"--out: {self.out} already holds a shrink run; pass --resume to continue it or "
                             "choose another folder")
        parent = out
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():  # e.g. --out report.txt/run: mkdir would fail after the work is done
            raise ValueError(f"--out: {self.out} cannot be created: {parent} is not a directory")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"--out: {parent} is not writable")

    # ----------------------------------------------------------------------------------- identity
    def fingerprint(self, exclude: Any = ()) -> str:
        """Hash of the settings that change the result (a resumed run must match the stages on disk).

        ``exclude``: further field names to leave out (the runner leaves out later stages' settings).
        """
        skip = {"out", "resume", "progress", "peers", "peers_dir", "runtime_trials", "device", "eval_data",
                "max_eval_images", "verify_images", "checkpoint_every", *exclude}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if d.get("steps", 0) is None:  # as validate() resolves it
            d["steps"] = DEFAULT_STEPS if self.train_minutes is None else TIME_BUDGET_STEPS
        for k, off in _ADDED_OFF.items():  # settings added later hash as before while they are off
            if k in d and d[k] == off:
                del d[k]
        d["weights"] = str(Path(self.weights).resolve()) if self.weights else None
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def use_peers(self) -> Path | None:
        """The checkpoints folder to evaluate peers from, or None (``peers=None``: on when it exists)."""
        if self.peers is False:
            return None
        d = find_peers_dir(self.peers_dir)
        if d is None or not d.is_dir():
            return None
        return d
