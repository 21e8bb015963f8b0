"""distill: knowledge distillation for efficient SR (DIPNet-style multi-level feature + output distillation).

>>> import distill
>>> # d = distill.Distiller(teacher, student, pairs=[("B1", "B1", 1.0), ("B4", "B4", 1.0)], gt_weight=1.0)
>>> # loss, parts = d(lr, hr); loss.backward()         # lr, hr in [0, 1]
>>> # distill.train_steps(d, patch_dataset, steps=1000)  # single process, or DDP under torchrun

See docs/distill.md.
"""
from . import ddp, losses
from .distiller import ADAPTERS, Distiller, make_adapter
from .ema import WeightEMA
from .hooks import FeatureHooks, resolve_module
from .losses import (
    CharbonnierLoss, FFTLoss, L1Loss, L2Loss, WaveletLoss, charbonnier_loss, fft_loss, get_loss, haar_dwt, l1_loss,
    l2_loss, wavelet_loss,
)
from .ranges import input_range
from .supervised import Supervised
from .train import TrainResult, load_checkpoint, save_checkpoint, train_steps

__all__ = [
    "ddp", "losses", "ADAPTERS", "Distiller", "make_adapter", "FeatureHooks", "resolve_module", "Supervised",
    "TrainResult", "train_steps", "WeightEMA", "save_checkpoint", "load_checkpoint", "get_loss", "l1_loss", "l2_loss",
    "charbonnier_loss", "fft_loss", "wavelet_loss", "haar_dwt", "L1Loss", "L2Loss", "CharbonnierLoss", "FFTLoss",
    "WaveletLoss", "input_range",
]
