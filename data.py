"""
Image intake for train.py: find the photos in a folder, read them safely, crop,
resize, and pair each with its face mask. Every problem names the file and says
what to do, and all of it happens before any model is loaded.

A mask is a `<name>_mask.png` next to `<name>.jpg` (white = face, the paper's
M_s; the reference's M_r is its inverse). make_synthetic() draws the small data
set config/tiny.py trains on, only into a folder of its own.
"""

import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageOps, UnidentifiedImageError

EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".webp")  # .jfif: JPEG, as some browsers save it
MASK_SUFFIX = "_mask.png"
# Pillow's own default Image.MAX_IMAGE_PIXELS, ~89.5 MP (about 9500x9500): more than any phone takes and far
# more than a 512 px crop can use, while each photo is held whole in memory for the run
MAX_PIXELS = 89_478_485
SYNTHETIC_MARKER = ".magicapture-synthetic"  # make_synthetic's list of the files it drew in a folder

@dataclass
class Photo:
    """One photo of a concept, from load_folder to the training loop."""
    path: str
    photo: Image.Image                      # upright RGB, full size
    mask_photo: Image.Image | None = None   # L, full size, from <name>_mask.png
    image: torch.Tensor | None = None       # (3, R, R) in [-1, 1], once cropped
    mask: torch.Tensor | None = None        # (1, R, R) in [0, 1], white = face
    square: tuple | None = None             # (left, top, side) of the crop in photo
    face: object = None                     # a faces.Face, set by train.py (data.py needs no face models)

def heic_hint(name):
    """What to do with a HEIC photo (iPhones' default format), which Pillow cannot read."""
    stem, ext = os.path.splitext(name)
    heic = ext.lower() in (".heic", ".heif")
    return ("HEIC is not read" + ("" if heic else f" (a HEIC file under a {ext} name)") + "; save it as JPEG (on a "
            f"Mac: sips -s format jpeg {name} --out {stem}{'' if heic else '_converted'}.jpg)")

