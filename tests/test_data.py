"""effsr.data: image reading, SR folders (paired and HR-only with an LR cache), default photos, patches."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effsr.data import (DEFAULT_IMAGES, MAX_AUTO_PATCH, MIN_PATCH, PatchDataset, SRFolder, SRPair,
                        cache_root, default_images, open_dataset, read_image, select_patch_pairs,
                        write_image)
from effsr.imresize import imresize


def _rand(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def cache_env(tmp_path, monkeypatch) -> Path:
    """Send the fallback LR cache to a temporary folder (never the user's home)."""
    d = tmp_path / "user_cache"
    monkeypatch.setenv("EFFSR_CACHE", str(d))
    return d


# --------------------------------------------------------------------------- read_image
def test_read_image_rgb_gray_alpha_palette_16bit(tmp_path):
    rgb = _rand((9, 7, 3))
    write_image(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)

    gray = _rand((9, 7), seed=1)
    write_image(tmp_path / "gray.png", gray)
    out = read_image(tmp_path / "gray.png")
    assert out.shape == (9, 7, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[:, :, c], gray) for c in range(3))
    np.testing.assert_array_equal(read_image(tmp_path / "gray.png", keep_gray=True), gray)
    assert read_image(tmp_path / "rgb.png", keep_gray=True).shape == (9, 7, 3)

    rgba = np.dstack([rgb, _rand((9, 7), seed=2)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)

    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "pal.png")
    pal = read_image(tmp_path / "pal.png")
    assert pal.shape == (9, 7, 3) and pal.dtype == np.uint8
    assert len(np.unique(pal.reshape(-1, 3), axis=0)) <= 16

    g16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png", keep_gray=True),
                                  np.floor(g16 / 257 + 0.5).astype(np.uint8))


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(tmp_path / "broken.png")


def test_write_image_is_atomic_and_leaves_no_temp_files(tmp_path):
    img = _rand((5, 6, 3))
    write_image(tmp_path / "sub" / "a.png", img)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.png"]
    with pytest.raises(ValueError, match="uint8"):
        write_image(tmp_path / "b.png", img.astype(np.float32))
    assert not (tmp_path / "b.png").exists()


# --------------------------------------------------------------------------- SRPair
def test_srpair_validation_and_scale():
    p = SRPair("x", _rand((4, 5, 3)), _rand((16, 20, 3)))
    assert p.scale == 4 and p.gray is False
    with pytest.raises(ValueError, match="lr"):
        SRPair("x", np.zeros((4, 4, 3), np.float32), _rand((8, 8, 3)))
    with pytest.raises(ValueError, match="channels"):
        SRPair("x", _rand((4, 4)), _rand((8, 8, 3)))
    with pytest.raises(ValueError, match="multiple"):
        SRPair("bad", _rand((4, 4, 3)), _rand((9, 8, 3))).scale


