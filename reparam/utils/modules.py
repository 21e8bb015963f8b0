"""Walking a model and replacing its submodules by dotted name: the one implementation of each.

``torch.nn.Module.named_modules()`` and ``named_children()`` drop a module the second time they meet it,
so a block used twice (``nn.Sequential(b, nn.ReLU(), b)``) is seen once and a rewrite done by walking
them silently skips the other place. The walkers here report every place by default
(``duplicates=True``); callers that must act once per module can key on ``id(module)``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from torch import nn

__all__ = ["named_modules", "sites", "outermost", "get_module", "replace_module", "parent_and_attr", "eval_mode"]


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def named_modules(model: nn.Module, *, duplicates: bool = True, include_root: bool = False
                  ) -> Iterator[tuple[str, nn.Module]]:
    """``(dotted name, module)`` of every submodule, pre-order; every place of a shared module when
    ``duplicates`` (else its first place only). The root (name ``""``) only with ``include_root``."""
    _check_model(model)
    for name, m in model.named_modules(remove_duplicate=not duplicates):
        if name or include_root:
            yield name, m


def sites(model: nn.Module, descend: Callable[[nn.Module], bool] | None = None, prefix: str = ""
          ) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """Every place a submodule sits in ``model``: ``(dotted name, parent, attribute, child)``, pre-order.

    Unlike ``named_modules`` this keeps repeats: a module registered at two places (``Sequential(b, act, b)``,
    or one conv assigned to two attributes) is yielded at each of them. It descends into a child only when
    ``descend(child)`` holds (default: always), e.g. ``descend=lambda m: not isinstance(m, RepBlock)``.
    """
    _check_model(model)
    for attr, child in model._modules.items():  # noqa: SLF001 - named_children() would drop repeats
        if child is None:
            continue
        name = f"{prefix}.{attr}" if prefix else attr
        yield name, model, attr, child
        if descend is None or descend(child):
            yield from sites(child, descend, name)


def outermost(model: nn.Module, match: Callable[[nn.Module], bool], *, duplicates: bool = True
              ) -> Iterator[tuple[str, nn.Module]]:
    """The submodules for which ``match(module)`` holds, without descending into a match.

    The root itself is yielded (name ``""``) when it matches. With ``duplicates`` a module reachable
    under several names is yielded under each; else under its first name only.
    """
    _check_model(model)
    if match(model):
        yield "", model
        return
    seen: set[int] = set()
    for name, _, _, child in sites(model, descend=lambda m: not match(m)):
        if match(child):
            if not duplicates:
                if id(child) in seen:
                    continue
                seen.add(id(child))
            yield name, child


def get_module(model: nn.Module, name: str, arg: str = "name") -> nn.Module:
    """The submodule at dotted ``name`` (``""``: the model); ``ValueError`` naming ``arg`` when absent."""
    _check_model(model)
    if not isinstance(name, str):
        raise TypeError(f"{arg} must be a dotted module name (str), got {type(name).__name__}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{arg}: {type(model).__name__} has no submodule {name!r}") from None


def parent_and_attr(model: nn.Module, name: str, arg: str = "name") -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the submodule at dotted ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{arg}: need the dotted name of a submodule, got {name!r}")
    parent_name, _, attr = name.rpartition(".")
    parent = get_module(model, parent_name, arg)
    if attr not in parent._modules:  # noqa: SLF001
        raise ValueError(f"{arg}: {type(model).__name__} has no submodule {name!r}")
    return parent, attr


def replace_module(model: nn.Module, name: str, new: nn.Module, arg: str = "name") -> nn.Module:
    """Put ``new`` at dotted ``name`` in ``model`` (in place; works inside Sequential/ModuleList/ModuleDict);
    returns the module that was there. Only that place changes: other places of a shared module keep it."""
    if not isinstance(new, nn.Module):
        raise TypeError(f"new must be an nn.Module, got {type(new).__name__}")
    parent, attr = parent_and_attr(model, name, arg)
    old = parent._modules[attr]  # noqa: SLF001
    setattr(parent, attr, new)
    return old


@contextmanager
def eval_mode(*models: nn.Module, hooks: Iterable[Any] = ()) -> Iterator[None]:
    """Every submodule of ``models`` in eval mode for the ``with`` block; on exit (also on an exception) the
    ``hooks`` (handles with ``.remove()``, e.g. from ``register_forward_hook``) are removed and each module's
    own train/eval flag is restored."""
    handles = list(hooks)
    states = [(m, m.training) for net in models for m in net.modules()]
    try:
        for net in models:
            net.eval()
        yield
    finally:
        for h in handles:
            h.remove()
        for m, training in states:
            m.training = training
