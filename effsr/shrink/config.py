"""``ShrinkConfig``: every setting of a shrink run, validated up front (before any work is done)."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from reparam.utils.validate import is_int, is_number

from .options import SettingError, SettingTypeError, arg, either, flags, inverted, marked, setting

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
REFINE_STEPS = 200
REFINE_LR = 1e-3
#: Smallest held-out PSNR-Y gain (dB) for which the refined student replaces the one-shot one: measured on the
#: official LightRLFN pruned to 67 %, +0.003 dB on the held-out patches came with -0.031 dB on Set5.
REFINE_MIN_GAIN_DB = 0.01

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


#: Where the options that are not declared here are added: the network options every command shares, and the
#: run folder (the command line's default depends on ``--model``).
_MODEL_ARGS = "effsr.cli_model.add_model_args"
_COMMAND = "the command"


# ------------------------------------------------------------------ the command line's forms of some settings
def patch_size_arg(text: str) -> int | None:
    """``--patch-size``: ``auto`` (None) or an int."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {text!r}") from None


def feature_layers_arg(text: str) -> list[str] | str | None:
    """``--feature-layers``: ``auto`` (None), ``blocks``, ``none`` ([]) or comma-separated names."""
    key = text.strip().lower()
    if key == "auto":
        return None
    if key == "blocks":
        return "blocks"
    if key == "none":
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--feature-layers: expected auto, none or module names, got {text!r}")
    return names


def rows_arg(n: int) -> int | None:
    """``--calib-rows``: 0 is all (None)."""
    return None if n == 0 else n


def _listed(values: Any) -> list[Any] | None:
    return list(values) if values else None


