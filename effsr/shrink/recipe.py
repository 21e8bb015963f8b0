"""Recipes: rebuild a shrunk student (repify -> prune -> fuse -> Tucker) without pickles.

A student produced by ``effsr shrink`` no longer has the architecture ``effsr.models.build(name)`` makes:
its convs may be rep blocks, pruned, fused and Tucker-decomposed. Its *recipe* is a JSON object that
replays those steps on a freshly built network, so the weights (a plain safetensors file) load strictly::

    {"format": "effsr.shrink/1", "arch": "rfdn", "config": {...build kwargs...},
     "ops": [{"op": "repify", "block": "ecb", "options": {}},
             {"op": "prune", "history": [[layer, is_out, [indices]], ...], "input_shape": [1, 3, 32, 32]},
             {"op": "fuse"},
             {"op": "tucker", "ranks": {"B1.c1_r": [r_out, r_in], ...}}]}

The recipe is stored as the string metadata ``effsr_recipe`` of the safetensors file (and beside it as
``<name>.recipe.json``). :func:`load_student` reads both back: weights with ``safetensors.torch.load_file``,
``strict=True``.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from reparam.utils.io import write_json, write_safetensors
from reparam.utils.modules import replace_module

__all__ = [
    "FORMAT", "METADATA_KEY", "new_recipe", "add_op", "build_from_recipe", "save_student", "load_student",
    "read_recipe", "has_recipe", "tucker_ranks", "load_hook", "recipe_for",
]

FORMAT = "effsr.shrink/1"
#: safetensors metadata key holding the recipe JSON.
METADATA_KEY = "effsr_recipe"
OPS = ("repify", "prune", "fuse", "tucker")


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(config)
    try:
        json.dumps(out)
    except TypeError as err:
        raise ValueError(f"config: not JSON-serializable ({err}); recipes need plain values") from None
    return out


def new_recipe(arch: str, config: Mapping[str, Any], source: Mapping[str, Any] | None = None,
               input_range: float | None = None, scale: int | None = None) -> dict[str, Any]:
    """A recipe with no ops: ``effsr.models.build(arch, **config)``, or, with ``source`` (a user's network,
    :class:`effsr.models.NetworkSource` as a dict), that network built from its file or module with its
    ``input_range`` and ``scale``."""
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be a network name, got {arch!r}")
    recipe: dict[str, Any] = {"format": FORMAT, "arch": arch, "config": _plain_config(config), "ops": []}
    if source is not None:
        from effsr.models.user import NetworkSource

        if input_range is None or scale is None:
            raise ValueError("input_range and scale are required with source")
        recipe.update(source=NetworkSource.from_dict(source).to_dict(), input_range=float(input_range),
                      scale=int(scale))
    return recipe


def recipe_for(model: nn.Module) -> dict[str, Any]:
    """The recipe with no ops of a zoo network or a user's network built by :func:`effsr.models.open_model`."""
    from effsr.models.user import source_of

    src = source_of(model)
    config = dict(getattr(model, "config", {}) or {})
    if src is None:
        return new_recipe(model.arch, config)
    return new_recipe(model.arch, src.kwargs, source=src.to_dict(), input_range=float(model.input_range),
                      scale=int(model.scale))


