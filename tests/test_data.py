"""data.py: photo intake fails early, names the file, and converts odd images instead of crashing."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data

def load(folder, resolution=64):
    """load_folder, then the centred square crop train.py uses without face models."""
    items = data.load_folder(folder)
    for it in items:
        data.crop(it, data.square_around(it.photo.size), resolution)
    return items

def photo(path, size=(96, 80), mode="RGB", color=(200, 100, 50), **save):
    Image.new(mode, size, color).save(path, **save)

def png(path, size, bit_depth, color_type, rows=()):
    """A PNG written byte by byte, for what Pillow will not write: 16-bit RGB, or a header that declares a
    size the (empty) pixel data never fills; Pillow's open reads only the header."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", *size, bit_depth, color_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + row.tobytes() for row in rows))  # filter byte 0 (none) per row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))

def test_reads_jpg_png_webp_any_case_and_skips_junk(tmp_path, capsys):
    """jpg/jfif/png/webp in any case are read; text and HEIC files and subfolders are skipped with a warning naming
    them (HEIC's with the conversion); hidden files (.DS_Store, macOS's ._<name> stubs, even of a mask) silently."""
    photo(tmp_path / "a.JPG")
    photo(tmp_path / "b.png")
    photo(tmp_path / "c.WebP")
    photo(tmp_path / "d.jfif", format="JPEG")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "._a.JPG").write_bytes(b"\0\5Mac OS X")  # AppleDouble stubs: not images
    (tmp_path / "._b_mask.jpg").write_bytes(b"\0\5Mac OS X")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\0\1")
    (tmp_path / "more").mkdir()
    items = load(str(tmp_path))
    assert all(isinstance(i, data.Photo) for i in items)
    assert [os.path.basename(i.path) for i in items] == ["a.JPG", "b.png", "c.WebP", "d.jfif"]
    out = capsys.readouterr().out
    assert "notes.txt" in out and "skipping the subfolder " + str(tmp_path / "more") in out
    assert "DS_Store" not in out and "._" not in out
    assert "IMG_0001.HEIC: HEIC is not read; save it as JPEG (on a Mac: sips -s format jpeg IMG_0001.HEIC --out " \
           "IMG_0001.jpg)" in out
    assert items[0].image.shape == (3, 64, 64) and items[0].mask is None
    assert -1 <= items[0].image.min() and items[0].image.max() <= 1

