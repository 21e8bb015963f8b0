"""Super-resolution image pairs: benchmark folders, scikit-image's bundled photos, training patches.

* :func:`read_image` reads any image file as ``uint8`` RGB (``H x W x 3``).
* :class:`SRFolder` is a sequence of :class:`SRPair` for a benchmark folder (``HR/`` +
  ``LR_bicubic/X4/<name>x4.png``) or a folder of HR images only, whose LR images are made with
  :func:`effsr.imresize.imresize` (pixel-exact MATLAB bicubic) and cached on disk.
* :func:`default_images` gives pairs made from the real photographs shipped inside scikit-image's
  wheel, so everything works offline without any dataset.
* :class:`PatchDataset` serves random aligned LR/HR training crops as float tensors in [0, 1].
"""
from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
import torch
from torch.utils.data import Dataset

from reparam.utils.io import atomic_write

from .imresize import imresize

__all__ = [
    "IMAGE_EXTENSIONS", "DEFAULT_IMAGES", "read_image", "write_image", "SRPair", "SRFolder",
    "default_images", "open_dataset", "PatchDataset", "make_pair", "cache_root",
    "PatchSelection", "select_patch_pairs", "MAX_AUTO_PATCH", "MIN_PATCH",
]

IMAGE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: skimage.data photographs that ship inside the scikit-image wheel (no download needed).
DEFAULT_IMAGES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "motorcycle")


