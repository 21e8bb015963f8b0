"""Efficiency metrics of the NTIRE efficient-SR challenges: parameters, FLOPs, activations, convs, runtime.

:func:`profile` counts what the challenges' ``utils/model_summary.py`` counts (AIM 2020, NTIRE 2022/2023
ESR: ``get_model_flops`` / ``get_model_activation``), re-implemented with forward hooks on the same
module types and with the same formulas, so that the numbers are the challenge's to the last integer:

* ``params``: every parameter element of the model (shared parameters once). The challenge script
  counts only ``requires_grad`` parameters; for a trainable model the two agree.
* ``flops``: *multiply-accumulates* (the challenge calls them FLOPs) of hooked modules only, summed over
  every forward call (a module that runs twice counts twice):

  - ``nn.Conv2d`` / ``nn.ConvTranspose2d``: ``prod(kernel) * in_channels * out_channels / groups`` per
    output position (no bias term; for a transposed conv, like the challenge, per *output* position);
  - ``nn.Linear``: ``in_features`` per output element (for 1-D/2-D inputs this is the challenge's
    ``batch * in * out``; for inputs of more dimensions the challenge script multiplies
    ``shape[0] * input.shape[1] * output.shape[1]``, which is not a MAC count, and we keep the MAC count);
  - activation modules ``nn.ReLU``, ``nn.PReLU``, ``nn.ELU``, ``nn.LeakyReLU``, ``nn.ReLU6``: one per
    output element. ``nn.Sigmoid``, ``nn.GELU``, ``nn.SiLU``, ... are *not* counted (the challenge
    script does not count them either);
  - ``nn.BatchNorm2d`` (exactly the type the challenge hooks; not ``BatchNorm1d``/``3d``/``SyncBatchNorm``):
    one per output element, two when affine.

  Only modules reachable through ``model.modules()`` are hooked. Functional calls (``F.conv2d``,
  ``F.leaky_relu``, ``torch.sigmoid``, ``F.interpolate``, additions, pooling, pixel shuffle) and
  activation modules kept *outside* the network (the official FMEN applies one module-level global
  ``nn.LeakyReLU``) are invisible to hooks and not counted, exactly as in the challenge numbers. The
  networks of :mod:`effsr.models` mirror their official code in this respect (FMEN's activations are
  functional, RFDN's ESA has its ``nn.ReLU`` module), so their counts equal the official ones.
* ``activations``: elements of every ``nn.Conv2d`` / ``nn.ConvTranspose2d`` output ("#Acts").
* ``convs``: number of ``nn.Conv2d`` / ``nn.ConvTranspose2d`` forward calls ("#Conv"; this equals the
  number of conv modules when each one runs once, as in every network of :mod:`effsr.models`).
* ``aten_flops``: an independent, exact count from :class:`torch.utils.flop_counter.FlopCounterMode`,
  which sees every aten-level convolution and matrix product, functional ones included (e.g. a
  re-parameterisation block in "online" mode that convolves with a merged kernel through
  ``F.conv2d``). It counts **2 FLOPs per multiply-accumulate** of convolutions and matrix products
  and nothing for element-wise ops, so for a network whose convs are all modules
  ``aten_flops == 2 * (flops - activation/BN terms)``.

All counts are for one image of ``input_size`` (default ``3 x 256 x 256``, the challenge's). The official
counter run on the official code of the five networks gives, and this module reproduces exactly
(``tests/test_metrics.py`` asserts each integer): RFDN 433,448 params / 27,102,622,560 FLOPs / 112,034,240 acts /
64 convs;
MegSR pruned RFDN 289,888 / 17,700,828,000 / 91,718,080 / 64; RLFN 317,218 / 19,695,306,752 /
80,045,184 / 39; FMEN 341,066 / 22,280,011,776 / 72,089,600 / 34; IMDN 893,936 / 58,531,512,320 /
154,140,672 / 43.

:func:`runtime` times inference like the challenge: per-image average over a list of LR images, best of
``trials`` trials, after warm-up runs; CUDA timings use CUDA events and report
``torch.cuda.max_memory_allocated``; CPU timings use :func:`time.perf_counter` and report the peak
resident set size of the *whole process* (``resource.getrusage``), which never decreases and includes
everything else the process has done.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from reparam.utils.flops import MacConvention, check_input_size, profile_macs

from distill.ranges import input_range as lenient_range

from .inference import (eval_mode, forward, input_range, model_dtype, on_device, resolve_device, tile_count,
                        writable)

__all__ = ["Profile", "profile", "format_table", "runtime", "count_params", "CHALLENGE_CONVENTION"]

#: What the challenge's ``utils/model_summary.py`` hooks (see the module docstring): the generic counter of
#: :mod:`reparam.utils.flops` configured with it. BatchNorm2d exactly (SyncBatchNorm and 1d/3d are not).
CHALLENGE_CONVENTION = MacConvention(
    convs=(nn.Conv2d, nn.ConvTranspose2d),
    linears=(nn.Linear,),
    activations=(nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6),
    norms=(nn.BatchNorm2d,),
)


@dataclasses.dataclass(frozen=True)
class Profile:
    """Complexity of a network for one input of ``input_size`` (see the module docstring)."""

    params: int
    flops: int
    activations: int
    convs: int
    aten_flops: int
    input_size: tuple[int, ...] = (3, 256, 256)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers: ints for the counts, a list for ``input_size``."""
        return {
            "params": int(self.params),
            "flops": int(self.flops),
            "activations": int(self.activations),
            "convs": int(self.convs),
            "aten_flops": int(self.aten_flops),
            "input_size": [int(v) for v in self.input_size],
        }

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        """``flops`` in G (the challenge's "FLOPs [G]", really G multiply-accumulates)."""
        return self.flops / 1e9

    @property
    def activations_m(self) -> float:
        return self.activations / 1e6


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def profile(model: nn.Module, input_size: Sequence[int] = (3, 256, 256), *, use_meta: bool = True) -> Profile:
    """Count parameters, FLOPs (MACs), activations and convs of ``model`` for one ``input_size`` image.

    The model is run once in eval mode without gradients; its own train/eval state, parameters and
    device are left untouched. With ``use_meta=True`` (default) the forward pass runs on a copy of
    the model on PyTorch's ``meta`` device, which only propagates shapes and takes milliseconds; a
    model that cannot run there (data-dependent control flow, custom kernels) is run for real on its
    own device instead, with a deterministic input in ``[0, model.input_range]``.

    >>> p = profile(torch.nn.Conv2d(3, 8, 3, padding=1), input_size=(3, 4, 4))
    >>> (p.params, p.flops, p.activations, p.convs)
    (224, 3456, 128, 1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = check_input_size(input_size)
    params = count_params(model)
    c = profile_macs(model, size, convention=CHALLENGE_CONVENTION, use_meta=use_meta, scale=lenient_range(model))
    return Profile(params=params, flops=c.macs, activations=c.activations, convs=c.convs, aten_flops=c.aten_flops,
                   input_size=size)


def format_table(profiles: Mapping[str, Profile]) -> str:
    """A plain-text table: model, params (exact, e.g. ``433,448``), params [M], FLOPs [G] (MACs), acts [M],
    convs, aten GFLOPs, input size.

    >>> print(format_table({"rfdn": Profile(433_448, 27_102_622_560, 112_034_240, 64, 54_067_296_768)}).splitlines()[2])
    rfdn   433,448       0.433      27.10    112.03     64        54.07  3x256x256
    """
    header = ("model", "params", "params [M]", "FLOPs [G]", "acts [M]", "convs", "aten GFLOPs", "input")
    rows = [header]
    for name, p in profiles.items():
        rows.append((
            str(name), f"{p.params:,}", f"{p.params / 1e6:.3f}", f"{p.flops / 1e9:.2f}", f"{p.activations / 1e6:.2f}",
            str(p.convs), f"{p.aten_flops / 1e9:.2f}", "x".join(str(v) for v in p.input_size),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("FLOPs = multiply-accumulates of Conv/Linear/activation/BN modules (NTIRE ESR convention); "
                 "aten GFLOPs = 2 x MACs of every aten conv/matmul.")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- runtime
def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _prepare_images(images: Sequence[Any], rng: float, device: torch.device, dtype: torch.dtype
                    ) -> list[torch.Tensor]:
    if isinstance(images, (np.ndarray, torch.Tensor)) or not isinstance(images, Sequence):
        raise TypeError("images must be a list of images (uint8 H x W x 3 arrays or float tensors)")
    if len(images) == 0:
        raise ValueError("images is empty: nothing to time")
    out = []
    for i, img in enumerate(images):
        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"images[{i}] must be uint8 H x W x 3, got {img.dtype} {img.shape}")
            t = torch.from_numpy(writable(img)).permute(2, 0, 1).unsqueeze(0).float()
            t = t * (rng / 255.0)
        elif isinstance(img, torch.Tensor):
            t = img.unsqueeze(0) if img.dim() == 3 else img
            if t.dim() != 4:
                raise ValueError(f"images[{i}] must be a C x H x W or N x C x H x W tensor, "
                                 f"got {tuple(img.shape)}")
        else:
            raise TypeError(f"images[{i}] must be a numpy array or a torch tensor, got {type(img).__name__}")
        out.append(t.to(device=device, dtype=dtype))
    return out


def runtime(model: nn.Module, images: Sequence[Any], device: str | torch.device | None = None,
            trials: int = 3, warmup: int = 2, tile: int | None = None, tile_overlap: int = 8
            ) -> dict[str, Any]:
    """Average inference time per image, best of ``trials`` passes over ``images``.

    ``images``: uint8 ``H x W x 3`` arrays (scaled to ``[0, model.input_range]``) or float tensors
    already in that range (``C x H x W`` or ``N x C x H x W``). They are moved to ``device`` before
    timing (transfers are not timed, as in the challenge). ``warmup`` untimed forward passes on the
    first image precede the trials. ``tile`` times tiled inference (see :mod:`effsr.inference`).

    Returns ``ms_per_image`` (best trial), ``trials_ms`` (each trial's per-image mean), ``device``,
    ``max_memory_mb`` (MiB: ``torch.cuda.max_memory_allocated`` on CUDA; peak process RSS on CPU,
    ``None`` where unavailable), ``memory_kind``, ``images``, ``tile``, ``tile_overlap``,
    ``tiles_per_image`` and, on CPU, ``threads``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    dev = resolve_device(device, model)
    net = on_device(model, dev)
    xs = _prepare_images(images, input_range(net), dev, model_dtype(net))
    cuda = dev.type == "cuda"

    def run(x: torch.Tensor) -> torch.Tensor:
        return forward(net, x, tile=tile, tile_overlap=tile_overlap)

    trials_ms: list[float] = []
    with eval_mode(net), torch.no_grad():
        for _ in range(warmup):
            run(xs[0])
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(trials):
            elapsed = 0.0
            for x in xs:
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    run(x)
                    end.record()
                    torch.cuda.synchronize(dev)
                    elapsed += start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    run(x)
                    elapsed += (time.perf_counter() - t0) * 1e3
            trials_ms.append(elapsed / len(xs))
    result: dict[str, Any] = {
        "ms_per_image": min(trials_ms),
        "trials_ms": trials_ms,
        "device": str(dev),
        "images": len(xs),
        "tile": tile,
        "tile_overlap": tile_overlap if tile is not None else None,
        "tiles_per_image": [tile_count(int(x.shape[-2]), int(x.shape[-1]), tile) for x in xs],
    }
    if cuda:
        result["max_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        result["memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        result["max_memory_mb"] = _peak_rss_mb()
        result["memory_kind"] = "process peak RSS (ru_maxrss)"
        result["threads"] = torch.get_num_threads()
    return result