def wide_gamut_icc():
    """An ICC v2 display profile (matrix and gamma 2.2 curves) with Display P3's primaries adapted to D50: a
    wider gamut than sRGB, as phone photos carry. Written by hand: Pillow can only make sRGB profiles."""
    fixed = lambda *v: b"".join(struct.pack(">i", round(x * 65536)) for x in v)  # s15Fixed16Number
    xyz = lambda *v: b"XYZ " + bytes(4) + fixed(*v)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(2.2 * 256)) + bytes(2)
    name = b"wide test RGB\0"
    tags = [(b"desc", b"desc" + bytes(4) + struct.pack(">I", len(name)) + name + bytes(78)),
            (b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.5151, 0.2412, -0.0011)),
            (b"gXYZ", xyz(0.2920, 0.6922, 0.0419)), (b"bXYZ", xyz(0.1571, 0.0666, 0.7841)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    table, body, start = b"", b"", 128 + 4 + 12 * len(tags)
    for sig, data in tags:
        body += bytes(-(start + len(body)) % 4)  # each tag on a 4-byte boundary
        table += sig + struct.pack(">II", start + len(body), len(data))
        body += data
    header = (struct.pack(">I", start + len(body)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(28) + fixed(0.9642, 1.0, 0.8249) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body

def test_colour_profiles_are_converted_to_srgb(tmp_path, capsys):
    """A photo tagged with a wide-gamut profile is read in sRGB: a grey stays grey, a red gets more saturated
    (its numbers meant a redder red); an sRGB-tagged photo, and a profile that cannot be read (with a warning),
    read as untagged."""
    from PIL import ImageCms
    colours = np.array([[[128, 128, 128], [200, 30, 30]]], np.uint8)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for name, icc in (("wide", wide_gamut_icc()), ("srgb", srgb), ("broken", b"not a profile"), ("none", None)):
        Image.fromarray(colours).save(tmp_path / f"{name}.png", icc_profile=icc)
    grey, red = np.asarray(data.read_rgb(str(tmp_path / "wide.png"))).astype(int)[0]
    assert grey.max() - grey.min() <= 1 and abs(grey[0] - 128) <= 2, grey
    assert red[0] > 200 and red[1] < 30 and red[2] < 30, red
    for name in ("srgb", "broken", "none"):
        assert np.array_equal(np.asarray(data.read_rgb(str(tmp_path / f"{name}.png"))), colours), name
    assert "broken.png: its colour profile cannot be read" in capsys.readouterr().out

def test_corrupt_files_are_all_named(tmp_path):
    """Every unreadable file is listed in one message, before anything else happens."""
    photo(tmp_path / "good.png")
    photo(tmp_path / "good2.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "iphone.jpg").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic")  # a HEIC under a .jpg name
    with pytest.raises(SystemExit) as e:
        load(str(tmp_path))
    assert "broken.jpg" in str(e.value) and "empty.png" in str(e.value)
    assert "iphone.jpg: HEIC is not read (a HEIC file under a .jpg name); save it as JPEG" in str(e.value)

def test_digest_follows_the_photo_and_its_mask(tmp_path):
    """data.digest, which --resume compares: the same for the same bytes, whatever the file's date; another for a
    changed photo, and for a changed or added mask."""
    photo(tmp_path / "a.png")
    first = data.digest(str(tmp_path / "a.png"))
    os.utime(tmp_path / "a.png", (0, 0))
    assert data.digest(str(tmp_path / "a.png")) == first
    photo(tmp_path / "a_mask.png", mode="L", color=255)
    masked = data.digest(str(tmp_path / "a.png"))
    photo(tmp_path / "a_mask.png", mode="L", color=0)
    photo(tmp_path / "b.png", color=(200, 100, 51))
    assert len({first, masked, data.digest(str(tmp_path / "a.png")), data.digest(str(tmp_path / "b.png"))}) == 4

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
    items = {os.path.basename(i.path): i.image for i in load(str(tmp_path))}
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
    assert len(items) == 2 and items[1].mask is None
    mask = items[0].mask
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

# 16-bit grey levels and what they are in 8 bits (v / 257, rounded); Pillow's convert made all but 0 white
GREY16 = np.array([[0, 1000, 32896, 65535]], np.uint16)
GREY8 = np.array([0, 4, 128, 255])

def test_every_mode_reads_as_the_right_8bit_rgb(tmp_path):
    """Each Pillow mode a photo or mask can open in gives the right upright 8-bit RGB values (files on disk)."""
    grey = lambda v: np.repeat(np.asarray(v)[:, None], 3, axis=1)  # (N,) -> (N, 3)
    over_white = lambda v, a: np.round(v * a / 255 + 255 * (1 - a / 255))
    files = {}  # name -> (expected pixels of the first row, tolerance in 8-bit levels)
    Image.fromarray(GREY16).save(tmp_path / "i16.png")  # a 16-bit grey PNG opens as I;16
    files["i16.png"] = grey(GREY8), 0
    Image.frombytes("I;16B", (4, 1), GREY16.astype(">u2").tobytes()).save(tmp_path / "i16b.tif")
    files["i16b.tif"] = grey(GREY8), 0
    Image.fromarray(GREY16.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I: taken as 16-bit
    files["i32.tif"] = grey(GREY8), 0
    Image.fromarray((GREY16 / 65535).astype(np.float32)).save(tmp_path / "f01.tif")  # F in 0..1
    files["f01.tif"] = grey(GREY8), 0
    Image.fromarray((GREY16 / 257).astype(np.float32)).save(tmp_path / "f255.tif")  # F in 0..255
    files["f255.tif"] = grey(GREY8), 0
    rgb16 = np.stack([GREY16, 65535 - GREY16, np.full_like(GREY16, 2570)], axis=-1).astype(">u2")
    png(tmp_path / "rgb16.png", (4, 1), 16, 2, rows=rgb16)  # 16-bit RGB: Pillow keeps the high byte
    files["rgb16.png"] = np.stack([GREY8, 255 - GREY8, np.full(4, 10)], axis=-1), 1
    la = Image.new("LA", (4, 1))
    la.putdata([(0, 0), (0, 255), (200, 128), (255, 255)])
    la.save(tmp_path / "la.png")
    files["la.png"] = grey(over_white(np.array([0, 0, 200, 255]), np.array([0, 255, 128, 255]))), 1
    p = Image.new("P", (4, 1))
    p.putpalette([0, 0, 0, 255, 0, 0])
    p.putdata([0, 1, 0, 1])
    p.save(tmp_path / "p.png", transparency=0)  # palette entry 0 transparent
    files["p.png"] = np.array([[255, 255, 255], [255, 0, 0]] * 2), 0
    pa = Image.new("PA", (2, 1))
    pa.putpalette([0, 0, 0, 255, 0, 0])
    pa.putdata([(1, 0), (1, 255)])
    pa.save(tmp_path / "pa.tif")
    files["pa.tif"] = np.array([[255, 255, 255], [255, 0, 0]]), 0
    photo(tmp_path / "lt.png", size=(2, 1), mode="L", color=7, transparency=7)  # L with a transparent grey
    files["lt.png"] = grey([255, 255]), 0
    photo(tmp_path / "rgba.png", size=(2, 1), mode="RGBA", color=(255, 0, 0, 128))
    files["rgba.png"] = np.array([[255, 127, 127]] * 2), 1
    photo(tmp_path / "cmyk.jpg", size=(8, 8), mode="CMYK", color=(0, 255, 255, 0), quality=100)
    files["cmyk.jpg"] = np.array([[255, 0, 0]] * 8), 3  # JPEG rounding
    photo(tmp_path / "l.png", size=(2, 1), mode="L", color=128)
    files["l.png"] = grey([128, 128]), 0
    bw = Image.new("1", (2, 1))
    bw.putdata([0, 1])
    bw.save(tmp_path / "bw.png")
    files["bw.png"] = grey([0, 255]), 0
    wrong = []
    for name, (want, tol) in files.items():
        im = data.read_rgb(tmp_path / name)
        got = np.asarray(im)[0].astype(int)
        if im.mode != "RGB" or np.abs(got - want).max() > tol:
            wrong.append(f"{name} ({Image.open(tmp_path / name).mode}): got {got.tolist()}, want {want.tolist()}")
    assert not wrong, "\n".join(wrong)

def test_16bit_mask(tmp_path):
    """A 16-bit grey mask reads as 1, 0.5 and 0, not as white wherever it is above 255."""
    photo(tmp_path / "a.png", size=(96, 96))
    photo(tmp_path / "b.png")
    m = np.zeros((96, 96), np.uint16)
    m[:32], m[32:64] = 65535, 32896
    Image.fromarray(m).save(tmp_path / "a_mask.png")
    mask = load(str(tmp_path), resolution=96)[0].mask[0]
    top, middle, bottom = mask[:30].mean().item(), mask[34:62].mean().item(), mask[66:].mean().item()
    assert abs(top - 1) < 1e-6 and abs(middle - 128 / 255) < 1e-6 and bottom < 1e-6, (top, middle, bottom)

def test_huge_image_is_named_with_its_size(tmp_path):
    """A photo over MAX_PIXELS (a header declaring 20000x10000, never decoded) is named with its size and the fix
    in the one message, not left to Pillow's DecompressionBombError; Pillow's own limit is restored."""
    limit = Image.MAX_IMAGE_PIXELS
    png(tmp_path / "huge.png", (20000, 10000), 8, 0)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    photo(tmp_path / "a.png")
    photo(tmp_path / "b.png")
    with pytest.raises(SystemExit) as e:
        load(str(tmp_path))
    msg = str(e.value)
    assert "huge.png: 20000x10000 pixels, over the limit of 89 megapixels" in msg, msg
    assert "4000 px on the long side" in msg and "broken.jpg" in msg, msg
    assert Image.MAX_IMAGE_PIXELS == limit

def test_mask_without_photo_is_named(tmp_path, capsys):
    """A <name>_mask.png that pairs with no photo (none of that name, or another case) is named in a warning."""
    photo(tmp_path / "a.png")
    photo(tmp_path / "b.png")
    Image.new("L", (96, 80)).save(tmp_path / "c_mask.png")
    Image.new("L", (96, 80)).save(tmp_path / "a_MASK.png")
    items = load(str(tmp_path))
    out = capsys.readouterr().out
    assert "ignoring " + str(tmp_path / "c_mask.png") in out and "ignoring " + str(tmp_path / "a_MASK.png") in out, out
    assert [i.mask for i in items] == [None, None]

def test_mask_of_exif_rotated_photo_says_why(tmp_path):
    """A mask drawn on a sideways-stored photo (EXIF orientation 6) is refused with the tag as reason and the fix."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to show upright
    Image.new("RGB", (120, 80), (200, 100, 50)).save(tmp_path / "a.jpg", exif=exif)
    Image.new("L", (120, 80), 255).save(tmp_path / "a_mask.png")
    photo(tmp_path / "b.png")
    with pytest.raises(SystemExit) as e:
        load(str(tmp_path))
    msg = str(e.value)
    assert "a_mask.png: 120x80, the size of a.jpg as stored" in msg and "EXIF orientation tag (6)" in msg, msg
    assert "80x120 upright" in msg and "rotate the mask the same way" in msg, msg

def masked(tmp_path, name, fraction, file_mask):
    """A cropped Photo whose 64x64 mask is face on its first `fraction` of rows."""
    p = data.Photo(str(tmp_path / f"{name}.jpg"), Image.new("RGB", (64, 64)))
    if file_mask:
        p.mask_photo = Image.new("L", (64, 64))
    p.mask = torch.zeros(1, 64, 64)
    p.mask[:, :round(64 * fraction)] = 1
    return p

def test_check_masks_names_empty_and_full_masks(tmp_path):
    """Masks of almost no face or almost all face are each named (the file, or the parser's mask of the photo)."""
    ok = [masked(tmp_path, "ok", 0.5, True), masked(tmp_path, "ok2", 0.5, False)]
    data.check_masks(ok, 0.005)
    bad = [masked(tmp_path, "empty", 0, True), masked(tmp_path, "full", 1, False)]
    with pytest.raises(SystemExit) as e:
        data.check_masks(ok + bad, 0.005)
    msg = str(e.value)
    assert str(tmp_path / "empty_mask.png") + ": 0.0% face" in msg, msg
    assert "the automatic face-parser mask of " + str(tmp_path / "full.jpg") + ": 100.0% face" in msg, msg
    assert msg.count(str(tmp_path)) == 2 and "painting the face white" in msg, msg  # the good ones are not named
    p = masked(tmp_path, "thin", 0, True)
    p.mask[0, 0, :16] = 1  # 16 of 4096 pixels: 0.4%
    with pytest.raises(SystemExit, match="thin_mask.png: 0.4% face"):
        data.check_masks([p], 0.005)
    data.check_masks([p], 0)  # 0 turns the check off
    # object masks: all object is a photo without a mask, and fine; an empty one is named as an object's
    data.check_masks([masked(tmp_path, "whole", 1, True)], 0.005, objects=True)
    with pytest.raises(SystemExit, match=r"(?s)empty_mask.png: 0.0% object.*Paint the object white"):
        data.check_masks([masked(tmp_path, "empty", 0, True)], 0.005, objects=True)

def test_synthetic_data_never_draws_over_photos(tmp_path):
    """make_synthetic refuses a folder holding other files (naming it, leaving it untouched, drawing nothing),
    and redraws a set it drew before without complaint."""
    src, ref = tmp_path / "src", tmp_path / "ref"
    ref.mkdir()
    photo(ref / "00.png", color=(1, 2, 3))
    before = (ref / "00.png").read_bytes()
    with pytest.raises(SystemExit) as e:
        data.make_synthetic(str(src), str(ref), n=2)
    msg = str(e.value)
    assert str(ref) in msg and "00.png" in msg and "synthetic_data=False" in msg, msg
    assert (ref / "00.png").read_bytes() == before and not src.exists()

    (ref / "00.png").unlink()
    (ref / ".DS_Store").write_bytes(b"")  # hidden files are nobody's photos
    data.make_synthetic(str(src), str(ref), n=3)
    first = {n: (src / n).read_bytes() for n in os.listdir(src)}
    assert sorted(first) == [".magicapture-synthetic", "00.png", "00_mask.png", "01.png", "01_mask.png",
                             "02.png", "02_mask.png"]
    data.make_synthetic(str(src), str(ref), n=3)  # again: same files, no complaint
    assert {n: (src / n).read_bytes() for n in os.listdir(src)} == first
    data.make_synthetic(str(src), str(ref), n=2)  # fewer: the extra drawn files go
    assert sorted(os.listdir(src)) == [".magicapture-synthetic", "00.png", "00_mask.png", "01.png", "01_mask.png"]

    photo(src / "me.jpg")  # a user's photo next to a drawn set
    with pytest.raises(SystemExit, match="holds other files \\(me.jpg\\)"):
        data.make_synthetic(str(src), str(ref), n=2)
    assert (src / "me.jpg").exists()

def test_synthetic_set_loads_without_warnings(tmp_path, capsys):
    """The drawn set loads with every mask paired; the marker file is not reported as junk."""
    data.make_synthetic(str(tmp_path / "src"), str(tmp_path / "ref"), n=2)
    items = load(str(tmp_path / "src"))
    assert len(items) == 2 and all(i.mask is not None for i in items)
    assert "warning" not in capsys.readouterr().out


def test_color_jitter_is_torchvisions_brightness_and_contrast():
    """color_jitter: brightness scales, contrast blends with the mean grey, factors within 1 +- strength, the
    result clamped to the image range, repeated exactly by the same generator, the identity at strength 0."""
    flat = torch.full((3, 8, 8), 0.2)  # a flat image: contrast cannot change it, brightness scales it
    for seed in range(20):
        out = data.color_jitter(flat * 2 - 1, 0.1, torch.Generator().manual_seed(seed)) / 2 + 0.5
        ratio = (out / 0.2).unique()
        assert len(ratio) == 1 and 0.9 - 1e-6 <= ratio.item() <= 1.1 + 1e-6, ratio
    img = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = data.color_jitter(img, 0.5, torch.Generator().manual_seed(3))
    b = data.color_jitter(img, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1 and not torch.equal(a, img)
    assert torch.allclose(data.color_jitter(img, 0.0, torch.Generator()), img, atol=1e-6)
    # torchvision's formulas (functional.adjust_brightness / adjust_contrast on float images) on a non-flat image:
    # blend(x, other, f) = (f * x + (1 - f) * other).clamp(0, 1), other = black, or the mean of the ITU-R 601 grey
    x = img / 2 + 0.5
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        f = 1 + 0.5 * (2 * torch.rand(2, generator=g) - 1)  # the same draws as color_jitter's, in its order
        want = x
        for op in torch.randperm(2, generator=g).tolist():
            other = 0.0 if op == 0 else (want * torch.tensor([0.2989, 0.587, 0.114])[:, None, None]).sum(0).mean()
            want = (f[op] * want + (1 - f[op]) * other).clamp(0, 1)
        got = data.color_jitter(img, 0.5, torch.Generator().manual_seed(seed)) / 2 + 0.5
        assert torch.allclose(got, want, atol=1e-6), seed


def test_synthetic_data_needs_two_folders(tmp_path):
    """Drawing the person and the style into one folder (the references would replace the sources) stops first."""
    with pytest.raises(SystemExit, match="both"):
        data.make_synthetic(str(tmp_path / "same"), str(tmp_path / "same" / ".." / "same"))
    assert not (tmp_path / "same").exists()

def test_misnamed_masks_and_photos_sharing_a_name_stop(tmp_path):
    """A mask saved as _mask.jpg would be trained on as a photo, and a.jpg next to a.png would share a_mask.png
    (and one overlay): both stop the intake, each named with its fix."""
    for n in ("a.jpg", "a.png", "b.png", "c.png"):
        photo(tmp_path / n)
    photo(tmp_path / "c_mask.jpg")
    with pytest.raises(SystemExit) as e:
        load(str(tmp_path))
    msg = str(e.value)
    assert "a.jpg, a.png" in msg and "share the mask name a_mask.png" in msg, msg
    assert "c_mask.jpg: a mask is read only as c_mask.png" in msg, msg

def test_transparent_mask_pixels_are_not_face(tmp_path):
    """White paint on a transparent layer: the paint is the face, the transparent rest is not (laid over white,
    as photos are, it would be all face)."""
    photo(tmp_path / "a.png", size=(64, 64))
    photo(tmp_path / "b.png", size=(64, 64))
    m = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    m.paste((255, 255, 255, 255), (0, 0, 64, 16))
    m.save(tmp_path / "a_mask.png")
    mask = load(str(tmp_path))[0].mask[0]
    assert mask[:16].min() == 1 and mask[16:].max() == 0, mask.mean()

def test_mask_of_a_turned_photo_warns(tmp_path, capsys):
    """A masked photo turned by its EXIF tag without a change of size (3: upside down) is accepted with a
    warning: its mask may have been drawn on the photo as stored."""
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.new("RGB", (96, 80), (200, 100, 50)).save(tmp_path / "a.jpg", exif=exif)
    Image.new("L", (96, 80), 255).save(tmp_path / "a_mask.png")
    photo(tmp_path / "b.png")
    load(str(tmp_path))
    out = capsys.readouterr().out
    assert "a.jpg is turned upright by its EXIF orientation tag (3)" in out and "b.png" not in out, out

def test_write_whole_leaves_the_old_file_or_the_new(tmp_path, monkeypatch):
    """data.write_whole replaces a file's content; where the disk is full, the old content stays, no temporary
    file is left, and the message names the file."""
    import errno
    path = str(tmp_path / "log.jsonl")
    data.write_whole(path, "old\n")
    data.write_whole(path, "new\n")
    assert open(path).read() == "new\n" and os.listdir(tmp_path) == ["log.jsonl"]
    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(SystemExit, match="could not write .*log.jsonl: No space left on device. It is as it was"):
        data.write_whole(path, "newer\n")
    assert open(path).read() == "new\n" and os.listdir(tmp_path) == ["log.jsonl"]
