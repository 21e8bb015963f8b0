"""Users' own networks: name one by its file or module, build it, load its checkpoint, and :func:`wrap` it.

A network that is not in the zoo is named the way the NTIRE challenges receive one: a Python file (or an
importable module) that defines an ``nn.Module`` class or a factory, its constructor keyword arguments, a
checkpoint and the range of values it takes and returns::

    net = open_network("models/DIPNet.py:DIPNet", "DIPNet.pth", input_range=1.0)
    net = open_network("mypackage.archs:make_net", "net.pth", config={"width": 32}, input_range=255)

Code is imported only from the file or module named here, never from a checkpoint (checkpoints are read
with ``weights_only=True`` or as safetensors). :func:`wrap` gives any module what the pipeline needs:
``scale`` (measured from a forward on a small input, checked against the one given), ``input_range``
(required when the network declares none: a network fed the wrong range loses 6-10 dB without an error),
``arch``, ``config`` and, for networks built here, ``source`` -- where the code comes from, with the
SHA-256 of its file, so a student made from it can be rebuilt elsewhere and a changed file is detected.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
from numbers import Real
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from distill.ranges import declared_input_range

__all__ = ["check_config", "check_input_range", "NetworkSource", "parse_model", "is_user_spec", "build_network",
           "load_weights", "open_network", "wrap", "measure_scale", "source_of", "SOURCE_ATTR"]

#: Attribute of a network built by :func:`build_network` holding its :class:`NetworkSource` as a dict.
SOURCE_ATTR = "source"
#: LR sides of the probe forward that measures a network's scale (the first one that runs is used).
PROBE_SIZES = ((32, 40), (64, 64))
_SPEC = re.compile(r"^(?P<target>.+):(?P<attr>[A-Za-z_][A-Za-z0-9_]*)$")


@dataclasses.dataclass(frozen=True)
class NetworkSource:
    """Where a user's network comes from: ``kind`` ``"file"`` (``location`` an absolute path) or ``"module"``
    (``location`` a dotted module name), ``attr`` the class or factory in it, ``kwargs`` its arguments and
    ``sha256`` the hash of the file that defines it (None for a module without a file)."""

    kind: str
    location: str
    attr: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    sha256: str | None = None

    @property
    def spec(self) -> str:
        """The ``--model`` text that names this network: ``path.py:Class`` or ``package.module:factory``."""
        return f"{self.location}:{self.attr}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": self.location, "attr": self.attr, "kwargs": dict(self.kwargs),
                "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSource:
        if not isinstance(data, Mapping) or data.get("kind") not in ("file", "module"):
            raise ValueError(f"source: not a network source record: {data!r}")
        return cls(kind=str(data["kind"]), location=str(data["location"]), attr=str(data["attr"]),
                   kwargs=dict(data.get("kwargs") or {}), sha256=data.get("sha256"))


# ---------------------------------------------------------------------------------------------- naming
def is_user_spec(model: Any) -> bool:
    """Whether ``model`` names a user's network (``file.py:Name`` or ``package.module:name``), not a zoo name
    (zoo names have no ``:``; :func:`parse_model` says what is wrong with a malformed one)."""
    return isinstance(model, str) and ":" in model


def parse_model(model: str) -> tuple[str, str, str]:
    """``(kind, location, attr)`` of a ``--model`` text: ``path/to/file.py:Class`` -> ``("file", absolute path,
    "Class")``; ``package.module:factory`` -> ``("module", "package.module", "factory")``.

    ``ValueError`` naming ``model`` when the text has neither form or the file does not exist.
    """
    if not isinstance(model, str):
        raise TypeError(f"model must be a str, got {type(model).__name__}")
    match = _SPEC.match(model.strip())
    if match is None:
        raise ValueError(f"model: {model!r} is neither a zoo name nor 'path/to/file.py:Class' nor "
                         "'package.module:factory'")
    target, attr = match.group("target"), match.group("attr")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"model: no Python file at {target}")
        return "file", str(path.resolve()), attr
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", target):
        raise ValueError(f"model: {target!r} is not a Python file (.py) nor a dotted module name")
    return "module", target, attr


def _sha256(path: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_FILE_MODULES: dict[tuple[str, str], Any] = {}


def _import_file(path: str) -> Any:
    """Execute the Python file at ``path`` as a module (once per file content); its folder is importable
    while it runs, so the file may import its neighbours."""
    digest = _sha256(path)
    key = (path, digest)
    if key in _FILE_MODULES:
        return _FILE_MODULES[key]
    name = f"effsr_user_{re.sub(r'[^0-9A-Za-z_]', '_', Path(path).stem)}_{digest[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"model: cannot import {path} as Python code")
    module = importlib.util.module_from_spec(spec)
    folder = str(Path(path).parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    sys.modules[name] = module  # dataclasses, pickling and typing look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's code: one line naming the file
        sys.modules.pop(name, None)
        raise ValueError(f"model: importing {path} failed: {type(err).__name__}: {err}") from err
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    _FILE_MODULES[key] = module
    return module


def _import(kind: str, location: str) -> Any:
    if kind == "file":
        return _import_file(location)
    try:
        return importlib.import_module(location)
    except Exception as err:  # noqa: BLE001 - ModuleNotFoundError or the module's own failure
        raise ValueError(f"model: cannot import module {location!r}: {type(err).__name__}: {err}") from err


def _module_sha(kind: str, location: str, module: Any) -> str | None:
    if kind == "file":
        return _sha256(location)
    file = getattr(module, "__file__", None)
    return _sha256(file) if file and Path(file).is_file() else None


def check_config(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as err:
            raise ValueError(f"config: not valid JSON ({err})") from None
    if not isinstance(config, Mapping) or not all(isinstance(k, str) for k in config):
        raise TypeError(f"config must be a JSON object of keyword arguments, got {type(config).__name__}")
    try:
        json.dumps(dict(config))
    except TypeError as err:
        raise TypeError(f"config must hold plain JSON values ({err})") from None
    return dict(config)


def _instantiate(obj: Any, kwargs: dict[str, Any], where: str) -> nn.Module:
    if not callable(obj):
        raise TypeError(f"model: {where} is a {type(obj).__name__}, not an nn.Module class or a factory")
    if inspect.isclass(obj) and not issubclass(obj, nn.Module):
        raise TypeError(f"model: {where} is a class but not a torch.nn.Module")
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as err:
        raise TypeError(f"config: {where} rejects the arguments {sorted(kwargs)}: {err}") from None
    except ValueError:  # no signature (a builtin): let the call tell
        pass
    try:
        with torch.device("cpu"):
            net = obj(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's constructor: one line naming it
        raise ValueError(f"model: {where}({_kwargs_text(kwargs)}) failed: {type(err).__name__}: {err}") from err
    if not isinstance(net, nn.Module):
        raise TypeError(f"model: {where} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def build_network(model: str, config: Mapping[str, Any] | str | None = None, *,
                  expect_sha256: str | None = None) -> nn.Module:
    """A fresh instance of the user's network named by ``model`` (``file.py:Class`` or ``module:factory``),
    called with the keyword arguments ``config``; it carries ``source`` (a :class:`NetworkSource` dict),
    ``arch`` (the class or factory name) and ``config``. Not wrapped: see :func:`wrap`.

    ``expect_sha256``: the hash the defining file must have (a student rebuilt from its recipe);
    ``ValueError`` naming the file when it changed.
    """
    kind, location, attr = parse_model(model)
    kwargs = check_config(config)
    if kind == "file" and expect_sha256 is not None:
        found = _sha256(location)
        if found != expect_sha256:
            raise ValueError(f"model: {location} changed since the network was saved (SHA-256 {found[:12]}..., "
                             f"recorded {expect_sha256[:12]}...); restore that file or name the original one")
    module = _import(kind, location)
    if not hasattr(module, attr):
        defined = sorted(n for n, v in vars(module).items()
                         if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
        raise ValueError(f"model: {location} defines no {attr!r} (nn.Module classes there: "
                         f"{', '.join(defined) or 'none'})")
    sha = _module_sha(kind, location, module)
    if kind == "module" and expect_sha256 is not None and sha != expect_sha256:
        raise ValueError(f"model: module {location} changed since the network was saved (SHA-256 of its file "
                         f"differs); restore it or name the original one")
    net = _instantiate(getattr(module, attr), kwargs, f"{Path(location).name}:{attr}" if kind == "file"
                       else f"{location}:{attr}")
    source = NetworkSource(kind, location, attr, kwargs, sha)
    _set(net, SOURCE_ATTR, source.to_dict())
    _set(net, "arch", attr)
    _set(net, "config", dict(kwargs))
    return net


def source_of(model: nn.Module) -> NetworkSource | None:
    """The :class:`NetworkSource` of a network built by :func:`build_network`, or None (zoo networks)."""
    data = getattr(model, SOURCE_ATTR, None)
    return NetworkSource.from_dict(data) if isinstance(data, Mapping) else None


def _set(net: nn.Module, name: str, value: Any) -> None:
    """Set a plain attribute; ``ValueError`` when the network already uses the name for a submodule,
    parameter or buffer (the pipeline's attribute would shadow or break it)."""
    _set_check(net, name)
    setattr(net, name, value)


def _set_check(net: nn.Module, name: str) -> None:
    if name in net._modules or name in net._parameters or name in net._buffers:
        raise ValueError(f"model: {type(net).__name__}.{name} is a submodule/parameter/buffer of the network; "
                         f"effsr needs that attribute name for the network's {name}")


# --------------------------------------------------------------------------------------------- weights
def load_weights(net: nn.Module, path: str | os.PathLike[str], key: str | None = None) -> str | None:
    """Load the checkpoint at ``path`` into ``net`` strictly (``weights_only=True`` or safetensors); returns the
    wrapper key the state_dict was found under (``params_ema``, ``params``, ``state_dict``, ... found
    automatically, or ``key``), or None for a plain state_dict. ``CheckpointMismatchError`` (a ``ValueError``)
    names missing/unexpected keys and shape mismatches."""
    from .registry import check_state_dict, read_state_dict_with_key

    sd, found = read_state_dict_with_key(path, key=key)
    check_state_dict(net, sd, source=f"checkpoint {os.fspath(path)!r}" + (f" [{found!r}]" if found else ""))
    net.load_state_dict(sd, strict=True)
    return found


# ----------------------------------------------------------------------------------------------- wrap
def check_input_range(value: Any, name: str = "input_range") -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number (1.0 or 255.0, the range the network takes and returns), "
                        f"got {type(value).__name__}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def measure_scale(net: nn.Module, input_range: float = 1.0) -> int:
    """The upscaling factor of ``net``, from one forward on a small random input (eval mode, no gradients,
    on the network's device and dtype; its train/eval state is restored). ``ValueError`` naming the network
    when it cannot run, does not return ``N x 3 x sH x sW`` or scales H and W differently."""
    param = next(iter(net.parameters()), None)
    dev = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    flags = {m: m.training for m in net.modules()}
    gen = torch.Generator().manual_seed(0)
    errors = []
    try:
        net.eval()
        for h, w in PROBE_SIZES:
            x = (torch.rand(1, 3, h, w, generator=gen) * input_range).to(dev, dtype)
            try:
                with torch.no_grad():
                    y = net(x)
            except Exception as err:  # noqa: BLE001 - the user's forward; try a larger probe, then say why
                errors.append(f"{h}x{w}: {type(err).__name__}: {err}")
                continue
            if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.shape[:2] != (1, 3):
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"model: {type(net).__name__} maps a 1x3x{h}x{w} input to {got}; an SR network "
                                 "must return one N x 3 x sH x sW tensor")
            sh, sw = y.shape[2] / h, y.shape[3] / w
            if sh != sw or sh != int(sh) or sh < 1:
                raise ValueError(f"model: {type(net).__name__} maps {h}x{w} to {y.shape[2]}x{y.shape[3]}: "
                                 "not one integer scale for H and W")
            return int(sh)
    finally:
        for m, t in flags.items():
            m.training = t
    raise ValueError(f"model: {type(net).__name__} cannot run a forward on a small RGB input ("
                     + "; ".join(errors)[:400] + ")")


