"""data.py: photo intake fails early, names the file, and converts odd images instead of crashing."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data

def load(folder, resolution=64):
    """load_folder, then the centred square crop train.py uses without face models."""
    items = data.load_folder(folder)
    for it in items:
        data.crop(it, data.square_around(it["photo"].size), resolution)
    return items

def photo(path, size=(96, 80), mode="RGB", color=(200, 100, 50), **save):
    Image.new(mode, size, color).save(path, **save)

def test_reads_jpg_png_webp_any_case_and_skips_junk(tmp_path, capsys):
    """jpg/png/webp in any case are read; .DS_Store and text files are skipped with a warning naming them."""
    photo(tmp_path / "a.JPG")
    photo(tmp_path / "b.png")
    photo(tmp_path / "c.WebP")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "notes.txt").write_text("hi")
    items = load(str(tmp_path))
    assert [os.path.basename(i["path"]) for i in items] == ["a.JPG", "b.png", "c.WebP"]
    out = capsys.readouterr().out
    assert ".DS_Store" in out and "notes.txt" in out
    assert items[0]["image"].shape == (3, 64, 64) and items[0]["mask"] is None
    assert -1 <= items[0]["image"].min() and items[0]["image"].max() <= 1

def test_corrupt_files_are_all_named(tmp_path):
    """Every unreadable file is listed in one message, before anything else happens."""
    photo(tmp_path / "good.png")
    photo(tmp_path / "good2.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        load(str(tmp_path))
    assert "broken.jpg" in str(e.value) and "empty.png" in str(e.value)

def test_too_few_photos(tmp_path):
    """One usable photo is not enough: the message says how many were found and needed."""
    photo(tmp_path / "only.png")
    with pytest.raises(SystemExit, match=r"has 1 usable photo\(s\); MagiCapture needs at least 2"):
        load(str(tmp_path))

def test_missing_folder(tmp_path):
    """A folder that does not exist is named."""
    with pytest.raises(SystemExit, match="nope is not a folder"):
        load(str(tmp_path / "nope"))

def test_alpha_over_white_grey_and_cmyk(tmp_path):
    """RGBA composites over white, L and CMYK convert to RGB: no crash, sensible colours."""
    photo(tmp_path / "clear.png", mode="RGBA", color=(0, 0, 0, 0))
    photo(tmp_path / "grey.png", mode="L", color=128)
    photo(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 0, 0, 0))
    items = {os.path.basename(i["path"]): i["image"] for i in load(str(tmp_path))}
    assert torch.allclose(items["clear.png"], torch.ones(3, 64, 64))  # transparent -> white
    assert torch.allclose(items["grey.png"], torch.full((3, 64, 64), 128 / 255 * 2 - 1), atol=1e-6)
    assert items["cmyk.jpg"].min() > 0.9  # CMYK (0,0,0,0) is white paper

def test_exif_orientation_applied(tmp_path):
    """A photo stored sideways with EXIF orientation 6 (rotate 90) is read upright."""
    im = Image.new("RGB", (120, 80), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 60, 80))  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "a.jpg", exif=exif, quality=100)
    photo(tmp_path / "b.jpg")
    upright = data.read_rgb(tmp_path / "a.jpg")
    assert upright.size == (80, 120)  # rotated: portrait now
    a = np.asarray(upright).mean(axis=(1, 2))
    assert a[:50].mean() > 200 and a[-50:].mean() < 50  # the white half is now on top

def test_masks_paired_and_checked(tmp_path):
    """<name>_mask.png is paired with its photo and resized with it; a mask of the wrong size is named."""
    photo(tmp_path / "a.png", size=(100, 100))
    m = Image.new("L", (100, 100), 0)
    m.paste(255, (0, 0, 100, 50))
    m.save(tmp_path / "a_mask.png")
    photo(tmp_path / "b.png", size=(100, 100))
    items = load(str(tmp_path))
    assert len(items) == 2 and items[1]["mask"] is None
    mask = items[0]["mask"]
    assert mask.shape == (1, 64, 64) and mask[0, :30].min() > 0.99 and mask[0, 34:].max() < 0.01
    Image.new("L", (50, 50), 255).save(tmp_path / "b_mask.png")
    with pytest.raises(SystemExit, match="b_mask.png: 50x50, but its photo is 100x100"):
        load(str(tmp_path))

def test_tiny_image_is_rejected(tmp_path):
    """A thumbnail too small to train on is named with its size."""
    photo(tmp_path / "thumb.png", size=(40, 40))
    photo(tmp_path / "b.png")
    with pytest.raises(SystemExit, match="thumb.png: only 40x40 pixels"):
        load(str(tmp_path))

def test_square_around_face():
    """The crop square centres the face with the margin, stays inside the photo, and shrinks to fit."""
    assert data.square_around((400, 300)) == (50, 0, 300)
    assert data.square_around((400, 300), box=(190, 140, 210, 160), margin=1.0) == (170, 120, 60)
    assert data.square_around((400, 300), box=(0, 0, 20, 20), margin=1.0) == (0, 0, 60)  # pushed inside
    assert data.square_around((400, 300), box=(100, 50, 300, 250), margin=1.0) == (50, 0, 300)  # shrunk
