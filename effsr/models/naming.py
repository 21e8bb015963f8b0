"""``open``: one way to name a network for every command and the API.

``model`` is a zoo name (:func:`effsr.models.names`), a user's network (``path/to/file.py:Class`` or
``package.module:factory``, see :mod:`effsr.models.user`), or None when ``weights`` is a student written by
``effsr shrink`` (it carries its recipe and the source of its network).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from torch import nn

from distill.ranges import declared_input_range

from .registry import build, load, loaders_for, names
from .user import check_config, check_input_range, is_user_spec, open_network

__all__ = ["open_model"]


def _check_declared(net: nn.Module, input_range: Any, scale: Any, what: str) -> nn.Module:
    """``ValueError`` when a given ``input_range``/``scale`` differs from what ``net`` declares."""
    if input_range is not None:
        rng = check_input_range(input_range)
        declared = declared_input_range(net)
        if declared is not None and declared != rng:
            raise ValueError(f"input_range: {what} takes [0, {net.input_range:g}], not [0, {rng:g}]")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive int, got {scale!r}")
        if getattr(net, "scale", scale) != scale:
            raise ValueError(f"scale: {what} upscales x{net.scale}, not x{scale}")
    return net


def open_model(model: str | None, weights: str | os.PathLike[str] | None = None, *,
               config: Mapping[str, Any] | str | None = None, input_range: float | None = None,
               scale: int | None = None, weights_key: str | None = None) -> nn.Module:
    """The network named by ``model`` with the checkpoint ``weights`` loaded strictly, in eval mode on the CPU.

    * a zoo name: ``effsr.models.load(model, weights, **config)`` (``build`` without weights);
    * ``path/to/file.py:Class`` or ``package.module:factory``: the user's network, built with the keyword
      arguments ``config``, loaded (the checkpoint's wrapper key found automatically, or ``weights_key``)
      and wrapped (:func:`effsr.models.wrap`): ``input_range`` is required unless the network declares one;
      ``scale`` is measured and checked against the one given;
    * None: ``weights`` must be a student file written by ``effsr shrink``, rebuilt from its recipe.

    A student file given as ``weights`` is rebuilt from its recipe whatever ``model`` says, as long as
    ``model`` names its network (a user's network may be named at a new location: its file's SHA-256 must
    still match). ``input_range``/``scale`` given for a network that declares others raise ``ValueError``.
    """
    if model is not None and not isinstance(model, str):
        raise TypeError(f"model must be a str or None, got {type(model).__name__}")
    if weights is not None:
        for loader in loaders_for(weights):  # a student written by effsr shrink (its recipe in the file's metadata)
            special = loader(model, weights)
            if special is not None:
                if config:
                    raise ValueError(f"config: {os.fspath(weights)} carries its own architecture; pass no config")
                if weights_key is not None:
                    raise ValueError(f"weights_key: {os.fspath(weights)} is a student file, not a wrapped checkpoint")
                return _check_declared(special, input_range, scale, f"the student in {os.fspath(weights)}")
    if model is None:
        raise ValueError("model: name the network (a zoo name, 'path/to/file.py:Class' or 'package.module:factory'); "
                         "only a student written by effsr shrink can be opened from its weights alone")
    if is_user_spec(model):
        return open_network(model, weights, config=config, input_range=input_range, scale=scale,
                            weights_key=weights_key)
    if model.lower() not in names():
        raise ValueError(f"model: unknown model {model!r}; choose from {', '.join(names())}, or name your own "
                         "as 'path/to/file.py:Class' or 'package.module:factory'")
    kwargs = check_config(config)
    if weights_key is not None:
        raise ValueError("weights_key: zoo checkpoints are found without a key; it is for users' networks")
    net = load(model, weights, **kwargs) if weights is not None else build(model, **kwargs).eval()
    return _check_declared(net, input_range, scale, model)
