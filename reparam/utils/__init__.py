"""reparam.utils: the bottom layer every package of the project shares (and that imports none of them).

* :mod:`.io` -- atomic file writing (bytes, text, JSON, safetensors) respecting the umask.
"""
from . import io

__all__ = ["io"]
