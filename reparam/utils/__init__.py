"""reparam.utils: the bottom layer every package of the project shares (and that imports none of them).

* :mod:`.io` -- atomic file writing (bytes, text, JSON, safetensors) respecting the umask;
* :mod:`.flops` -- the module-level MAC counter, its counting convention a parameter;
* :mod:`.device` -- a model's device and dtype, and resolving a user's device name;
* :mod:`.modules` -- walking a model (shared modules included) and getting/replacing submodules by name;
* :mod:`.validate` -- argument checks that raise ``ValueError``/``TypeError`` naming the argument.

``reparam`` itself is the dependency root of the toolkits (``prune`` and ``decompose`` build on its blocks),
so this package lives under it; it imports nothing from ``reparam``'s blocks.
"""
from . import device, flops, io, modules, validate

__all__ = ["io", "flops", "device", "modules", "validate"]