def is_heic(path):
    """A HEIC/HEIF file by its header (an ISO box 'ftyp' with a HEIF brand), whatever its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")

def mask_path(path):
    """Where the mask of a photo lives: <name>_mask.png next to <name>.jpg."""
    return os.path.splitext(path)[0] + MASK_SUFFIX

def list_images(folder):
    """-> sorted [(photo path, its mask's path or None)]. A mask pairs by its exact name on every file system;
    a mask without its photo and anything else that is not a photo are skipped with a warning."""
    if not os.path.isdir(folder):
        raise SystemExit(f"{folder} is not a folder: point source_dir/reference_dir at a folder of photos")
    names = sorted(os.listdir(folder))
    paths, masks, bad = [], set(), []
    for n in names:
        path = os.path.join(folder, n)
        stem, ext = os.path.splitext(n)
        if n.startswith("."):  # hidden: .DS_Store, macOS's ._<name> copies of attributes, SYNTHETIC_MARKER
            continue
        if n.lower().endswith(MASK_SUFFIX):
            masks.add(path)
        elif os.path.isdir(path):
            print(f"warning: skipping the subfolder {path}: the photos are read from {folder} itself")
        elif stem.lower().endswith("_mask") and ext.lower() in EXTENSIONS:  # else it would train as a photo
            bad.append(f"  {path}: a mask is read only as {stem}.png (lossless: JPEG and WebP blur its edges); "
                       f"save it as {os.path.join(folder, stem)}.png")
        elif ext.lower() in EXTENSIONS:
            paths.append(path)
        elif ext.lower() in (".heic", ".heif"):
            print(f"warning: skipping {path}: {heic_hint(n)}")
        else:
            print(f"warning: skipping {path} (not a {'/'.join(EXTENSIONS)} photo)")
    stems = {}
    for p in paths:
        stems.setdefault(mask_path(p), []).append(os.path.basename(p))
    for m, same in stems.items():
        if len(same) > 1:  # their masks and their overlays in out_dir/masks would be one file
            bad.append(f"  {', '.join(same)} in {folder}: photos that differ only in their extension share the mask "
                       f"name {os.path.basename(m)}; rename all but one")
    if bad:
        raise SystemExit("these files cannot be used; fix them and run again:\n" + "\n".join(bad))
    for m in sorted(masks - {mask_path(p) for p in paths}):
        print(f"warning: ignoring {m}: it belongs to no photo (the mask of <name>.jpg, .png, ... "
              f"must be named exactly <name>{MASK_SUFFIX}, next to it)")
    return [(p, mask_path(p) if mask_path(p) in masks else None) for p in paths]

def digest(path):
    """SHA-256 of a photo's file and of its mask's, if it has one: what the photo is, whatever its file's date."""
    h = hashlib.sha256()
    for p in (path, mask_path(path)):
        if os.path.exists(p):
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()

def digests(groups):
    """What a run's photos are: {"<kind>/<file name>": digest} for groups {kind: [photo paths]}."""
    return {f"{kind}/{os.path.basename(p)}": digest(p) for kind, paths in groups.items() for p in paths}

def digest_changes(was, now):
    """The photos that differ between two digests() results, one line each: added, removed or changed."""
    return [f"  {k}: {'removed' if k not in now else 'added' if k not in was else 'changed'}"
            for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]

def open_image(path):
    """Image.open, refusing a file over MAX_PIXELS by the size in its header, before it is decoded, with a message
    that names the size and the fix. Pillow's own check is off meanwhile: above Image.MAX_IMAGE_PIXELS it only
    warns, and above twice that it raises DecompressionBombError, whose traceback does not name the file.
    A huge photo is refused rather than downscaled: its mask, if any, would need the same resize."""
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        im = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise ValueError(f"{w}x{h} pixels, over the limit of {MAX_PIXELS / 1e6:.0f} megapixels; "
                         "downscale it (e.g. to 4000 px on the long side)")
    return im

def to_srgb(im, path):
    """An RGB(A) image whose embedded colour profile is not sRGB (a phone's Display P3, Adobe RGB) converted to
    sRGB, the colours a viewer shows and the space Stable Diffusion's images are in; read as they are, its
    numbers would give duller colours. Other images unchanged; a profile that cannot be read, with a warning."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA"):
        return im
    from PIL import ImageCms
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if ImageCms.getProfileDescription(profile).strip().lower().startswith("srgb"):
            return im
        return ImageCms.profileToProfile(im, profile, ImageCms.createProfile("sRGB"), outputMode=im.mode)
    except (ImageCms.PyCMSError, OSError) as e:
        print(f"warning: {path}: its colour profile cannot be read ({e}); its colours are taken as sRGB")
        return im

def read_rgb(path):
    """Open a photo upright (EXIF orientation applied) as 8-bit RGB, whatever Pillow's mode:
    - I;16, I;16B, ... (16-bit grey): 0..65535 scaled to 0..255 (Pillow's own convert clips at 255: all white);
    - I (32-bit int): taken to hold 16-bit values, as Pillow gives this mode to 16-bit grey PNGs (PNG stores
      at most 16 bits); values outside 0..65535 (a 32-bit TIFF under a photo's name) are clipped;
    - F (32-bit float, TIFF): 0..1 when no value exceeds 1, else 0..255 like Pillow's own L <-> F;
    - RGBA, LA, PA, and P, L or RGB with a transparent colour: composited over white;
    - 16-bit RGB(A) PNGs: Pillow already keeps the high byte; L, 1, P, CMYK, YCbCr: Pillow's convert;
    - an RGB(A) photo with a colour profile other than sRGB: converted to sRGB (to_srgb)."""
    with open_image(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
    im = to_srgb(im, path)
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "F" else 1.0 if a.max() <= 1 else 255.0
        im = Image.fromarray(np.round(np.clip(a / top, 0, 1) * 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return im.convert("RGB")

def read_mask(path):
    """A <name>_mask.png as an L image (white = face), upright like its photo. Transparent pixels count as black
    (not face), so white paint on an otherwise transparent layer is a mask as it stands; read_rgb would lay
    them over white and make the whole photo face."""
    with open_image(path) as im:
        im.load()
        if not (im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info):
            return read_rgb(path).convert("L")
        im = ImageOps.exif_transpose(im).convert("RGBA")
    black = Image.new("RGBA", im.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, im).convert("L")

def load_folder(folder, min_images=2):
    """-> list of Photo with path, photo and mask_photo set (the rest is set by crop and train.py).
    Every unusable file is named in one message; too few photos stop the run."""
    photos, bad = [], []
    for path, mp in list_images(folder):
        try:
            im = read_rgb(path)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            bad.append(f"  {path}: " + (heic_hint(os.path.basename(path)) if is_heic(path) else str(e)))
            continue
        if min(im.size) < 64:
            bad.append(f"  {path}: only {im.size[0]}x{im.size[1]} pixels (64 on the short side at least)")
            continue
        p = Photo(path, im)
        if mp is not None:
            try:
                m = read_mask(mp)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                bad.append(f"  {mp}: {e}")
                continue
            with open_image(path) as raw:
                turned = raw.getexif().get(ExifTags.Base.Orientation, 1)  # 1: stored upright
            if m.size != im.size:
                w, h = im.size
                problem = f"{m.size[0]}x{m.size[1]}, but its photo is {w}x{h}"
                # drawn on the photo as stored, before the EXIF turn? Tags 5-8 swap width and height
                if m.size == (h, w) and turned in (5, 6, 7, 8):
                    problem = (f"{h}x{w}, the size of {os.path.basename(path)} as stored, but its EXIF "
                               f"orientation tag ({turned}) turns that photo to {w}x{h} upright. The mask must "
                               "match the upright photo: rotate the mask the same way, or save the photo "
                               "upright (without the tag)")
                bad.append(f"  {mp}: {problem}")
                continue
            if turned != 1:  # a mask drawn on the photo as stored matches in size only if the turn keeps it
                print(f"warning: {path} is turned upright by its EXIF orientation tag ({turned}); its mask must "
                      "match the upright photo, as a viewer shows it: check its overlay in out_dir/masks")
            p.mask_photo = m
        photos.append(p)
    if bad:
        raise SystemExit("these files cannot be used; fix or remove them and run again:\n" + "\n".join(bad))
    if len(photos) < min_images:
        raise SystemExit(f"{folder} has {len(photos)} usable photo(s); MagiCapture needs at least {min_images} "
                         "(the paper uses 4-6 per concept)")
    return photos

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

def crop(photo, square, resolution):
    """Cut the square from the photo (and its mask) and resize: sets photo.image (3, R, R) in [-1, 1]
    and photo.mask (1, R, R) in [0, 1] or None; photo.square remembers the crop."""
    left, top, side = square
    box = (left, top, left + side, top + side)
    photo.image = to_tensor(photo.photo.crop(box).resize((resolution, resolution), Image.LANCZOS)) * 2 - 1
    m = photo.mask_photo
    photo.mask = None if m is None else to_tensor(m.crop(box).resize((resolution, resolution), Image.BILINEAR))
    photo.square = square

def check_masks(photos, min_fraction, objects=False):
    """Stop if a mask (photo.mask, at training resolution, after the crop) marks as face under min_fraction or
    over 1 - min_fraction of its photo, naming each. A source with an empty mask never learns the person (loss_s,
    eq. 4, is 0); a reference whose mask is all face has nothing left for the style (loss_r and loss_c, eq. 5-6,
    are 0). train.py's min_mask_fraction = 0.005 is about 20 latent pixels of a 64x64 latent (SD1.5 at 512 px):
    fewer make the masked mean of eq. 4-6 an average over a handful of pixels. 0 turns the check off.
    objects: the sources' object masks, of which only an empty one is wrong (all object is a photo without one)."""
    if objects:
        empty = [f"  {mask_path(p.path)}: {p.mask.mean().item():.1%} object" for p in photos
                 if p.mask.mean().item() < min_fraction]
        if empty:
            raise SystemExit(f"these masks mark almost none of their photo as the object (under {min_fraction:.1%} "
                             "of the crop):\n" + "\n".join(empty) + "\nPaint the object white and the rest black, "
                             "or delete the mask: the whole photo then counts as the object. min_mask_fraction sets "
                             "the limit.")
        return
    bad = []
    for p in photos:
        face = p.mask.mean().item()
        if face < min_fraction or face > 1 - min_fraction:
            what = mask_path(p.path) if p.mask_photo is not None else f"the automatic face-parser mask of {p.path}"
            bad.append(f"  {what}: {face:.1%} face")
    if bad:
        raise SystemExit(
            f"these masks cover almost none or almost all of their photo (face under {min_fraction:.1%} or over "
            f"{1 - min_fraction:.1%} of the crop):\n" + "\n".join(bad) + "\n"
            "A source needs face pixels to learn the person from, a reference needs pixels outside the face to "
            "learn the style from. Fix a <name>_mask.png by painting the face white and the rest black (or delete "
            "it to use the face parser); for a parser mask, use a photo where the face is clearly visible and does "
            "not fill the whole crop (or change face_margin), or draw a <name>_mask.png yourself. "
            "min_mask_fraction sets the limit.")

def to_tensor(im):
    """PIL image -> float tensor (C, H, W) in [0, 1]."""
    a = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(a[..., None] if a.ndim == 2 else a).permute(2, 0, 1).contiguous()

def color_jitter(image, strength, generator):
    """torchvision's ColorJitter(brightness=strength, contrast=strength), as the official data set applies
    it (0.1): each factor uniform in [1 - strength, 1 + strength], the two in a random order, clamped to
    the image range. image: (3, H, W) in [-1, 1]; randomness from `generator`, so a resumed run repeats it."""
    x = image / 2 + 0.5
    factors = 1 + strength * (2 * torch.rand(2, generator=generator) - 1)
    for op in torch.randperm(2, generator=generator).tolist():
        if op == 0:  # brightness: blend with black
            x = (x * factors[0]).clamp(0, 1)
        else:  # contrast: blend with the mean grey level (ITU-R 601 luma, as torchvision)
            grey = (0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]).mean()
            x = ((x - grey) * factors[1] + grey).clamp(0, 1)
    return x * 2 - 1

def save_overlay(photo, mask, path):
    """The photo with its mask tinted red, so a user can check what counts as the face."""
    img = (photo.image + 1) / 2
    red = torch.tensor([1.0, 0.2, 0.2])[:, None, None]
    save_png(img * (1 - 0.5 * mask) + red * 0.5 * mask, path)

def to_uint8(image):
    """(3, H, W) float tensor in [0, 1] -> (H, W, 3) uint8 array, what PIL and the face models read."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

def save_png(image, path):
    """(3, H, W) float in [0, 1] -> 8-bit PNG, written whole then renamed: a kill leaves no cut-short file that a
    later run would take as drawn."""
    Image.fromarray(to_uint8(image)).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)

def write_whole(path, text):
    """Replace path's content: written beside it, then renamed over it, so a full disk or a kill leaves the old
    file or the new one, never a part (a log or config.json cut short would lose rows or the run's id)."""
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise SystemExit(f"could not write {path}: {e.strerror}. It is as it was: free some space (or fix the "
                         "folder's permissions) and run again.")

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

def drawn_files(folder):
    """The files make_synthetic drew into folder before (listed in its marker file); stops if the folder holds
    anything else, so a user's photos are never drawn over. Hidden files (.DS_Store) are neither."""
    if not os.path.exists(folder):
        return []
    marker, drawn = os.path.join(folder, SYNTHETIC_MARKER), []
    if os.path.exists(marker):
        with open(marker) as f:
            drawn = f.read().split()
    other = sorted(n for n in os.listdir(folder) if not n.startswith(".") and n not in drawn)
    if other:
        raise SystemExit(f"synthetic_data would draw faces into {folder}, but it holds other files ("
                         + ", ".join(other[:3]) + (", ..." if len(other) > 3 else "") + "): point source_dir/"
                         "reference_dir at a missing or empty folder, or set synthetic_data=False to train on "
                         "those photos")
    return drawn

def draw_object(draw, box):
    """A simple 'toy': a red body with a white window and two dark wheels, inside box."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    draw.rounded_rectangle((x0, y0 + 0.2 * h, x1, y0 + 0.8 * h), radius=max(1, w // 8), fill=(200, 40, 40))
    draw.rectangle((x0 + 0.2 * w, y0 + 0.3 * h, x0 + 0.5 * w, y0 + 0.55 * h), fill=(240, 240, 240))
    for cx in (x0 + 0.25 * w, x0 + 0.75 * w):
        draw.ellipse((cx - 0.12 * w, y0 + 0.7 * h, cx + 0.12 * w, y0 + 0.7 * h + 0.24 * w), fill=(30, 30, 30))

def make_synthetic(source_dir, reference_dir, n=4, size=256, seed=0, objects=False):
    """Sources: one drawn person (same skin and eyes) on plain backgrounds at varied places.
    References: another drawn face in a striped, high-contrast 'style'. Masks alongside.
    objects=True (train.py's subject="object"): sources are a drawn toy with its mask, references a
    checkered texture in a fixed palette with no mask (the whole photo is the style).
    Draws only into a missing or empty folder, or over a set it drew before (same seed: the same images)."""
    if os.path.abspath(source_dir) == os.path.abspath(reference_dir):
        raise SystemExit(f"synthetic_data draws the person and the style into two folders, but source_dir and "
                         f"reference_dir are both {source_dir}: give them different folders")
    old_source, old_reference = drawn_files(source_dir), drawn_files(reference_dir)  # both checked first
    rng = np.random.default_rng(seed)
    for folder, styled, old in ((source_dir, False, old_source), (reference_dir, True, old_reference)):
        os.makedirs(folder, exist_ok=True)
        masked = not (objects and styled)
        names = [f"{i:02d}{end}" for i in range(n) for end in ((".png", MASK_SUFFIX) if masked else (".png",))]
        for stale in [os.path.join(folder, name) for name in set(old) - set(names)]:  # left from a larger n
            if os.path.exists(stale):
                os.remove(stale)
        with open(os.path.join(folder, SYNTHETIC_MARKER), "w") as f:  # first: a run cut short leaves only listed files
            f.write("\n".join(names) + "\n")
        for i in range(n):
            im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(60, 200, 3)))
            d = ImageDraw.Draw(im)
            if objects and styled:  # a checkered texture, its squares of a random size
                cell = int(rng.integers(12, 32))
                for y in range(0, size, cell):
                    for x in range((y // cell) % 2 * cell, size, 2 * cell):
                        d.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(20, 120, 160))
                im.save(os.path.join(folder, f"{i:02d}.png"))
                continue
            if styled:  # diagonal stripes in a fixed purple/yellow palette
                for k in range(-size, size, 24):
                    d.line((k, 0, k + size, size), fill=(90, 30, 140), width=10)
                    d.line((k + 12, 0, k + 12 + size, size), fill=(240, 200, 40), width=4)
            fs = int(size * rng.uniform(0.4, 0.55))
            x0, y0 = (int(v) for v in rng.integers(size // 10, size - fs - size // 10, 2))
            box = (x0, y0, x0 + fs, y0 + int(fs * 1.2) if y0 + int(fs * 1.2) < size else size - 1)
            mask = Image.new("L", (size, size), 0)
            if objects:
                draw_object(d, box)
                shape = Image.new("RGB", (size, size))
                draw_object(ImageDraw.Draw(shape), box)  # the same shapes on black: white where the object is
                mask = shape.convert("L").point(lambda v: 255 if v else 0)
            else:
                skin, eye = ((200, 150, 110), (40, 80, 200)) if styled else ((250, 210, 170), (30, 140, 40))
                draw_face(d, box, skin, eye)
                ImageDraw.Draw(mask).ellipse(box, fill=255)
            im.save(os.path.join(folder, f"{i:02d}.png"))
            mask.save(os.path.join(folder, f"{i:02d}{MASK_SUFFIX}"))