def add_op(recipe: Mapping[str, Any], op: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``recipe`` with ``op`` appended (``recipe`` is not changed)."""
    if op.get("op") not in OPS:
        raise ValueError(f"op: unknown recipe op {op.get('op')!r}; known: {OPS}")
    out = copy.deepcopy(dict(recipe))
    out["ops"] = list(out["ops"]) + [json.loads(json.dumps(dict(op)))]
    return out


def _check_recipe(recipe: Any) -> dict[str, Any]:
    if isinstance(recipe, str):
        recipe = json.loads(recipe)
    if not isinstance(recipe, Mapping):
        raise TypeError(f"recipe must be a dict or a JSON string, got {type(recipe).__name__}")
    if recipe.get("format") != FORMAT:
        raise ValueError(f"recipe: unsupported format {recipe.get('format')!r} (expected {FORMAT!r})")
    for key in ("arch", "config", "ops"):
        if key not in recipe:
            raise ValueError(f"recipe: missing key {key!r}")
    if "source" in recipe and ("input_range" not in recipe or "scale" not in recipe):
        raise ValueError("recipe: a recipe with a source needs input_range and scale")
    for i, op in enumerate(recipe["ops"]):
        if not isinstance(op, Mapping) or op.get("op") not in OPS:
            raise ValueError(f"recipe: ops[{i}] is not one of {OPS}: {op!r}")
    return dict(recipe)


def _tucker_shell(conv: nn.Conv2d, r_out: int, r_in: int) -> nn.Module:
    """An (uninitialised) :class:`decompose.TuckerConv` of the shape Tucker-2 gives ``conv`` at these ranks."""
    from decompose import TuckerConv

    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"recipe: Tucker layer is a {type(conv).__name__}, expected nn.Conv2d")
    kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False, **kw)
    mid = nn.Conv2d(r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **kw)
    last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None, **kw)
    seq = TuckerConv(first, mid, last)
    seq.train(conv.training)
    return seq


def tucker_ranks(model: nn.Module) -> dict[str, list[int]]:
    """``{layer name: [r_out, r_in]}`` of every :class:`decompose.TuckerConv` in ``model``."""
    from decompose import TuckerConv

    return {n: list(m.ranks) for n, m in model.named_modules() if n and isinstance(m, TuckerConv)}


def _replay(model: nn.Module, op: Mapping[str, Any]) -> nn.Module:
    kind = op["op"]
    if kind == "repify":
        from effsr.models.conv import apply_conv

        spec = {"block": op["block"], **dict(op.get("options") or {})}
        if op.get("include"):
            spec["include"] = op["include"]
        return apply_conv(model, spec, pretrained=False)
    if kind == "prune":
        from prune import HISTORY_ATTR, build_graph
        from prune.core import INPUT_SHAPE_ATTR

        history = [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in op["history"]]
        shape = [int(v) for v in op["input_shape"]]
        if history:
            dev = next((p.device for p in model.parameters()), torch.device("cpu"))
            dg = build_graph(model, torch.zeros(shape, device=dev))
            try:
                dg.load_pruning_history(history)
            except (AttributeError, KeyError) as err:
                raise ValueError(f"recipe: the pruning history does not match this network ({err})") from err
        setattr(model, HISTORY_ATTR, list(getattr(model, HISTORY_ATTR, []) or []) + history)
        setattr(model, INPUT_SHAPE_ATTR, shape)
        return model
    if kind == "fuse":
        import reparam

        return reparam.fuse_all(model, inplace=True)
    if kind == "tucker":
        for name, (r_out, r_in) in op["ranks"].items():
            replace_module(model, name, _tucker_shell(model.get_submodule(name), int(r_out), int(r_in)))
        return model
    raise ValueError(f"recipe: unknown op {kind!r}")  # pragma: no cover - _check_recipe rejects it


def _build_source(recipe: Mapping[str, Any], location: str | None) -> nn.Module:
    """The user's network a recipe starts from, from its recorded file/module (or ``location``, a
    ``file.py:Class`` naming where that code is now); its SHA-256 must match the recorded one."""
    from effsr.models.user import NetworkSource, build_network, parse_model

    src = NetworkSource.from_dict(recipe["source"])
    spec = src.spec
    if location is not None:
        kind, where, attr = parse_model(location)
        if attr != src.attr:
            raise ValueError(f"model: the student was made from {src.attr!r}, not {attr!r}")
        spec = f"{where}:{attr}"
    elif src.kind == "file" and not os.path.isfile(src.location):
        raise ValueError(f"model: the student's network code {src.location} is not there any more; name where "
                         f"it is now with --model NEW/PATH.py:{src.attr}")
    return build_network(spec, src.kwargs, expect_sha256=src.sha256)


def build_from_recipe(recipe: Mapping[str, Any] | str, location: str | None = None) -> nn.Module:
    """A freshly built network with the recipe's ops replayed (random weights; load a state_dict next).

    The result carries ``recipe`` as an attribute, besides ``arch``/``scale``/``input_range``/``config``.
    ``location``: for a recipe of a user's network, ``path/to/file.py:Class`` where its code is now.
    """
    from effsr import models

    recipe = _check_recipe(recipe)
    torch_state = torch.random.get_rng_state()
    try:  # building initialises weights: do not disturb the caller's RNG stream
        if "source" in recipe:
            model = _build_source(recipe, location)
        else:
            model = models.build(recipe["arch"], **recipe["config"])
        for op in recipe["ops"]:
            model = _replay(model, op)
        if "source" in recipe:
            model = models.wrap(model, input_range=float(recipe["input_range"]), scale=int(recipe["scale"]))
    finally:
        torch.random.set_rng_state(torch_state)
    model.recipe = copy.deepcopy(recipe)
    return model


def _prune_meta(recipe: Mapping[str, Any]) -> str | None:
    """The ``effsr_prune`` metadata of :mod:`prune.io` for the recipe's pruning history (None if unpruned)."""
    from prune.io import FORMAT as PRUNE_FORMAT

    prunes = [op for op in recipe["ops"] if op["op"] == "prune"]
    if not prunes:
        return None
    history = [h for op in prunes for h in op["history"]]
    return json.dumps({"format": PRUNE_FORMAT, "history": history, "example_input_shape": prunes[-1]["input_shape"],
                       "arch": recipe["arch"], "config": recipe["config"]})


