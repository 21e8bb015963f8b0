"""``build`` / ``load`` / ``names``: the registry of networks and checkpoint loading."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ._common import SRNet
from .conv import apply_conv, normalize_conv
from .fmen import FMEN
from .imdn import IMDN
from .rfdn import RFDN, RFDNPruned
from .rlfn import RLFN

__all__ = ["NETWORKS", "names", "build", "load", "read_state_dict", "check_state_dict", "CheckpointMismatchError",
           "LOADERS", "LAZY_LOADERS", "register_loader", "loaders_for", "read_state_dict_with_key"]

NETWORKS: dict[str, type[SRNet]] = {
    "rfdn": RFDN,
    "rfdn_pruned": RFDNPruned,
    "rlfn": RLFN,
    "fmen": FMEN,
    "imdn": IMDN,
}

#: File loaders :func:`load` asks first, in order: ``loader(name, path) -> network or None`` (None: "not
#: mine"). :func:`register_loader` adds one; this module imports none of them.
LOADERS: list[Callable[[str, "str | os.PathLike[str]"], "nn.Module | None"]] = []

#: Loaders imported on first use, keyed by the safetensors metadata key that marks the files they read:
#: ``key -> "module:function"``. A file without such a key never imports its loader, so loading a zoo
#: checkpoint does not load the shrink pipeline. ``effsr_recipe`` marks a student written by ``effsr shrink``.
LAZY_LOADERS: dict[str, str] = {"effsr_recipe": "effsr.shrink.recipe:load_hook"}


def register_loader(loader: Callable[[str, "str | os.PathLike[str]"], "nn.Module | None"]
                    ) -> Callable[[str, "str | os.PathLike[str]"], "nn.Module | None"]:
    """Add ``loader(name, path) -> network | None`` to :data:`LOADERS` (once); returns it (a decorator)."""
    if not callable(loader):
        raise TypeError(f"loader must be callable, got {type(loader).__name__}")
    if loader not in LOADERS:
        LOADERS.append(loader)
    return loader


def _metadata_keys(path: str | os.PathLike[str]) -> set[str]:
    """The metadata keys of a safetensors file (its JSON header only); empty for any other or unreadable file."""
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return set()
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            return set(f.metadata() or {})
    except Exception:  # noqa: BLE001 - truncated or foreign file: no loader claims it, read_state_dict reports it
        return set()


def loaders_for(path: str | os.PathLike[str]
                ) -> list[Callable[[str, "str | os.PathLike[str]"], "nn.Module | None"]]:
    """The loaders to ask for ``path``: those of :data:`LAZY_LOADERS` whose key the file carries (imported
    now), then :data:`LOADERS`."""
    import importlib

    found = []
    keys = _metadata_keys(path) if LAZY_LOADERS else set()
    for key, ref in LAZY_LOADERS.items():
        if key in keys:
            module, _, attr = ref.partition(":")
            found.append(getattr(importlib.import_module(module), attr))
    return list(dict.fromkeys([*found, *LOADERS]))


#: Wrapper keys some training frameworks put around a state_dict (BasicSR, KAIR, Lightning, ...).
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model_state_dict", "model", "net")


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not fit the network it is loaded into (missing/unexpected keys, shapes)."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatches = shape_mismatches


def names() -> list[str]:
    """The network names :func:`build` and :func:`load` accept."""
    return list(NETWORKS)


def _network(name: Any) -> type[SRNet]:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in NETWORKS:
        raise ValueError(f"name: unknown network {name!r}; choose from {names()}")
    return NETWORKS[key]


def build(name: str, conv: Any = "conv", **config: Any) -> SRNet:
    """A freshly initialised network (training mode).

    ``name``: one of :func:`names`. ``conv``: ``"conv"`` (plain 3x3 convs, the deploy form), a block name
    (``"ecb"``, ``"rrrb"``, ...) or a dict ``{"block": ..., "include": ..., **options}`` -- see
    :mod:`effsr.models.conv`. ``config``: the network's width/depth arguments (``nf``, ``num_blocks``, ...);
    defaults reproduce the official checkpoints. ``build(m.arch, **m.config)`` rebuilds a network ``m``.
    """
    cls = _network(name)
    spec = normalize_conv(conv)
    try:
        model = cls(**config)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            import inspect
            allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
            bad = sorted(set(config) - set(allowed))
            raise TypeError(f"{cls.arch}: unknown config argument(s) {bad}; accepted: {allowed + ['conv']}") from None
        raise
    apply_conv(model, spec)
    model.config["conv"] = spec if isinstance(spec, str) else (dict(spec) if isinstance(spec, dict) else spec)
    return model


def read_state_dict(path: str | os.PathLike[str], key: str | None = None) -> dict[str, Tensor]:
    """The tensors of a ``.pth``/``.pt`` (``torch.load(..., weights_only=True)``) or ``.safetensors`` file.

    A wrapper dict (``{"params_ema": sd, "params": sd}``, ``{"state_dict": sd}``, ...) is unwrapped: ``key``
    chooses the entry, else the first of :data:`WRAPPER_KEYS` it holds. A ``module.`` prefix shared by
    every key (``DataParallel``) is stripped.
    """
    return read_state_dict_with_key(path, key)[0]


def read_state_dict_with_key(path: str | os.PathLike[str], key: str | None = None
                             ) -> tuple[dict[str, Tensor], str | None]:
    """:func:`read_state_dict` and the wrapper key it was found under (None: a plain state_dict)."""
    if key is not None and (not isinstance(key, str) or not key):
        raise TypeError(f"key must be a non-empty str, got {key!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - SafetensorError (truncated/corrupt), OSError: re-raised with the path
            raise ValueError(f"path: cannot read {path} as a safetensors file (truncated or corrupt?): "
                             f"{err}") from err
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the path and the reason
            raise ValueError(f"path: cannot read {path} as a weights-only torch checkpoint: {err}") from err
    found = None
    if key is not None:
        if not isinstance(obj, Mapping) or not isinstance(obj.get(key), Mapping):
            keys = [str(k) for k, v in obj.items() if isinstance(v, Mapping)] if isinstance(obj, Mapping) else []
            raise ValueError(f"key: {path} has no state_dict under {key!r} (dict entries: "
                             f"{', '.join(keys) or 'none'})")
        obj, found = obj[key], key
    elif isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for name in WRAPPER_KEYS:
            if isinstance(obj.get(name), Mapping):
                obj, found = obj[name], name
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"path: {path} does not hold a state_dict (a mapping of names to tensors)"
                         + ("" if key else "; name its key with --weights-key / weights_key="))
    sd = {str(k): v for k, v in obj.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, found


def _listing(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


@functools.lru_cache(maxsize=None)
def _default_shapes(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return {k: tuple(v.shape) for k, v in NETWORKS[name]().state_dict().items()}


def _guess(sd: Mapping[str, Tensor]) -> str | None:
    """The name of the default network whose state_dict has exactly these keys and shapes, if any."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    return next((name for name in NETWORKS if _default_shapes(name) == shapes), None)


