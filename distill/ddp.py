"""Process-group helpers for running a distillation step under DistributedDataParallel.

Launch with ``torchrun --nproc_per_node N script.py``: :func:`init_from_env` reads ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` and initializes ``nccl`` (CUDA) or ``gloo`` (CPU). Without those
variables everything runs single-process and :func:`wrap` returns the module unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["DistContext", "init_from_env", "wrap", "unwrap", "cleanup", "flat_parameters", "same_on_all_ranks"]


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, the ``device`` it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _default_device(local_rank: int, backend: str | None) -> torch.device:
    if torch.cuda.is_available() and backend != "gloo":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(backend: str | None = None, device: str | torch.device | None = None,
                  timeout_s: float = 300.0) -> DistContext:
    """Join the process group described by torchrun's environment variables (or an existing one).

    ``backend`` defaults to ``nccl`` when CUDA is available, else ``gloo``. ``device`` defaults to
    ``cuda:LOCAL_RANK`` (nccl) or ``cpu``. Without ``WORLD_SIZE > 1`` in the environment and no initialized
    group, returns a single-process context.
    """
    if backend not in (None, "gloo", "nccl", "mpi"):
        raise ValueError(f"backend must be None, 'gloo', 'nccl' or 'mpi', got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this build")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        here = True
    else:
        dev = torch.device(device) if device is not None else _default_device(local_rank, backend)
        return DistContext(device=dev)
    dev = torch.device(device) if device is not None else _default_device(local_rank, backend)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, here)


def wrap(module: nn.Module, ctx: DistContext, **ddp_options: object) -> nn.Module:
    """``module`` in DDP when ``ctx`` is distributed, else ``module`` itself.

    ``find_unused_parameters`` is turned on only when the module reports ``unused_parameters`` (a Distiller
    whose loss does not reach every student parameter); otherwise every parameter (student and adapters)
    takes part in each step and DDP runs without the extra graph traversal.
    """
    if not ctx.distributed:
        return module
    options = dict(ddp_options)
    options.setdefault("find_unused_parameters", bool(getattr(module, "unused_parameters", [])))
    if ctx.device.type == "cuda":
        options.setdefault("device_ids", [ctx.device.index])
    return DDP(module, **options)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return module.module if isinstance(module, DDP) else module


def cleanup(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def flat_parameters(module: nn.Module) -> torch.Tensor:
    """All parameters of (the unwrapped) ``module`` as one float64 CPU vector, in ``named_parameters`` order."""
    params = [p.detach().reshape(-1).double().cpu() for _, p in unwrap(module).named_parameters()]
    return torch.cat(params) if params else torch.zeros(0, dtype=torch.float64)


def same_on_all_ranks(module: nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters (True when not distributed). A collective call."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    flat = flat_parameters(module)
    if dist.get_backend() == "nccl":
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)
