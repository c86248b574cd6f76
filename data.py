"""
Image intake for train.py: find the photos in a folder, read them safely, crop,
resize, and pair each with its face mask. Every problem names the file and says
what to do, and all of it happens before any model is loaded.

A mask is a `<name>_mask.png` next to `<name>.jpg` (white = face, the paper's
M_s; the reference's M_r is its inverse). make_synthetic() draws the small data
set config/tiny.py trains on.
"""

import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MASK_SUFFIX = "_mask.png"

def list_images(folder):
    """Photos in a folder, sorted; masks are paired later, anything else is skipped with a warning."""
    if not os.path.isdir(folder):
        raise SystemExit(f"{folder} is not a folder: point source_dir/reference_dir at a folder of photos")
    names = sorted(os.listdir(folder))
    paths = []
    for n in names:
        path = os.path.join(folder, n)
        if n.lower().endswith(MASK_SUFFIX) or os.path.isdir(path):
            continue
        if n.lower().endswith(EXTENSIONS) and not n.startswith("."):
            paths.append(path)
        else:
            print(f"warning: skipping {path} (not a .jpg/.jpeg/.png/.webp photo)")
    return paths

def read_rgb(path):
    """Open a photo upright (EXIF orientation applied) as RGB; transparency is composited over white."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im)
        return im.convert("RGB")  # also L, CMYK, I;16 ...

def load_folder(folder, min_images=2):
    """-> list of dicts {path, photo (upright RGB PIL image), mask_photo (L PIL image) or None}.
    Every unusable file is named in one message; too few photos stop the run."""
    items, bad = [], []
    for path in list_images(folder):
        try:
            im = read_rgb(path)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            bad.append(f"  {path}: {e}")
            continue
        if min(im.size) < 64:
            bad.append(f"  {path}: only {im.size[0]}x{im.size[1]} pixels")
            continue
        item = dict(path=path, photo=im, mask_photo=None)
        mask_path = os.path.splitext(path)[0] + MASK_SUFFIX
        if os.path.exists(mask_path):
            try:
                m = read_rgb(mask_path)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                bad.append(f"  {mask_path}: {e}")
                continue
            if m.size != im.size:
                bad.append(f"  {mask_path}: {m.size[0]}x{m.size[1]}, but its photo is {im.size[0]}x{im.size[1]}")
                continue
            item["mask_photo"] = m.convert("L")
        items.append(item)
    if bad:
        raise SystemExit("these files cannot be used; fix or remove them and run again:\n" + "\n".join(bad))
    if len(items) < min_images:
        raise SystemExit(f"{folder} has {len(items)} usable photo(s); MagiCapture needs at least {min_images} "
                         "(the paper uses 4-6 per concept)")
    return items

def square_around(size, box=None, margin=1.0):
    """(left, top, side) of the crop: the largest centred square, or, given a face box, a square of
    side max(face w, h) * (1 + 2 * margin) centred on the face, moved (and shrunk) to stay inside."""
    w, h = size
    if box is None:
        side = min(w, h)
        return (w - side) // 2, (h - side) // 2, side
    x1, y1, x2, y2 = (float(v) for v in box)
    side = int(round(min(max(x2 - x1, y2 - y1) * (1 + 2 * margin), w, h)))
    left = int(round(min(max((x1 + x2) / 2 - side / 2, 0), w - side)))
    top = int(round(min(max((y1 + y2) / 2 - side / 2, 0), h - side)))
    return left, top, side

def crop(item, square, resolution):
    """Cut the square from the photo (and its mask) and resize: sets item["image"] (3, R, R) in [-1, 1]
    and item["mask"] (1, R, R) in [0, 1] or None; item["square"] remembers the crop."""
    left, top, side = square
    box = (left, top, left + side, top + side)
    item["image"] = to_tensor(item["photo"].crop(box).resize((resolution, resolution), Image.LANCZOS)) * 2 - 1
    m = item["mask_photo"]
    item["mask"] = None if m is None else to_tensor(m.crop(box).resize((resolution, resolution), Image.BILINEAR))
    item["square"] = square

def to_tensor(im):
    """PIL image -> float tensor (C, H, W) in [0, 1]."""
    a = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1).contiguous()

def save_overlay(item, mask, path):
    """The photo with its mask tinted red, so a user can check what counts as the face."""
    img = (item["image"] + 1) / 2
    red = torch.tensor([1.0, 0.2, 0.2])[:, None, None]
    save_png(img * (1 - 0.5 * mask) + red * 0.5 * mask, path)

def to_uint8(image):
    """(3, H, W) float tensor in [0, 1] -> (H, W, 3) uint8 array, what PIL and the face models read."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