# --------------------------------------------------------------------------- SRFolder, paired layout
def _make_paired(root: Path, sizes: dict[str, tuple[int, int]], scale: int = 4) -> dict[str, np.ndarray]:
    hrs = {}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        hr = _rand((h, w, 3), seed=i)
        hrs[name] = hr
        write_image(root / "HR" / f"{name}.png", hr)
        crop = hr[:(h // scale) * scale, :(w // scale) * scale]
        write_image(root / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png", imresize(crop, 1 / scale))
    return hrs


def test_srfolder_paired_layout_crops_hr(tmp_path):
    hrs = _make_paired(tmp_path, {"b_odd": (43, 37), "a_even": (40, 32)})
    folder = SRFolder(tmp_path, scale=4)
    assert len(folder) == 2 and folder.names == ["a_even", "b_odd"] and not folder.generated
    odd = folder[1]
    assert odd.name == "b_odd" and odd.lr.shape == (10, 9, 3) and odd.hr.shape == (40, 36, 3)
    np.testing.assert_array_equal(odd.hr, hrs["b_odd"][:40, :36])
    assert [p.name for p in folder[::-1]] == ["b_odd", "a_even"]
    assert folder[-1].name == "b_odd"
    with pytest.raises(IndexError):
        folder[2]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing cached for paired data


def test_srfolder_size_mismatch_names_the_image(tmp_path):
    _make_paired(tmp_path, {"good": (16, 16), "wrong": (16, 16)})
    write_image(tmp_path / "LR_bicubic" / "X4" / "wrongx4.png", _rand((5, 4, 3)))  # HR would need >= 20 rows
    folder = SRFolder(tmp_path)
    assert folder[0].name == "good"
    with pytest.raises(ValueError, match="wrong"):
        folder[1]


def test_srfolder_missing_lr_and_empty_folders(tmp_path):
    _make_paired(tmp_path / "d", {"one": (8, 8)})
    write_image(tmp_path / "d" / "HR" / "two.png", _rand((8, 8, 3)))
    with pytest.raises(ValueError, match="two"):
        SRFolder(tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        SRFolder(tmp_path / "empty")
    with pytest.raises(ValueError, match="root"):
        SRFolder(tmp_path / "nope")
    with pytest.raises(ValueError, match="scale"):
        SRFolder(tmp_path / "d", scale=0)


# --------------------------------------------------------------------------- SRFolder, HR-only with cache
def test_srfolder_hr_only_generates_and_caches_lr(tmp_path, cache_env):
    hr = _rand((50, 42, 3), seed=3)
    write_image(tmp_path / "pic.png", hr)
    folder = SRFolder(tmp_path, scale=4)
    assert folder.generated
    pair = folder[0]
    np.testing.assert_array_equal(pair.hr, hr[:48, :40])
    np.testing.assert_array_equal(pair.lr, imresize(hr[:48, :40], 0.25))
    cached, = cache_env.rglob("picx4.png")  # in the user cache, never inside the data folder
    assert cached.parent.name == "X4" and sorted(p.name for p in cached.parent.iterdir()) == ["picx4.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pic.png", "user_cache"]
    # a second read uses the cache: plant a marker value in it and see it come back
    marked = pair.lr.copy()
    marked[0, 0] = (int(marked[0, 0, 0]) + 1) % 256
    write_image(cached, marked)
    np.testing.assert_array_equal(SRFolder(tmp_path)[0].lr, marked)
    # a newer HR image makes the cached LR stale
    later = cached.stat().st_mtime + 10
    os.utime(tmp_path / "pic.png", (later, later))
    np.testing.assert_array_equal(SRFolder(tmp_path)[0].lr, pair.lr)


def test_srfolder_hr_subfolder_and_gray(tmp_path, cache_env):
    gray = _rand((16, 12), seed=4)
    write_image(tmp_path / "HR" / "g.png", gray)
    pair = SRFolder(tmp_path)[0]
    assert pair.gray and pair.hr.shape == (16, 12, 3) and pair.lr.shape == (4, 3, 3)
    np.testing.assert_array_equal(pair.lr[:, :, 1], imresize(gray, 0.25))


def test_srfolder_read_only_root_uses_cache_dir(tmp_path, cache_env):
    root = tmp_path / "ro"
    write_image(root / "HR" / "pic.png", _rand((20, 20, 3)))
    os.chmod(root, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        pair = SRFolder(root)[0]
        assert sorted(p.name for p in root.iterdir()) == ["HR"]  # nothing written next to the data
        files = list(cache_env.rglob("*.png"))
        assert [f.name for f in files] == ["picx4.png"]
        np.testing.assert_array_equal(read_image(files[0]), pair.lr)
    finally:
        os.chmod(root, stat.S_IRWXU)


def test_srfolder_explicit_cache_dir(tmp_path, cache_env):
    write_image(tmp_path / "data" / "pic.png", _rand((8, 8, 3)))
    SRFolder(tmp_path / "data", scale=2, cache_dir=tmp_path / "mine")[0]
    assert (tmp_path / "mine" / "X2" / "picx2.png").is_file()
    assert not (tmp_path / "data" / ".effsr_cache").exists()


def test_cache_root_env_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("EFFSR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "effsr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "effsr"
    monkeypatch.setenv("EFFSR_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_srfolder_writable_root_is_never_written(tmp_path, monkeypatch):
    """A writable data folder stays untouched: the LR cache goes to $XDG_CACHE_HOME/effsr."""
    monkeypatch.delenv("EFFSR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = tmp_path / "data"
    write_image(data / "HR" / "a.png", _rand((24, 20, 3)))
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    SRFolder(data)[0]
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert [p.name for p in (tmp_path / "xdg" / "effsr").rglob("*.png")] == ["ax4.png"]


# --------------------------------------------------------------------------- patch selection
def _pair_of(name: str, h: int, w: int) -> SRPair:
    return SRPair(name, _rand((h, w, 3)), _rand((4 * h, 4 * w, 3)))


def test_select_patch_pairs_auto_uses_every_image():
    pairs = [_pair_of("big", 60, 70), _pair_of("small", 20, 33), _pair_of("mid", 30, 40)]
    sel = select_patch_pairs(pairs)
    assert sel.auto and sel.patch_size == 20 and [p.name for p in sel.pairs] == ["big", "small", "mid"]
    assert sel.dropped == [] and "3 of 3" in sel.message()
    PatchDataset(sel.pairs, patch_size=sel.patch_size)  # every image takes the crop
    assert select_patch_pairs([_pair_of("a", 90, 90)]).patch_size == MAX_AUTO_PATCH  # capped at 48
    tiny = select_patch_pairs([_pair_of("a", 40, 40), _pair_of("tiny", 8, 9)])
    assert tiny.patch_size == MIN_PATCH and tiny.dropped == ["tiny"]  # below the network's minimum
    assert [p.name for p in select_patch_pairs(pairs, limit=2).pairs] == ["big", "small"]


def test_select_patch_pairs_explicit_size_names_what_it_drops():
    pairs = [_pair_of("big", 60, 70), _pair_of("small", 20, 33), _pair_of("mid", 30, 40)]
    sel = select_patch_pairs(pairs, 32)
    assert not sel.auto and [p.name for p in sel.pairs] == ["big"] and sel.dropped == ["small", "mid"]
    msg = sel.message()
    assert "1 of 3" in msg and "2 left out" in msg and "smaller than 32 x 32" in msg and "small, mid" in msg
    assert [p.name for p in select_patch_pairs(pairs, 16, limit=2).pairs] == ["big", "small"]
    with pytest.raises(ValueError, match="patch_size.*largest has 60"):
        select_patch_pairs(pairs, 61)
    with pytest.raises(ValueError, match="patch_size"):
        select_patch_pairs(pairs, 0)


# --------------------------------------------------------------------------- defaults and open_dataset
def test_default_images_offline():
    pairs = default_images(4)
    assert [p.name for p in pairs] == list(DEFAULT_IMAGES)
    for p in pairs:
        assert p.lr.dtype == np.uint8 and p.lr.ndim == 3 and p.lr.shape[2] == 3
        assert p.hr.shape == (4 * p.lr.shape[0], 4 * p.lr.shape[1], 3)
        assert min(p.lr.shape[:2]) >= 64
        assert p.lr.std() > 10  # a real photo, not a blank
    astronaut = pairs[0]
    np.testing.assert_array_equal(astronaut.lr, imresize(astronaut.hr, 0.25))
    assert [p.gray for p in pairs] == [name == "camera" for name in DEFAULT_IMAGES]
    assert not pairs[0].hr.flags.writeable
    assert default_images(2)[0].lr.shape == (256, 256, 3)


def test_open_dataset(tmp_path, cache_env):
    assert [p.name for p in open_dataset("default")] == list(DEFAULT_IMAGES)
    _make_paired(tmp_path, {"x": (8, 8)})
    ds = open_dataset(tmp_path)
    assert isinstance(ds, SRFolder) and len(ds) == 1
    assert isinstance(open_dataset(str(tmp_path)), SRFolder)
    with pytest.raises(ValueError, match="does not exist"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(TypeError, match="path"):
        open_dataset(42)


# --------------------------------------------------------------------------- PatchDataset
def _nearest_pair(name: str, h: int, w: int, scale: int, seed: int) -> SRPair:
    lr = _rand((h, w, 3), seed=seed)
    return SRPair(name, lr, np.repeat(np.repeat(lr, scale, axis=0), scale, axis=1))


def test_patch_dataset_shapes_alignment_and_range():
    pairs = [_nearest_pair("a", 20, 30, 4, 0), _nearest_pair("b", 25, 17, 4, 1)]
    ds = PatchDataset(pairs, patch_size=12, scale=4, length=40, seed=3)
    assert len(ds) == 40
    for i in range(len(ds)):
        lr, hr = ds[i]
        assert lr.dtype == torch.float32 and lr.shape == (3, 12, 12) and hr.shape == (3, 48, 48)
        assert 0.0 <= float(lr.min()) and float(lr.max()) <= 1.0
        # HR was nearest-upsampled LR; aligned crops + identical flips keep that exactly
        torch.testing.assert_close(hr, lr.repeat_interleave(4, 1).repeat_interleave(4, 2), rtol=0, atol=0)


def _find_crop(image: np.ndarray, patch: np.ndarray) -> bool:
    ps = patch.shape[0]
    for y in range(image.shape[0] - ps + 1):
        for x in range(image.shape[1] - ps + 1):
            if np.array_equal(image[y:y + ps, x:x + ps], patch):
                return True
    return False


def test_patch_dataset_augmentation_and_determinism():
    pair = _nearest_pair("a", 16, 16, 2, 5)
    plain = PatchDataset([pair], patch_size=6, scale=2, augment=False, length=12, seed=0)
    for i in range(len(plain)):
        lr = (plain[i][0].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
        assert _find_crop(pair.lr, lr)
    aug = PatchDataset([pair], patch_size=6, scale=2, augment=True, length=12, seed=0)
    found = [_find_crop(pair.lr, (aug[i][0].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8))
             for i in range(len(aug))]
    assert not all(found)  # some patches are flipped / transposed
    again = PatchDataset([pair], patch_size=6, scale=2, augment=True, length=12, seed=0)
    for i in range(len(aug)):
        torch.testing.assert_close(aug[i][0], again[i][0], rtol=0, atol=0)
        torch.testing.assert_close(aug[i][1], again[i][1], rtol=0, atol=0)
    other = PatchDataset([pair], patch_size=6, scale=2, augment=True, length=12, seed=1)
    assert any(not torch.equal(aug[i][0], other[i][0]) for i in range(len(aug)))
    before = [aug[i][0] for i in range(len(aug))]
    aug.set_epoch(1)
    assert any(not torch.equal(b, aug[i][0]) for i, b in enumerate(before))
    torch.testing.assert_close(aug[-1][0], aug[len(aug) - 1][0], rtol=0, atol=0)


def test_patch_dataset_with_dataloader():
    pairs = [_nearest_pair("a", 20, 20, 4, 0)]
    loader = torch.utils.data.DataLoader(PatchDataset(pairs, patch_size=8, length=6), batch_size=3)
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (3, 3, 8, 8) and batches[0][1].shape == (3, 3, 32, 32)


def test_patch_dataset_errors():
    pair = _nearest_pair("tiny", 10, 12, 4, 0)
    with pytest.raises(ValueError, match="tiny"):
        PatchDataset([pair], patch_size=11)
    with pytest.raises(ValueError, match="empty"):
        PatchDataset([], patch_size=4)
    with pytest.raises(ValueError, match="patch_size"):
        PatchDataset([pair], patch_size=0)
    with pytest.raises(ValueError, match="length"):
        PatchDataset([pair], patch_size=4, length=0)
    with pytest.raises(ValueError, match="scale"):
        PatchDataset([pair], patch_size=4, scale=2)
    with pytest.raises(TypeError, match="SRPair"):
        PatchDataset([("a", pair.lr, pair.hr)], patch_size=4)
    with pytest.raises(IndexError):
        PatchDataset([pair], patch_size=4, length=3)[3]


# --------------------------------------------------------------------------- real data
@pytest.mark.data
def test_benchmark_folders(shared_data):
    for name, count in [("set5", 5), ("set14", 14)]:
        if not (shared_data / name).is_dir():
            pytest.skip(f"{name} not in shared data")
        folder = SRFolder(shared_data / name)
        assert len(folder) == count and not folder.generated
        for pair in folder:
            assert pair.hr.shape == (4 * pair.lr.shape[0], 4 * pair.lr.shape[1], 3)
    set14 = SRFolder(shared_data / "set14")
    bridge = set14[set14.names.index("bridge")]
    assert bridge.gray and bridge.lr.shape == (128, 128, 3)
    comic = set14[set14.names.index("comic")]
    assert comic.hr.shape == (360, 248, 3)


@pytest.mark.data
def test_t91_is_hr_only(shared_data, cache_env):
    if not (shared_data / "t91").is_dir():
        pytest.skip("t91 not in shared data")
    folder = SRFolder(shared_data / "t91", cache_dir=cache_env)  # never write into the shared data
    assert len(folder) == 91 and folder.generated
    pair = folder[0]
    np.testing.assert_array_equal(pair.lr, imresize(pair.hr, 0.25))
    assert [p.name for p in cache_env.rglob("*.png")] == [f"{folder.names[0]}x4.png"]


@pytest.mark.data
def test_t91_auto_patch_uses_all_images(shared_data, cache_env):
    if not (shared_data / "t91").is_dir():
        pytest.skip("t91 not in shared data")
    folder = SRFolder(shared_data / "t91")
    auto = select_patch_pairs(folder)
    assert auto.patch_size == 19 and len(auto.pairs) == 91 and not auto.dropped
    at48 = select_patch_pairs(folder, 48)
    assert len(at48.pairs) == 40 and len(at48.dropped) == 51 and "51 left out" in at48.message()