def wrap(module: nn.Module, *, input_range: float | None = None, scale: int | None = None,
         arch: str | None = None) -> nn.Module:
    """Give ``module`` (in place; returned) what effsr's evaluation, shrink and export need: ``input_range``,
    ``scale``, ``arch`` and ``config``.

    ``input_range``: the range of values the network takes and returns (``1.0`` or ``255.0``); required
    unless the module declares one, and an error when it declares another. ``scale``: measured with
    :func:`measure_scale`; when given, it must equal the measured one. ``arch``: a display name (default:
    the class name). The module's weights, state_dict keys and forward are untouched.

    >>> net = wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, padding=1), torch.nn.PixelShuffle(2)),
    ...            input_range=1.0)
    >>> (net.scale, net.input_range, net.arch)
    (2, 1.0, 'Sequential')
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    declared = declared_input_range(module)
    if input_range is None:
        if declared is None:
            raise ValueError(f"input_range: {type(module).__name__} declares no input range; give the range "
                             "it takes and returns (1.0 or 255.0; --input-range on the command line)")
        rng = declared
    else:
        rng = check_input_range(input_range)
        if declared is not None and declared != rng:
            raise ValueError(f"input_range: {type(module).__name__} declares input_range={declared}, "
                             f"not {input_range}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 1):
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    for name in ("input_range", "scale", "arch", "config"):
        _set_check(module, name)
    measured = measure_scale(module, rng)
    if scale is not None and scale != measured:
        raise ValueError(f"scale: {type(module).__name__} upscales x{measured}, not x{scale}")
    own = getattr(module, "scale", None)
    if own is not None and own != measured:
        raise ValueError(f"scale: {type(module).__name__}.scale is {own!r} but the network upscales "
                         f"x{measured}; effsr needs that attribute name for the upscaling factor")
    if arch is not None and not isinstance(arch, str):
        raise TypeError(f"arch must be a str, got {type(arch).__name__}")
    _set(module, "input_range", rng)
    _set(module, "scale", measured)
    _set(module, "arch", arch or getattr(module, "arch", None) or type(module).__name__)
    if not isinstance(getattr(module, "config", None), dict):
        _set(module, "config", {})
    return module


def open_network(model: str, weights: str | os.PathLike[str] | None = None, *,
                 config: Mapping[str, Any] | str | None = None, input_range: float | None = None,
                 scale: int | None = None, weights_key: str | None = None,
                 expect_sha256: str | None = None) -> nn.Module:
    """Build the user's network ``model`` with ``config``, load ``weights`` (if given) strictly, and
    :func:`wrap` it; in eval mode on the CPU. The wrapper key of the checkpoint is kept as
    ``weights_key`` on the network."""
    net = build_network(model, config, expect_sha256=expect_sha256)
    if weights is not None:
        found = load_weights(net, weights, key=weights_key)
        net.weights_key = found
    elif weights_key is not None:
        raise ValueError("weights_key: given without weights")
    return wrap(net.eval(), input_range=input_range, scale=scale)
