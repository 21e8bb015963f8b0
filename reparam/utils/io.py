"""Atomic file writing: the one writer every module of the project uses.

A file is written to a temporary file in the target's own folder (same file system), flushed and
``fsync``-ed, then moved over the target with :func:`os.replace`: a reader sees the old file or the whole
new one, never half of it, and a failed write leaves the target untouched and no temporary file behind.

The temporary file is created with ``os.open(..., 0o666)``, so its mode is what a plain ``open()`` would
give under the process umask (``0644`` under the usual ``022``), not :func:`tempfile.mkstemp`'s ``0600``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path
from typing import IO, Any, Callable, Mapping

__all__ = ["atomic_write", "write_bytes", "write_text", "write_json", "write_safetensors", "json_default"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fh)`` on a binary file handle, then atomically put what it wrote at ``path``.

    Creates missing parent folders. On any exception the target is left as it was and the temporary file
    is removed. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    target = Path(path)
    if target.name == "":
        raise ValueError(f"path: {path!r} names no file")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return target


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return atomic_write(path, lambda fh: fh.write(data))


def write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Atomically write ``text`` to ``path``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return write_bytes(path, text.encode(encoding))


def json_default(o: Any) -> Any:
    """JSON for values :mod:`json` does not know: scalars with ``.item()`` (NumPy, 0-d tensors), paths,
    dataclasses, sets/tuples; anything else as ``str(o)``."""
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    item = getattr(o, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(o)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
               default: Callable[[Any], Any] | None = json_default, sort_keys: bool = False) -> Path:
    """Atomically write ``obj`` as JSON (``indent`` spaces, trailing newline) to ``path``.

    The text is produced before the file is touched, so an object that cannot be encoded writes nothing.
    """
    text = json.dumps(obj, indent=indent, default=default, sort_keys=sort_keys, allow_nan=True) + "\n"
    return write_text(path, text)


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` (name -> ``torch.Tensor``) with string ``metadata`` as a safetensors file."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    blob = save(state, metadata=dict(metadata) if metadata is not None else None)
    return write_bytes(path, blob)