Diff = tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]


def _diff(model: nn.Module, state_dict: Mapping[str, Tensor]) -> Diff:
    """(missing keys, unexpected keys, [(key, checkpoint shape, model shape)])."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def _error(model: nn.Module, state_dict: Mapping[str, Tensor], source: str, diff: Diff,
           note: str = "") -> CheckpointMismatchError:
    missing, unexpected, shapes = diff
    arch = getattr(model, "arch", type(model).__name__)
    lines = [f"{source} does not match {arch!r} with config {getattr(model, 'config', {})}:"]
    if missing:
        lines.append(f"  {len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if shapes:
        lines.append(f"  {len(shapes)} shape mismatch(es): "
                     + _listing([f"{k} checkpoint {a} vs model {b}" for k, a, b in shapes], 8))
    guess = _guess(state_dict)
    if guess is not None and guess != arch:
        lines.append(f"  the checkpoint looks like the official {guess!r} network: load({guess!r}, path)")
    elif guess == arch:
        lines.append(f"  the checkpoint fits the default {arch!r} architecture: load({arch!r}, path) without config")
    if note:
        lines.append(f"  {note}")
    return CheckpointMismatchError("\n".join(lines), missing, unexpected, shapes)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming missing/unexpected keys and shape mismatches."""
    diff = _diff(model, state_dict)
    if any(diff):
        raise _error(model, state_dict, source, diff)


def load(name: str, path: str | os.PathLike[str], **config: Any) -> SRNet:
    """``build(name, **config)`` with the weights of ``path`` loaded strictly, in eval mode, on the CPU.

    ``path``: a ``.pth``/``.pt`` state_dict (read with ``weights_only=True``) or a ``.safetensors`` file.
    With a block ``conv=`` (``load("rfdn", path, conv="ecb")``) the checkpoint may be in that training
    form, or in deploy form (plain convs): then every block is set to compute exactly the plain conv it
    replaces (``Block.from_conv``), so the network equals the deploy one and can be fine-tuned
    over-parameterized. A checkpoint for another architecture or config raises
    :class:`CheckpointMismatchError` (a ``ValueError``) naming the missing and unexpected keys and the
    shape mismatches.
    """
    for loader in loaders_for(path):  # e.g. a student written by `effsr shrink` (its recipe in the file's metadata)
        special = loader(name, path)
        if special is not None:
            if config:
                raise ValueError(f"config: {os.fspath(path)} carries its own architecture (read by "
                                 f"{getattr(loader, '__module__', '?')}); pass no config")
            return special
    model = build(name, **config)
    sd = read_state_dict(path)
    source = f"checkpoint {os.fspath(path)!r}"
    diff = _diff(model, sd)
    spec = model.config["conv"]
    if any(diff) and spec != "conv":
        plain = build(name, **{**config, "conv": "conv"})
        plain_diff = _diff(plain, sd)
        if not any(plain_diff):  # deploy-form checkpoint: load it plain, then make the slots equal blocks
            plain.load_state_dict(sd, strict=True)
            model = apply_conv(plain, spec, pretrained=True)
            model.config["conv"] = spec
            return model.eval()
        if sum(map(len, plain_diff)) < sum(map(len, diff)):  # report against the form it resembles
            raise _error(plain, sd, source, plain_diff,
                         note=f"(tried both the conv={spec!r} form and the deploy form with plain convs)")
    if any(diff):
        raise _error(model, sd, source, diff)
    model.load_state_dict(sd, strict=True)
    return model.eval()