@dataclasses.dataclass
class ShrinkConfig:
    """Settings of ``effsr shrink`` (see docs/shrink.md). Call :meth:`validate` before running.

    ``prune=0`` skips pruning, ``tucker=None`` skips Tucker, ``repify=None`` skips repify. ``steps`` is
    the number of distillation fine-tuning steps after repify, after *each* pruning step and after Tucker
    (None: 100, or as many as ``train_minutes`` allows when that is set; ``validate`` fills it in).
    ``train_data`` / ``eval_data`` are folders (``HR/`` [+ ``LR_bicubic/X4``]) or ``"default"``
    (scikit-image photos); ``model_config`` is passed to ``effsr.models.load`` (e.g. ``{"nf": 24}``).

    Each field declares its ``effsr shrink`` option (:func:`effsr.shrink.options.setting`), in the order
    ``effsr shrink --help`` lists them.
    """

    model: str = setting(flag="--model", added_by=_MODEL_ARGS)
    weights: str = setting(flag="--weights", added_by=_MODEL_ARGS)
    train_data: str = setting(flag="--train-data", required=True, metavar="DIR",
                              help="training images: HR/ [+ LR_bicubic/X4/], HR-only, or 'default' (scikit-image "
                                   "photos)")
    eval_data: list[str] = setting(flag="--eval-data", convert=list, required=True, action="append", metavar="DIR",
                                   help="evaluation set: a folder as for --train-data, or 'default' (repeat for "
                                        "several)")
    out: str = setting(flag="--out", added_by=_COMMAND)
    prune: float = setting(0.0, flag="--prune", type=float, metavar="RATIO",
                           help="fraction of filters to remove, in [0, 1) (default 0: no pruning)")
    prune_steps: int = setting(1, flag="--prune-steps", type=int, metavar="K",
                               help="pruning rounds (AGP schedule), distillation after each (default 1)")
    tucker: float | None = setting(None, flag="--tucker", type=float, metavar="FRACTION",
                                   help="Tucker-2: keep this fraction of each 3x3 conv's parameters, in (0, 1] "
                                        "(default: off)")
    tucker_min_channels: int = setting(16, flag="--tucker-min-channels", type=int, metavar="N",
                                       help="skip convs with fewer channels than this (default 16)")
    repify: str | None = setting(None, flag="--repify", metavar="BLOCK",
                                 help="turn the student's 3x3 convs into this rep block first (ecb, rrrb, dbb, ...; "
                                      "default: no repify)")
    steps: int | None = setting(None, flag="--steps", type=int, metavar="N",
                                help="distillation steps after repify, each pruning step and Tucker, or after the "
                                     "data-aware compression (0: training-free) (default 100, or no cap with "
                                     "--train-minutes)")
    #: a time budget of every distillation fine-tune in minutes (``--train-minutes``; None: ``steps`` only):
    #: a fine-tune ends after ``steps`` or this much training time, whichever comes first
    train_minutes: float | None = setting(None, flag="--train-minutes", type=float, metavar="M",
                                          help="time budget of each distillation fine-tune: it ends after M minutes "
                                               "of training or --steps steps, whichever comes first (the steps done "
                                               "depend on the machine)")
    #: data-aware path (effsr.shrink.compress): a budget, the method and its options
    target_params: int | None = setting(None, flag="--target-params", type=int, metavar="N",
                                        help="data-aware path: the student's parameter budget (<= N): calibration, "
                                             "one-shot compression in closed form, then --steps of distillation "
                                             "(default: off)")
    #: G MACs on 3x256x256 (challenge convention)
    target_flops: float | None = setting(None, flag="--target-flops", type=float, metavar="G",
                                         help="data-aware path: a FLOPs budget instead, in G MACs on 3x256x256 "
                                              "(challenge convention)")
    #: runtime budgets (:mod:`effsr.shrink.speed`), met by pruning and timed on ``device``: times faster than the
    #: teacher, or milliseconds per forward, at a ``runtime_size`` LR input (None: 256 x 256)
    target_speedup: float | None = setting(None, flag="--target-speedup", type=float, metavar="X",
                                           help="runtime budget: a student X times faster than the teacher, timed "
                                                "on --device at --runtime-size (met by pruning)")
    target_runtime: float | None = setting(None, flag="--target-runtime", type=float, metavar="MS",
                                           help="runtime budget: milliseconds per forward on --device at "
                                                "--runtime-size (met by pruning)")
    runtime_size: list[int] | None = setting(None, flag="--runtime-size", convert=_listed, type=int, nargs=2,
                                             metavar=("H", "W"),
                                             help="LR input size of the runtime budget's timings (default 256 256)")
    method: str = setting("auto", flag="--method", metavar="prune|tucker|auto",
                          help="data-aware method: channel pruning + least-squares reconstruction, data-aware "
                               "Tucker-2, or auto: both one-shot, keep the better on held-out calibration patches "
                               "(see --objective)")
    importance: str = setting("recon", flag="--importance", metavar="l2|activation|recon",
                              help="which filters data-aware pruning removes: the reconstruction-error greedy "
                                   "selection, activation energy, or L2 norm (weight norms alone ruin the official "
                                   "RFDN: 20 dB)")
    calib_images: int = setting(64, flag="--calib-images", type=int, metavar="N",
                                help="calibration LR patches (--calib-patch px) cut from every training image that "
                                     "fits one")
    calib_patch: int = setting(CALIB_PATCH, flag="--calib-patch", type=int, metavar="PX",
                               help=f"LR side of the calibration patches (default {CALIB_PATCH}; smaller when no "
                                    "training image is that large)")
    calib_rows: int | None = setting(CALIB_ROWS, flag="--calib-rows", convert=rows_arg, cli_default=CALIB_ROWS,
                                     type=int, metavar="N",
                                     help="output pixels per calibration batch of 8 patches each layer's statistics "
                                          "use (a seeded subsample; 0: all, 18,432 for 48 px patches)")
    tucker_refine: int = setting(TUCKER_REFINE, flag="--tucker-refine", type=int, metavar="N",
                                 help="alternating refinement rounds of each data-aware Tucker factorization (0: "
                                      "none)")
    #: block refinement of each one-shot student (:func:`distill.local.refine_blocks`): Adam steps per block on
    #: the calibration patches (0: off) and their learning rate
    refine_steps: int = setting(REFINE_STEPS, flag="--refine-steps", type=int, metavar="N",
                                help="Adam steps per block fitting each one-shot student's blocks to the teacher's "
                                     "block outputs on the calibration patches, kept when the held-out PSNR-Y rises "
                                     "(0: off)")
    refine_lr: float = setting(REFINE_LR, flag="--refine-lr", type=float, metavar="LR",
                               help="learning rate of the block refinement")
    allocation: str = setting("uniform", flag="--allocation", metavar="uniform|sensitivity",
                              help="data-aware pruning: one ratio for every group with the unused budget given back "
                                   "where the calibration error falls most, or per-group ratios from the calibration "
                                   "sensitivity (prune.prune_to_budget; measured worse on RFDN)")
    objective: str = setting("psnr", flag="--objective", metavar="psnr|runtime",
                             help="--method auto keeps the best held-out PSNR-Y, or with 'runtime' the fastest "
                                  "measured student within --objective-tolerance dB of it")
    objective_tolerance: float = setting(0.1, flag="--objective-tolerance", type=float, metavar="DB",
                                         help="PSNR-Y tolerance of --objective runtime")
    batch_size: int = setting(16, flag="--batch-size", type=int, metavar="N", help="training patches per step")
    #: LR patch side; None = auto (:func:`effsr.data.select_patch_pairs`)
    patch_size: int | None = setting(48, flag="--patch-size", type=patch_size_arg, metavar="N|auto",
                                     help="LR training patch side (default: 48; images smaller than N are left out "
                                          "and the log says how many and which; 'auto' = the smallest LR side of "
                                          "the training images, at most 48, uses every image but trained RFDN to "
                                          "below bicubic on T91 (19 px))")
    lr: float = setting(1e-4, flag="--lr", type=float, help="learning rate (Adam, default 1e-4)")
    #: learning-rate schedule of every distillation fine-tune: "constant" or "cosine" (to ``lr`` x
    #: COSINE_FLOOR over that fine-tune's steps)
    lr_schedule: str = setting("constant", flag="--lr-schedule", metavar="|".join(LR_SCHEDULES),
                               help="learning-rate schedule of each distillation fine-tune: constant, or cosine "
                                    f"down to {COSINE_FLOOR:g} x --lr over its steps (default: constant)")
    #: distil in ``torch.channels_last`` (NHWC) memory format (``--no-channels-last``: NCHW); on 2 CPU cores
    #: 1.6x faster per step (``benchmarks/train_speed.py``), the same values up to float rounding
    channels_last: bool = setting(True, flag="--channels-last", action=argparse.BooleanOptionalAction,
                                  help="distil with weights and batches in channels-last (NHWC) memory format, "
                                       "faster on CPU (default: on; --no-channels-last: NCHW)")
    #: feature distillation points (module names in teacher and student): None = automatic (the zoo's B1..Bn
    #: blocks; a user's network: the output only, measured better at short budgets, docs/results.md);
    #: ``"blocks"`` = the network's repeated blocks (:func:`distill.blocks.block_layers`); ``[]`` = output only
    feature_layers: list[str] | str | None = setting(None, flag="--feature-layers", convert=feature_layers_arg,
                                                     cli_default="auto", metavar="auto|blocks|none|NAME,NAME",
                                                     help="feature distillation points: auto (the zoo's B1..Bn "
                                                          "blocks; a user's network: the output only), blocks (the "
                                                          "network's repeated blocks), none (output only) or module "
                                                          "names")
    feature_weight: float = setting(0.1, flag="--feature-weight", type=float,
                                    help="weight of the block-feature distillation terms (default 0.1; 0: output "
                                         "only)")
    #: distil toward an exponential moving average of the student's weights (``--ema-decay``; None: off),
    #: see :class:`distill.ema.WeightEMA`
    ema_decay: float | None = setting(None, flag="--ema-decay", type=float, metavar="D",
                                      help="end each distillation fine-tune at an exponential moving average of the "
                                           "student's weights with decay D in (0, 1), e.g. 0.999 (default: off, the "
                                           "last step's weights)")
    #: the API runs on the CPU unless told; the command line picks CUDA when there is one
    device: str = setting("cpu", flag="--device", cli_default="auto",
                          help="cpu, cuda, cuda:1, ... or auto (default: auto, cuda if available)")
    seed: int = setting(0, flag="--seed", type=int, metavar="N", help="seed of every random choice in the run")
    resume: bool = setting(False, flag="--resume", action="store_true",
                           help="continue an interrupted run in --out (completed stages are reloaded, an interrupted "
                                "one continues from its last checkpoint)")
    #: write a mid-stage checkpoint every N distillation steps (and always when interrupted)
    checkpoint_every: int = setting(50, flag="--checkpoint-every", type=int, metavar="N",
                                    help="checkpoint distillation every N steps inside a stage (an interrupt always "
                                         "checkpoints)")
    peers: bool | None = setting(None, flag="--peers", action=argparse.BooleanOptionalAction,
                                 help="also measure the official checkpoints (default: when the shared data is "
                                      "found)")
    peers_dir: str | None = setting(None, flag="--peers-dir", metavar="DIR",
                                    help="folder of the official checkpoints (default: $EFFSR_DATA/checkpoints or "
                                         "../shared/data/checkpoints)")
    max_train_images: int | None = setting(None, flag="--max-train-images", type=int, metavar="N",
                                           help="use at most N training images (default: all)")
    max_eval_images: int | None = setting(None, flag="--max-eval-images", type=int, metavar="N",
                                          help="use at most N images of each eval set (default: all)")
    runtime_trials: int = setting(3, flag="--runtime-trials", type=int, metavar="N",
                                  help="timed passes per model in the report")
    #: PSNR-Y/SSIM-Y on integer Y (the NTIRE/MATLAB convention); False: unrounded Y (``--y-float``)
    y_round: bool = setting(True, flag="--y-float", convert=inverted, action="store_true",
                            help="report PSNR-Y/SSIM-Y on unrounded luma (default: off: Y rounded to integers, as "
                                 "the NTIRE evaluation code and MATLAB's rgb2ycbcr do)")
    progress: bool = setting(True, flag="--no-progress", convert=inverted, action="store_true",
                             help="hide progress bars")
    # not on the command line: the numerical checks of the fused and reloaded students
    verify_images: int = 3
    verify_tolerance: float = 1e-4
    #: a user's network (``model`` = ``file.py:Class`` / ``module:factory``): its constructor's keyword arguments,
    #: the range it takes and returns (required unless it declares one), its scale (measured; checked when given)
    #: and the checkpoint's wrapper key (found automatically when None)
    model_config: dict[str, Any] = setting(flag="--model-config", default_factory=dict, added_by=_MODEL_ARGS)
    input_range: float | None = setting(None, flag="--input-range", added_by=_MODEL_ARGS)
    scale: int | None = setting(None, flag="--scale", added_by=_MODEL_ARGS)
    weights_key: str | None = setting(None, flag="--weights-key", added_by=_MODEL_ARGS)

    # ----------------------------------------------------------------------------------- validation
    def validate(self, check_files: bool = True) -> "ShrinkConfig":
        """Check every setting; returns self. A bad one raises :class:`~effsr.shrink.options.SettingError` (a
        ``ValueError``) or ``SettingTypeError`` (a ``TypeError``) naming the argument (``calib_images must be
        ...``); ``effsr shrink`` prints the message naming the flag (``--calib-images must be ...``)."""
        from effsr import models

        if not isinstance(self.model, str):
            raise SettingTypeError(f"{arg('model')} must be a str, got {type(self.model).__name__}")
        if models.is_user_spec(self.model):
            if check_files:
                try:
                    models.parse_model(self.model)
                except ValueError as err:  # "model: ..."
                    raise SettingError(arg("model") + str(err).removeprefix("model")) from None
            if self.repify is not None or float(self.prune) > 0 or self.tucker is not None:
                raise SettingError(f"{arg('repify')}/{arg('prune')}/{arg('tucker')}: the weight-norm recipe rebuilds "
                                   f"zoo networks only; give a user's network a budget ({arg('target_params')} or "
                                   f"{arg('target_flops')})")
        elif self.model not in models.names():
            raise SettingError(f"{arg('model')}: unknown model {self.model!r}; choose from "
                               f"{', '.join(models.names())}, or name your own as path/to/file.py:Class or "
                               "package.module:factory")
        if self.input_range is not None and (not is_number(self.input_range) or not float(self.input_range) > 0):
            raise SettingError(f"{arg('input_range')} must be a number > 0, got {self.input_range!r}")
        if self.scale is not None and (not is_int(self.scale) or self.scale < 1):
            raise SettingError(f"{arg('scale')} must be an int >= 1, got {self.scale!r}")
        if self.weights_key is not None and (not isinstance(self.weights_key, str) or not self.weights_key):
            raise SettingError(f"{arg('weights_key')} must be a non-empty string, got {self.weights_key!r}")
        if not is_number(self.prune) or not 0.0 <= float(self.prune) < 1.0:
            raise SettingError(f"{arg('prune')}: the ratio of filters to remove must be in [0, 1), got {self.prune!r}")
        if not is_int(self.prune_steps) or self.prune_steps < 1:
            raise SettingError(f"{arg('prune_steps')} must be an int >= 1, got {self.prune_steps!r}")
        if self.tucker is not None and (not is_number(self.tucker) or not 0.0 < float(self.tucker) <= 1.0):
            raise SettingError(f"{arg('tucker')}: the fraction of conv parameters to keep must be in (0, 1], "
                               f"got {self.tucker!r}")
        if self.repify is not None:
            self._check_block(self.repify)
        if self.train_minutes is not None and (not is_number(self.train_minutes)
                                               or not math.isfinite(float(self.train_minutes))
                                               or not float(self.train_minutes) > 0):
            raise SettingError(f"{arg('train_minutes')} must be a number > 0, got {self.train_minutes!r}")
        if self.steps is None:
            self.steps = DEFAULT_STEPS if self.train_minutes is None else TIME_BUDGET_STEPS
        if not is_int(self.steps) or self.steps < 0:
            raise SettingError(f"{arg('steps')} must be an int >= 0, got {self.steps!r}")
        for name in ("batch_size", "runtime_trials", "verify_images", "tucker_min_channels", "checkpoint_every"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise SettingError(f"{arg(name)} must be an int >= 1, got {v!r}")
        if self.patch_size is not None and (not is_int(self.patch_size) or self.patch_size < 16):
            raise SettingError(f"{arg('patch_size')} must be {either('None (auto)', repr('auto'))} or an int >= 16 "
                               f"LR pixels (ESA pools 7x7 after a stride-2 conv), got {self.patch_size!r}")
        for name in ("max_train_images", "max_eval_images"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                raise SettingError(f"{arg(name)} must be an int >= 1, got {v!r}")
        if not is_number(self.lr) or self.lr <= 0:
            raise SettingError(f"{arg('lr')} must be a number > 0, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SettingError(f"{arg('lr_schedule')}: unknown schedule {self.lr_schedule!r}; choose from "
                               f"{', '.join(LR_SCHEDULES)}")
        if not is_int(self.refine_steps) or self.refine_steps < 0:
            raise SettingError(f"{arg('refine_steps')} must be an int >= 0, got {self.refine_steps!r}")
        if not is_number(self.refine_lr) or not math.isfinite(float(self.refine_lr)) or self.refine_lr <= 0:
            raise SettingError(f"{arg('refine_lr')} must be a number > 0, got {self.refine_lr!r}")
        if self.lr_schedule != "constant" and self.train_minutes is not None:
            raise SettingError(f"{arg('lr_schedule')} {self.lr_schedule} decays over a known number of steps; with "
                               f"{arg('train_minutes')} the steps depend on the machine's speed: use the constant "
                               "schedule")
        if not isinstance(self.channels_last, bool):
            raise SettingTypeError(f"{arg('channels_last')} must be a bool, got {type(self.channels_last).__name__}")
        if not is_number(self.feature_weight) or self.feature_weight < 0:
            raise SettingError(f"{arg('feature_weight')} must be a number >= 0, got {self.feature_weight!r}")
        layers = self.feature_layers
        if layers is not None and layers != "blocks" and (
                not isinstance(layers, list) or not all(isinstance(n, str) and n for n in layers)):
            raise SettingTypeError(f"{arg('feature_layers')} must be 'blocks' or a list of module names, "
                                   f"got {layers!r}")
        from distill.ema import check_ema_decay  # the one rule train_steps applies

        try:
            check_ema_decay(self.ema_decay)
        except ValueError:
            raise SettingError(f"{arg('ema_decay')} must be a number in (0, 1), got {self.ema_decay!r}") from None
        if not is_number(self.verify_tolerance) or self.verify_tolerance <= 0:
            raise SettingError(f"{arg('verify_tolerance')} must be a number > 0, got {self.verify_tolerance!r}")
        if not is_int(self.seed):
            raise SettingError(f"{arg('seed')} must be an int, got {self.seed!r}")
        if not isinstance(self.model_config, dict):
            raise SettingTypeError(f"model_config must be a dict, got {type(self.model_config).__name__}")
        if not isinstance(self.y_round, bool):  # (the command line's --y-float is always a bool)
            raise SettingTypeError(f"y_round must be a bool, got {type(self.y_round).__name__}")
        self._check_budget()
        self._check_device()
        if isinstance(self.eval_data, (str, os.PathLike)):
            self.eval_data = [str(self.eval_data)]
        if not self.eval_data:
            raise SettingError(f"{arg('eval_data')}: give at least one evaluation set")
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
            raise SettingError(f"{arg('allocation')}: unknown allocation {self.allocation!r}; choose from "
                               f"{', '.join(ALLOCATIONS)}")

        from .speed import check_runtime_budget

        given = [arg(f) for f in ("target_params", "target_flops", "target_speedup", "target_runtime")
                 if getattr(self, f) is not None]
        if len(given) > 1:
            raise SettingError(f"{' and '.join(given)}: give one budget, not several")
        try:
            check_runtime_budget(self.target_speedup, self.target_runtime)
        except ValueError as err:  # worded for the command line
            raise SettingError(marked(str(err), flags(ShrinkConfig))) from None
        if self.runtime_size is not None and (not isinstance(self.runtime_size, (list, tuple))
                                              or len(self.runtime_size) != 2
                                              or not all(is_int(v) and v >= 16 for v in self.runtime_size)):
            raise SettingError(f"{arg('runtime_size')} must be two ints >= 16 (LR height and width), "
                               f"got {self.runtime_size!r}")
        if self.runtime_budget and self.method == "tucker":
            raise SettingError(f"{given[0]}: a runtime budget is met by pruning (a narrower network of the same "
                               f"layers; Tucker adds layers): use {arg('method')} prune or auto")
        if self.target_params is not None and (not is_int(self.target_params) or self.target_params < 1):
            raise SettingError(f"{arg('target_params')} must be an int >= 1, got {self.target_params!r}")
        if self.target_flops is not None and (not is_number(self.target_flops) or self.target_flops <= 0):
            raise SettingError(f"{arg('target_flops')} must be a number of G FLOPs > 0, got {self.target_flops!r}")
        if self.method not in METHODS:
            raise SettingError(f"{arg('method')}: unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.importance not in IMPORTANCES:
            raise SettingError(f"{arg('importance')}: unknown importance {self.importance!r}; choose from "
                               f"{', '.join(IMPORTANCES)}")
        if self.objective not in OBJECTIVES:
            raise SettingError(f"{arg('objective')}: unknown objective {self.objective!r}; choose from "
                               f"{', '.join(OBJECTIVES)}")
        if not is_int(self.calib_images) or self.calib_images < 1:
            raise SettingError(f"{arg('calib_images')} must be an int >= 1, got {self.calib_images!r}")
        if not is_int(self.calib_patch) or self.calib_patch < 16:
            raise SettingError(f"{arg('calib_patch')} must be an int >= 16 (ESA's strided conv and 7x7 pool), "
                               f"got {self.calib_patch!r}")
        if self.calib_rows is not None and (not is_int(self.calib_rows) or self.calib_rows < 1):
            raise SettingError(f"{arg('calib_rows')} must be an int >= 1 "
                               f"({either('None', '0 on the command line')}: all), got {self.calib_rows!r}")
        if not is_int(self.tucker_refine) or self.tucker_refine < 0:
            raise SettingError(f"{arg('tucker_refine')} must be an int >= 0, got {self.tucker_refine!r}")
        if not is_number(self.objective_tolerance) or self.objective_tolerance < 0:
            raise SettingError(f"{arg('objective_tolerance')} must be a number of dB >= 0, "
                               f"got {self.objective_tolerance!r}")
        if self.data_aware and (float(self.prune) > 0 or self.tucker is not None):
            raise SettingError(f"{arg('target_params')}/{arg('target_flops')}/{arg('target_speedup')}/"
                               f"{arg('target_runtime')}: the data-aware path replaces {arg('prune')} and "
                               f"{arg('tucker')} (give a budget, or the ratios of the plain weight-norm recipe, "
                               "not both)")

    @staticmethod
    def _check_block(name: str) -> None:
        import reparam
        from effsr.models.conv import normalize_conv

        if not isinstance(name, str) or name.lower() not in reparam.BLOCKS:
            raise SettingError(f"{arg('repify')}: unknown block {name!r}; choose from "
                               f"{', '.join(sorted(reparam.BLOCKS))}")
        try:
            normalize_conv(name)
        except (ValueError, TypeError) as err:
            raise SettingError(f"{arg('repify')}: block {name!r} cannot replace a 3x3 conv ({err})") from None

    def _check_device(self) -> None:
        from reparam.utils.device import resolve_device

        try:  # "auto" -> "cuda" or "cpu"
            self.device = str(resolve_device(self.device, arg=arg("device")))
        except ValueError as err:
            raise SettingError(str(err)) from None
        except TypeError as err:
            raise SettingTypeError(str(err)) from None

    def _check_files(self) -> None:
        w = Path(self.weights)
        if not w.is_file():
            raise SettingError(f"{arg('weights')}: checkpoint file not found: {self.weights}")
        for name, spec in [("train_data", self.train_data)] + [("eval_data", e) for e in self.eval_data]:
            if spec == "default":
                continue
            p = Path(spec)
            if not p.is_dir():
                raise SettingError(f"{arg(name)}: data folder not found: {spec}")
        if self.peers_dir is not None and self.peers and not Path(self.peers_dir).is_dir():
            raise SettingError(f"{arg('peers_dir')}: folder not found: {self.peers_dir}")

    def _check_out(self) -> None:
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise SettingError(f"{arg('out')}: {self.out} exists and is not a directory")
        stages = out / "stages"
        if stages.is_dir() and any(stages.iterdir()) and not self.resume:
            raise SettingError(f"{arg('out')}: {self.out} already holds a shrink run; pass "
                               f"{either('resume=True', '--resume')} to continue it or choose another folder")
        parent = out
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():  # e.g. --out report.txt/run: mkdir would fail after the work is done
            raise SettingError(f"{arg('out')}: {self.out} cannot be created: {parent} is not a directory")
        if not os.access(parent, os.W_OK):
            raise SettingError(f"{arg('out')}: {parent} is not writable")

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