def save_png(image, path):
    """(3, H, W) float in [0, 1] -> 8-bit PNG."""
    Image.fromarray(to_uint8(image)).save(path)

def grid(images, cols=4):
    """(N, 3, H, W) -> (3, rows*H, cols*W), filled row by row, white where empty."""
    n, c, h, w = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    out = torch.ones(c, rows * h, cols * w)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        out[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = im
    return out

def save_labeled_grid(images, cols, labels, path):
    """Save a grid with one caption line above each row (e.g. the prompt that row was drawn from)."""
    from PIL import ImageFont
    n, _, h, w = images.shape
    rows, strip = -(-n // cols), 14
    canvas = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    font, draw = ImageFont.load_default(), ImageDraw.Draw(canvas)
    for r in range(rows):
        draw.text((2, r * (h + strip) + 1), labels[r], fill="black", font=font)
        row = grid(images[r * cols:(r + 1) * cols], cols)
        canvas.paste(Image.fromarray(to_uint8(row)), (0, r * (h + strip) + strip))
    canvas.save(path)

# -----------------------------------------------------------------------------
# a synthetic data set for config/tiny.py: drawn faces, so the run needs no photos

def draw_face(draw, box, skin, eye):
    """An oval face with eyes and a mouth inside box; returns nothing, draws in place."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    draw.ellipse(box, fill=skin)
    for cx in (x0 + 0.3 * w, x0 + 0.7 * w):
        draw.ellipse((cx - 0.08 * w, y0 + 0.32 * h, cx + 0.08 * w, y0 + 0.45 * h), fill=eye)
    draw.arc((x0 + 0.3 * w, y0 + 0.5 * h, x0 + 0.7 * w, y0 + 0.8 * h), 20, 160, fill=(120, 30, 30), width=max(1, w // 20))

def make_synthetic(source_dir, reference_dir, n=4, size=256, seed=0):
    """Sources: one drawn person (same skin and eyes) on plain backgrounds at varied places.
    References: another drawn face in a striped, high-contrast 'style'. Masks alongside."""
    rng = np.random.default_rng(seed)
    for folder, styled in ((source_dir, False), (reference_dir, True)):
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(60, 200, 3)))
            d = ImageDraw.Draw(im)
            if styled:  # diagonal stripes in a fixed purple/yellow palette
                for k in range(-size, size, 24):
                    d.line((k, 0, k + size, size), fill=(90, 30, 140), width=10)
                    d.line((k + 12, 0, k + 12 + size, size), fill=(240, 200, 40), width=4)
            fs = int(size * rng.uniform(0.4, 0.55))
            x0, y0 = (int(v) for v in rng.integers(size // 10, size - fs - size // 10, 2))
            box = (x0, y0, x0 + fs, y0 + int(fs * 1.2) if y0 + int(fs * 1.2) < size else size - 1)
            skin, eye = ((200, 150, 110), (40, 80, 200)) if styled else ((250, 210, 170), (30, 140, 40))
            draw_face(d, box, skin, eye)
            mask = Image.new("L", (size, size), 0)
            ImageDraw.Draw(mask).ellipse(box, fill=255)
            im.save(os.path.join(folder, f"{i:02d}.png"))
            mask.save(os.path.join(folder, f"{i:02d}{MASK_SUFFIX}"))