# --------------------------------------------------------------------------------------------- I/O
def read_image(path: str | os.PathLike, keep_gray: bool = False) -> np.ndarray:
    """Read an image file as ``uint8``: ``H x W x 3`` RGB, or ``H x W`` for a gray file if ``keep_gray``.

    Alpha channels are dropped, palette images are expanded, 16-bit images are scaled to 8 bits
    (``round(v / 257)``). A missing or unreadable file raises ``ValueError`` naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                arr = np.clip(np.floor(arr / 257.0 + 0.5), 0, 255).astype(np.uint8)
            elif mode in ("L", "LA", "1") or (mode == "P" and _palette_is_gray(im)):
                arr = np.asarray(im.convert("L"), dtype=np.uint8)
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise ValueError(f"cannot read image file {p}: {exc}") from exc
    if arr.ndim == 2 and not keep_gray:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr)


def _palette_is_gray(im) -> bool:
    pal = im.getpalette()
    if not pal:
        return False
    rgb = np.asarray(pal, dtype=np.int64).reshape(-1, 3)
    return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))


def write_image(path: str | os.PathLike, img: np.ndarray) -> Path:
    """Write a ``uint8`` image atomically (temporary file in the same folder, then rename)."""
    from PIL import Image

    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ValueError("img must be a uint8 numpy array")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, lambda fh: Image.fromarray(img).save(fh, format=_pil_format(p.suffix)))
    return p


def _pil_format(suffix: str) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
            ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM"}.get(suffix.lower(), "PNG")


# --------------------------------------------------------------------------------------------- pairs
@dataclass(frozen=True, eq=False)
class SRPair:
    """One LR/HR image pair; ``hr`` is exactly ``scale`` times the size of ``lr``.

    ``gray`` is True when the source HR image was single-channel (e.g. Set14's ``bridge``); such
    images are still stored as 3 identical RGB channels.
    """

    name: str
    lr: np.ndarray
    hr: np.ndarray
    gray: bool = False

    def __post_init__(self) -> None:
        for field in ("lr", "hr"):
            a = getattr(self, field)
            if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim not in (2, 3):
                raise ValueError(f"{field} of pair {self.name!r} must be a uint8 H x W (x C) array")
        if self.lr.shape[2:] != self.hr.shape[2:]:
            raise ValueError(f"lr and hr of pair {self.name!r} have different channels: "
                             f"{self.lr.shape} vs {self.hr.shape}")

    @property
    def scale(self) -> int:
        """The integer ratio ``hr / lr`` (``ValueError`` if the sizes are not an exact multiple)."""
        h, w = self.lr.shape[:2]
        s = self.hr.shape[0] // h
        if self.hr.shape[0] != s * h or self.hr.shape[1] != s * w:
            raise ValueError(f"hr {self.hr.shape} of pair {self.name!r} is not a multiple of "
                             f"lr {self.lr.shape}")
        return s


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    return int(scale)


def make_pair(name: str, hr: np.ndarray, scale: int = 4, gray: bool = False) -> SRPair:
    """Crop ``hr`` top-left to a multiple of ``scale`` and make its LR with MATLAB-bicubic ``imresize``."""
    scale = _check_scale(scale)
    h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
    if h == 0 or w == 0:
        raise ValueError(f"image {name!r} ({hr.shape[0]} x {hr.shape[1]}) is smaller than scale={scale}")
    hr = np.ascontiguousarray(hr[:h, :w])
    lr = imresize(hr, 1.0 / scale) if scale > 1 else hr.copy()
    return SRPair(name, lr, hr, gray)


def cache_root() -> Path:
    """The user's effsr cache folder (generated LR images live under ``<cache_root>/lr/``).

    ``$EFFSR_CACHE`` if set, else ``$XDG_CACHE_HOME/effsr``, else ``~/.cache/effsr``. effsr never writes
    into a data folder: a dataset the user points at is only ever read.
    """
    env = os.environ.get("EFFSR_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "effsr"


def _writable(folder: Path) -> bool:
    """Whether we may create files in ``folder`` (or its nearest existing parent).

    A folder whose permission bits grant nobody write access counts as read-only even for root.
    """
    p = folder
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    try:
        mode = p.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) and os.access(p, os.W_OK)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


class SRFolder(Sequence):
    """A folder of SR images as a sequence of :class:`SRPair` (read lazily, one pair per HR image).

    Layouts, with ``scale = 4``:

    * ``root/HR/*.png`` and ``root/LR_bicubic/X4/<name>x4.png`` (the benchmark layout). HR is cropped
      top-left to ``4 x`` the LR size; any other size mismatch raises ``ValueError`` naming the image.
    * HR only: ``root/HR/`` or ``root`` itself holds the images. HR is cropped to a multiple of 4 and
      LR is made with :func:`effsr.imresize.imresize`. Generated LR images are cached as PNG under
      :func:`cache_root` (``lr/<folder name>-<hash of its path>/X4/``), or in ``cache_dir`` when given --
      never inside ``root``, which is only read. Files are written to a temporary name and renamed, and
      are remade when older than their HR image; a cache that cannot be written only costs a warning.

    Gray images are returned as 3 identical channels (``SRPair.gray`` is set).
    """

    def __init__(self, root: str | os.PathLike, scale: int = 4, cache_dir: str | os.PathLike | None = None):
        self.scale = _check_scale(scale)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root is not a directory: {self.root}")
        self.hr_dir = self.root / "HR" if (self.root / "HR").is_dir() else self.root
        self.hr_files = _list_images(self.hr_dir)
        if not self.hr_files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {self.hr_dir}")
        lr_dir = self.root / "LR_bicubic" / f"X{self.scale}"
        self.lr_dir: Path | None = lr_dir if lr_dir.is_dir() else None
        self.lr_files: list[Path] | None = None
        if self.lr_dir is not None:
            available = {p.stem: p for p in _list_images(self.lr_dir)}
            self.lr_files = []
            for hr in self.hr_files:
                key = f"{hr.stem}x{self.scale}"
                if key not in available:
                    raise ValueError(f"LR image for {hr.stem!r} not found: "
                                     f"expected {self.lr_dir / (key + '.png')}")
                self.lr_files.append(available[key])
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None

    @property
    def names(self) -> list[str]:
        """Image names (HR file stems), in the order of the sequence."""
        return [p.stem for p in self.hr_files]

    @property
    def generated(self) -> bool:
        """True when LR images are made by ``imresize`` (HR-only folder)."""
        return self.lr_files is None

    def __len__(self) -> int:
        return len(self.hr_files)

    @overload
    def __getitem__(self, index: int) -> SRPair: ...

    @overload
    def __getitem__(self, index: slice) -> list[SRPair]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        hr_path = self.hr_files[index]
        raw = read_image(hr_path, keep_gray=True)
        gray = raw.ndim == 2
        hr = np.repeat(raw[:, :, None], 3, axis=2) if gray else raw
        if self.lr_files is not None:
            return self._paired(hr_path.stem, hr, read_image(self.lr_files[index]), gray)
        return self._generated(hr_path, hr, gray)

    def _paired(self, name: str, hr: np.ndarray, lr: np.ndarray, gray: bool) -> SRPair:
        s = self.scale
        (hh, hw), (lh, lw) = hr.shape[:2], lr.shape[:2]
        if hh // s != lh or hw // s != lw:
            raise ValueError(f"image {name!r}: HR {hh} x {hw} does not match LR {lh} x {lw} at scale {s} "
                             f"(HR must be {s} x LR, up to {s - 1} extra rows/columns)")
        return SRPair(name, lr, np.ascontiguousarray(hr[:s * lh, :s * lw]), gray)

    # -- generated LR with an on-disk cache
    def _cache_candidates(self) -> list[Path]:
        if self._cache_dir is not None:
            return [self._cache_dir / f"X{self.scale}"]
        digest = hashlib.sha1(str(self.hr_dir.resolve()).encode()).hexdigest()[:12]
        return [cache_root() / "lr" / f"{self.root.resolve().name}-{digest}" / f"X{self.scale}"]

    def _generated(self, hr_path: Path, hr: np.ndarray, gray: bool) -> SRPair:
        name = hr_path.stem
        s = self.scale
        expected = (hr.shape[0] // s, hr.shape[1] // s)
        fname = f"{name}x{s}.png"
        hr_mtime = hr_path.stat().st_mtime
        candidates = self._cache_candidates()
        for folder in candidates:  # a fresh cached LR image anywhere?
            f = folder / fname
            try:
                if f.is_file() and f.stat().st_mtime >= hr_mtime:
                    lr = read_image(f)
                    if lr.shape[:2] == expected:
                        hr_crop = np.ascontiguousarray(hr[:s * expected[0], :s * expected[1]])
                        return SRPair(name, lr, hr_crop, gray)
            except (OSError, ValueError):
                pass
        pair = make_pair(name, hr, s, gray)
        for folder in candidates:
            if not _writable(folder):
                continue
            try:
                write_image(folder / fname, pair.lr)
                break
            except OSError:
                continue
        else:
            where = [str(c) for c in candidates]
            warnings.warn(f"could not cache the LR image of {name!r} in any of {where}",
                          RuntimeWarning, stacklevel=3)
        return pair

    def __repr__(self) -> str:
        kind = "HR only, LR by imresize" if self.generated else f"LR from {self.lr_dir}"
        return f"SRFolder({str(self.root)!r}, scale={self.scale}, {len(self)} images, {kind})"


# --------------------------------------------------------------------------------------------- defaults
def _load_skimage_photo(name: str) -> np.ndarray:
    import skimage.data as skdata

    if name == "motorcycle":
        return skdata.stereo_motorcycle()[0]
    return getattr(skdata, name)()


_DEFAULT_CACHE: dict[int, list[SRPair]] = {}


def default_images(scale: int = 4) -> list[SRPair]:
    """Pairs made from the photographs bundled in scikit-image's wheel (:data:`DEFAULT_IMAGES`), offline.

    HR is cropped top-left to a multiple of ``scale``; LR is MATLAB-bicubic :func:`imresize`. Gray photos
    (``camera``) are expanded to 3 channels. The arrays are computed once per process and read-only.
    """
    scale = _check_scale(scale)
    if scale not in _DEFAULT_CACHE:
        pairs = []
        for name in DEFAULT_IMAGES:
            img = np.asarray(_load_skimage_photo(name))
            if img.dtype != np.uint8:
                raise ValueError(f"skimage photo {name!r} has unexpected dtype {img.dtype}")
            gray = img.ndim == 2
            if gray:
                img = np.repeat(img[:, :, None], 3, axis=2)
            elif img.shape[2] == 4:
                img = img[:, :, :3]
            pair = make_pair(name, img, scale, gray)
            pair.lr.setflags(write=False)
            pair.hr.setflags(write=False)
            pairs.append(pair)
        _DEFAULT_CACHE[scale] = pairs
    return list(_DEFAULT_CACHE[scale])


def open_dataset(path: str | os.PathLike, scale: int = 4) -> SRFolder | list[SRPair]:
    """``"default"`` -> :func:`default_images`; a folder -> :class:`SRFolder`."""
    if isinstance(path, str) and path == "default":
        return default_images(scale)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path or 'default', got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise ValueError(f"path does not exist: {p} (use 'default' for scikit-image's bundled photos)")
    return SRFolder(p, scale=scale)


# --------------------------------------------------------------------------------------------- patches
#: Largest LR patch side that ``patch_size=None`` ("auto") picks: the common 48 x 48 of ESR training recipes.
MAX_AUTO_PATCH = 48
#: Smallest LR patch side accepted by the training code (ESA pools 7 x 7 after a stride-2 conv).
MIN_PATCH = 16


@dataclass(frozen=True)
class PatchSelection:
    """The training pairs that fit ``patch_size``, and the names of those that do not
    (see :func:`select_patch_pairs`)."""

    pairs: list[SRPair]
    patch_size: int
    dropped: list[str]
    considered: int
    auto: bool
    #: every pair considered (also those too small for the patch), e.g. for calibration crops of another size
    considered_pairs: list[SRPair]

    def message(self) -> str:
        """One line saying which patch size is used and how many images were left out, and why."""
        how = f"auto: the smallest LR side, at most {MAX_AUTO_PATCH}" if self.auto else "given"
        text = (f"patch size {self.patch_size} ({how}); {len(self.pairs)} of {self.considered} training "
                f"image(s) used")
        if self.dropped:
            shown = ", ".join(self.dropped[:8]) + (f", ... ({len(self.dropped) - 8} more)"
                                                   if len(self.dropped) > 8 else "")
            text += (f"; {len(self.dropped)} left out because their LR image is smaller than "
                     f"{self.patch_size} x {self.patch_size}: {shown}")
        return text


def select_patch_pairs(pairs: Sequence[SRPair], patch_size: int | None = None,
                       limit: int | None = None) -> PatchSelection:
    """Pick the pairs a ``patch_size x patch_size`` LR crop fits into.

    ``patch_size=None`` ("auto") uses all the data: the patch side is the smallest LR side among the
    pairs, capped at :data:`MAX_AUTO_PATCH` and at least :data:`MIN_PATCH` (T91 at x4: 19, so all 91
    images train; ``default`` photos: 48). Pairs smaller than the patch are left out and *named* in
    :meth:`PatchSelection.message`. ``limit`` keeps at most that many pairs, in order: with a given
    ``patch_size`` the first ``limit`` that fit, with auto the first ``limit`` (the patch fits them all).
    Raises ``ValueError`` naming ``patch_size`` when no pair fits.
    """
    if patch_size is not None and (isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer))
                                   or patch_size < 1):
        raise ValueError(f"patch_size must be a positive int or None (auto), got {patch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    auto = patch_size is None
    n = len(pairs) if (limit is None or not auto) else min(int(limit), len(pairs))
    loaded = [pairs[i] for i in range(n)]  # auto + limit: the first `limit` images, whatever their size
    if not loaded:
        raise ValueError("pairs is empty: no images to cut patches from")
    if auto:
        smallest = min(min(p.lr.shape[:2]) for p in loaded)
        patch_size = max(MIN_PATCH, min(MAX_AUTO_PATCH, smallest))
    ps = int(patch_size)
    fits = [p for p in loaded if min(p.lr.shape[:2]) >= ps]
    dropped = [p.name for p in loaded if min(p.lr.shape[:2]) < ps]
    if not fits:
        largest = max(min(p.lr.shape[:2]) for p in loaded)
        raise ValueError(f"patch_size: no training image has an LR side >= {ps} (the largest has {largest})")
    chosen = fits if limit is None else fits[: int(limit)]
    return PatchSelection(chosen, ps, dropped, len(loaded), auto, loaded)


class PatchDataset(Dataset):
    """Random aligned training crops: item ``i`` is ``(lr, hr)`` float32 CHW tensors in [0, 1].

    ``lr`` is ``patch_size x patch_size``, ``hr`` is ``scale`` times that. Item ``i`` comes from pair
    ``i % len(pairs)``; the crop position and (with ``augment``) the horizontal flip, vertical flip and
    transpose are drawn from a generator seeded with ``(seed, epoch, i)``, so the dataset is
    deterministic and safe with any number of DataLoader workers. :meth:`set_epoch` gives new crops.
    ``length`` defaults to the number of pairs. The pairs are loaded into memory once.
    """

    def __init__(self, pairs: Sequence[SRPair], patch_size: int = 48, scale: int = 4, augment: bool = True,
                 length: int | None = None, seed: int = 0):
        self.scale = _check_scale(scale)
        if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        self.patch_size = int(patch_size)
        self.pairs = list(pairs)
        if not self.pairs:
            raise ValueError("pairs is empty: no images to cut patches from")
        for p in self.pairs:
            if not isinstance(p, SRPair):
                raise TypeError(f"pairs must contain SRPair objects, got {type(p).__name__}")
            lh, lw = p.lr.shape[:2]
            if p.hr.shape[0] != lh * self.scale or p.hr.shape[1] != lw * self.scale:
                raise ValueError(f"pair {p.name!r}: hr {p.hr.shape[:2]} is not "
                                 f"scale={self.scale} x lr {p.lr.shape[:2]}")
            if lh < self.patch_size or lw < self.patch_size:
                raise ValueError(f"patch_size={self.patch_size} is larger than the LR image of "
                                 f"{p.name!r} ({lh} x {lw})")
        if length is None:
            length = len(self.pairs)
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ValueError(f"length must be a positive int or None, got {length!r}")
        self.length = int(length)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select another deterministic set of crops (e.g. call once per training epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        index = int(index) % self.length
        pair = self.pairs[index % len(self.pairs)]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        ps, s = self.patch_size, self.scale
        y = int(rng.integers(0, pair.lr.shape[0] - ps + 1))
        x = int(rng.integers(0, pair.lr.shape[1] - ps + 1))
        lr = pair.lr[y:y + ps, x:x + ps]
        hr = pair.hr[y * s:(y + ps) * s, x * s:(x + ps) * s]
        if lr.ndim == 2:
            lr, hr = lr[:, :, None], hr[:, :, None]
        if self.augment:
            hflip, vflip, transpose = (bool(b) for b in rng.integers(0, 2, size=3))
            if hflip:
                lr, hr = lr[:, ::-1], hr[:, ::-1]
            if vflip:
                lr, hr = lr[::-1], hr[::-1]
            if transpose:
                lr, hr = lr.transpose(1, 0, 2), hr.transpose(1, 0, 2)

        def to_tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32) / 255.0)

        return to_tensor(lr), to_tensor(hr)
