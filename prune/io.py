"""Save a pruned model as weights + pruning history (JSON); reload it without unpickling code.

``save`` writes the state_dict and, next to it in the same file, the pruning history as a JSON string
(``.safetensors``: in the header metadata; anything else: a ``torch.save`` dict of tensors and one
string). ``load`` builds the dependency graph of a *freshly built* network, replays the history
(torch-pruning's ``load_pruning_history``: the same groups, the same indices) and then loads the
weights with ``weights_only=True`` and ``strict=True``.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reparam.utils.io import atomic_write, write_safetensors

from .core import HISTORY_ATTR, INPUT_SHAPE_ATTR
from .graph import build_graph

__all__ = ["save", "load", "read_history", "FORMAT"]

FORMAT = "effsr.prune/1"
_KEY = "effsr_prune"


def _meta(model: nn.Module) -> dict[str, Any]:
    history = getattr(model, HISTORY_ATTR, None)
    if history is None:
        raise ValueError("model: no pruning history (prune it with prune.l2_filter_prune first, or use "
                         "torch.save(model.state_dict()) for an unpruned model)")
    shape = getattr(model, INPUT_SHAPE_ATTR, None)
    meta = {"format": FORMAT, "history": history, "example_input_shape": shape,
            "arch": getattr(model, "arch", None)}
    config = getattr(model, "config", None)
    if isinstance(config, dict):
        try:
            json.dumps(config)
            meta["config"] = config
        except TypeError:
            pass
    return meta


def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s weights and pruning history to ``path`` (``.safetensors`` or ``.pth``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = json.dumps(_meta(model))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if p.suffix == ".safetensors":
        write_safetensors(p, state, {_KEY: meta})
    else:
        atomic_write(p, lambda fh: torch.save({"state_dict": state, _KEY: meta}, fh))
    return p


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(_KEY)
        state = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or "state_dict" not in obj:
            raise ValueError(f"path: {path} is not a prune.save file (no 'state_dict')")
        meta, state = obj.get(_KEY), obj["state_dict"]
    if meta is None:
        raise ValueError(f"path: {path} has no pruning history (was it written by prune.save?)")
    info = json.loads(meta)
    if info.get("format") != FORMAT:
        raise ValueError(f"path: unsupported format {info.get('format')!r} (expected {FORMAT!r})")
    return state, info


def read_history(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of a saved pruned model (history, example input shape, arch, config)."""
    return _read(Path(path))[1]


def load(model: nn.Module, path: str | os.PathLike[str], example_inputs: torch.Tensor | None = None,
         inplace: bool = False) -> nn.Module:
    """Rebuild a pruned model: replay the saved history on ``model`` (a freshly built, unpruned
    network of the same architecture), then load the saved weights (``weights_only``, strict).

    ``example_inputs`` defaults to zeros of the shape used when pruning. Returns the pruned model (a
    copy of ``model`` unless ``inplace=True``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, HISTORY_ATTR, None):
        raise ValueError("model: already pruned; pass a freshly built (unpruned) network")
    state, info = _read(Path(path))
    if not inplace:
        model = copy.deepcopy(model)
    p = next((t for t in model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    if example_inputs is None:
        shape = info.get("example_input_shape")
        if not shape:
            raise ValueError("example_inputs: the file does not record an input shape; pass example_inputs")
        example_inputs = torch.zeros(shape, device=device, dtype=dtype)
    history = info["history"]
    if history:
        dg = build_graph(model, example_inputs.to(device))
        try:
            dg.load_pruning_history([[n, o, list(i)] for n, o, i in history])
        except AttributeError as e:
            raise ValueError(f"model: the pruning history does not match this network ({e})") from e
    model.load_state_dict(state, strict=True)
    setattr(model, HISTORY_ATTR, history)
    setattr(model, INPUT_SHAPE_ATTR, list(example_inputs.shape))
    return model