def save_student(model: nn.Module, recipe: Mapping[str, Any], path: str | os.PathLike[str],
                 extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model``'s weights with ``recipe`` (and the pruning history) in the metadata, atomically.

    Also writes ``<path without suffix>.recipe.json``. Returns ``path``.
    """
    recipe = _check_recipe(dict(recipe))
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {METADATA_KEY: json.dumps(recipe)}
    prune_meta = _prune_meta(recipe)
    if prune_meta is not None:
        meta["effsr_prune"] = prune_meta
    meta.update(dict(extra_metadata or {}))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_safetensors(path, state, meta)
    side = path.with_name(path.name[: -len(".safetensors")] + ".recipe.json")
    write_json(side, recipe)
    return path


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The recipe stored in a safetensors file's metadata, or None if it has none."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as err:  # noqa: BLE001 - SafetensorError (truncated/corrupt), OSError: re-raised with the path
        raise ValueError(f"path: cannot read {path} as a safetensors file (truncated or corrupt?): {err}") from err
    return _check_recipe(text) if text is not None else None


def has_recipe(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_student`."""
    try:
        return read_recipe(path) is not None
    except Exception:  # noqa: BLE001 - unreadable or foreign file: not ours
        return False


def load_hook(name: str | None, path: str | os.PathLike[str]) -> nn.Module | None:
    """For ``effsr.models.load(name, path)`` / ``open_model``: the shrunk student at ``path`` if the file has a
    recipe, else None. ``name`` None accepts any student; a ``file.py:Class`` name is where the student's
    network code is now (see :func:`build_from_recipe`).

    Raises ``ValueError`` when the student's architecture is not ``name``.
    """
    from effsr.models.user import is_user_spec

    if not has_recipe(path):
        return None
    location = name if is_user_spec(name) else None
    model = load_student(path, location=location)
    if name is None or location is not None:
        return model
    if not isinstance(name, str) or model.arch != name.lower():
        raise ValueError(f"name: {os.fspath(path)} holds a shrunk {model.arch!r} network (effsr shrink "
                         f"student), not {name!r}; load it with name={model.arch!r}")
    return model



def load_student(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                 location: str | None = None) -> nn.Module:
    """Rebuild the student saved at ``path`` (recipe replay + strict weight loading), in eval mode.
    ``location``: see :func:`build_from_recipe`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {path}")
    recipe = read_recipe(path)
    if recipe is None:
        raise ValueError(f"path: {path} has no '{METADATA_KEY}' metadata (not written by effsr shrink)")
    model = build_from_recipe(recipe, location)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - header readable but the tensors are cut off
        raise ValueError(f"path: cannot read the tensors of {path} (truncated or corrupt?): {err}") from err
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
