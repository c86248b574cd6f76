"""
The paper's post-processing: Real-ESRGAN super-resolution, then CodeFormer face
restoration pasted back into the enlarged image (MagiCapture, "ours + postprocessing").
The official inference script does it another way (--upsampler=bilinear): CodeFormer's
helper without a background upsampler restores the faces at the image's own size and
pastes them into a bilinear enlargement, blended through a face-parsing mask.

    python postprocess.py out/samples/seed0.png out/samples/seed1.png --out_dir=out/enhanced
    python postprocess.py a.png --scale=4 --weight=0.7       # larger weight = closer to the input face
    python postprocess.py a.png --no_restore                 # super-resolution only
    python postprocess.py a.png --scale=1                    # face restoration only
    python postprocess.py a.png --parse                      # replace face classes only: hair, background untouched
    python postprocess.py a.png --upsampler=bilinear --parse # as the official inference script

Writes <name>_enhanced.png per input (a config file, a .py argument, sets the settings
too). In code: enhance(image) on an HxWx3 uint8 RGB
array (sample.py's --postprocess calls it). The ONNX files come from the Hub through
faces.model_path; --upscaler_model/--restorer_model/--detector_model/--parser_model take local .onnx
files instead (the names train.py and sample.py use).
"""

import os
import sys

import cv2
import numpy as np

import faces
from configurator import check_choice, configure

# -----------------------------------------------------------------------------
# command-line settings (read only when run as a script)
out_dir = "out/enhanced"
scale = 2.0               # output size / input size (official inference: 2)
upsampler = "real_esrgan" # the enlargement: "real_esrgan" (the paper's), or "bilinear" (the official script's)
weight = 0.5              # CodeFormer fidelity (official inference: 0.5)
no_restore = False        # super-resolution only
parse = False             # restore face classes only (BiSeNet parsing)
tile = 256                # Real-ESRGAN tile core, pixels of the input
overlap = 16              # context around each tile
upscaler_model = ""       # local .onnx files; "" takes the file from the Hub
restorer_model = ""
detector_model = ""
parser_model = ""
overwrite = False         # replace <name>_enhanced.png files already in out_dir (else they stop the command)
# -----------------------------------------------------------------------------

CROP = 512  # CodeFormer works on 512x512 crops aligned to faces.FFHQ_TEMPLATE

def feed(arg, value):
    """`value` as an array of the dtype and shape an ONNX input declares (symbolic dims become 1)."""
    dtype = faces.NP_TYPES[arg.type]  # e.g. CodeFormer's weight is float64 (1,) in the real file
    if np.ndim(value) == 0:
        return np.full([d if isinstance(d, int) else 1 for d in arg.shape], value, dtype=dtype)
    return value.astype(dtype)

def check_image(image):
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an HxWx3 uint8 RGB array, got {getattr(image, 'dtype', type(image))} "
                         f"{getattr(image, 'shape', '')}")

# -----------------------------------------------------------------------------
# Real-ESRGAN, in overlapping tiles

def tiled(sess, image, tile=256, overlap=16):
    """Run a super-resolution session over `image` (HxWx3 uint8 RGB) tile by tile -> (fH, fW, 3) uint8
    RGB, f the model's factor (4 for real_esrgan_x4).

    Each `tile`-sized core is run with `overlap` pixels of real context on every side (clipped at the
    image border, where the whole-image run sees the model's own padding too), and only the core's
    part of the output is kept: as long as the model's receptive field is within `overlap`, tiles
    give the same numbers as one whole-image run, so no seam shows, while memory stays that of one
    tile. The model's spatial size is dynamic, so border tiles may be smaller, down to 1 pixel."""
    check_image(image)
    h, w = image.shape[:2]
    out = None
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)                        # core
            py0, px0 = max(y0 - overlap, 0), max(x0 - overlap, 0)                # core + context
            py1, px1 = min(y1 + overlap, h), min(x1 + overlap, w)
            x = image[py0:py1, px0:px1].transpose(2, 0, 1)[None] / 255.0         # (1, 3, th, tw) RGB in [0, 1]
            y = faces.run(sess, x)[0][0]                                         # (3, f*th, f*tw) in [0, 1]
            f = y.shape[1] // (py1 - py0)
            if out is None:
                out = np.empty((f * h, f * w, 3), np.uint8)
            y = y[:, f * (y0 - py0):f * (y1 - py0), f * (x0 - px0):f * (x1 - px0)]  # crop back to the core
            y = np.clip(y.transpose(1, 2, 0).astype(np.float32), 0, 1)
            out[f * y0:f * y1, f * x0:f * x1] = np.rint(y * 255)
    return out

def upscale(image, scale=4, tile=256, overlap=16, model=None):
    """Real-ESRGAN x4 super-resolution of an HxWx3 uint8 RGB image, resized to `scale` times its size
    (2: the model's 4x result shrunk with area averaging; 4: the model's output as is)."""
    sess = faces.session(faces.model_path("upscaler", model))
    out = tiled(sess, image, tile, overlap)
    h, w = round(image.shape[0] * scale), round(image.shape[1] * scale)
    if out.shape[:2] != (h, w):
        shrink = h < out.shape[0]
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    return out

# -----------------------------------------------------------------------------
# CodeFormer, with paste-back

def feather(mask, edge):
    """Shrink a mask by `edge` pixels, then blur it over `edge` pixels: the soft edge stays inside the
    original mask, so pixels outside it are never touched."""
    k = 2 * edge + 1
    return cv2.GaussianBlur(cv2.erode(mask, np.ones((k, k), np.uint8)), (k, k), 0)

def paste_back(image, crop, matrix, parse_mask=None):
    """Blend a restored CROPxCROP crop (float32 RGB 0..255) into `image` (float32 HxWx3) through the
    inverse of the alignment `matrix`. parse_mask (H, W) in [0, 1], if given, narrows the blend to it."""
    h, w = image.shape[:2]
    inverse = cv2.invertAffineTransform(matrix)
    face = cv2.warpAffine(crop, inverse, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones((CROP, CROP), np.float32), inverse, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.erode(mask, np.ones((3, 3), np.uint8))  # drop the rim where the crop's border was interpolated
    edge = max(1, int(np.sqrt(mask.sum())) // 20)      # feather width: sqrt(face area) / 20, as CodeFormer's helper
    mask = feather(mask, edge)
    if parse_mask is not None:
        mask *= feather(parse_mask.astype(np.float32), edge)
    mask = mask[..., None]
    return image * (1 - mask) + face * mask

def restore_faces(image, weight=0.5, model=None, detector=None, parse=False, parser=None, canvas=None):
    """CodeFormer on every detected face of an HxWx3 uint8 RGB image -> (image, number of faces restored).

    weight is CodeFormer's fidelity w in [0, 1]: smaller restores more, larger keeps closer to the
    input (official inference: 0.5). parse (implied by a parser file) replaces only the face classes
    of the BiSeNet parsing (faces.face_mask), leaving hair, neck and background untouched. canvas, if
    given, is an enlargement of the image that the faces found and restored in the image are pasted into
    (the official script's order), and the result is the size of the canvas."""
    check_image(image)
    canvas = image if canvas is None else canvas
    found = faces.detect(image, model=detector)
    if not found:
        return canvas, 0
    sess = faces.session(faces.model_path("restorer", model))
    args = sess.get_inputs()  # the real file: image (1, 3, 512, 512) float32, weight (1,) float64
    out = canvas.astype(np.float32)
    # canvas -> image coordinates, pixel centres as cv2.resize places them: x = (X + 0.5) * w / W - 0.5
    sx, sy = image.shape[1] / canvas.shape[1], image.shape[0] / canvas.shape[0]
    to_image = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
    for face in found:
        matrix = faces.similarity_transform(face.landmarks, faces.FFHQ_TEMPLATE)  # (2, 3) image -> crop
        # unlike faces.warp (black outside the image), replicate the border: a crop reaching past the image
        # edge then warps back without darkening the edge pixels, and CodeFormer sees no false black bars
        crop = cv2.warpAffine(image, matrix, (CROP, CROP), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        x = (crop.transpose(2, 0, 1)[None] / 255.0 - 0.5) / 0.5                    # (1, 3, 512, 512) in [-1, 1]
        feeds = {args[0].name: feed(args[0], x)}
        if len(args) > 1:
            feeds[args[1].name] = feed(args[1], weight)
        y = sess.run(None, feeds)[0][0].astype(np.float32)                         # (3, 512, 512) in [-1, 1]
        restored = (np.clip(y, -1, 1).transpose(1, 2, 0) + 1) * 127.5
        parse_mask = faces.face_mask(image, face, model=parser) if parse or parser else None
        if parse_mask is not None and canvas is not image:
            parse_mask = cv2.resize(parse_mask, canvas.shape[1::-1], interpolation=cv2.INTER_LINEAR)
        out = paste_back(out, np.ascontiguousarray(restored), matrix @ to_image, parse_mask)  # canvas -> crop
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), len(found)

# -----------------------------------------------------------------------------

UPSAMPLERS = ("real_esrgan", "bilinear")

def find_models(upscale_factor=2, restore=True, upscaler=None, restorer=None, detector=None, parse=False, parser=None,
                upsampler="real_esrgan", weight=0.5, also=None):
    """{kind: local .onnx path} of the models enhance() will run with these settings, and of the face models in
    `also` ({kind: path or None}), each found in the cache (or downloaded) now: missing ones, or a setting out of
    range, stop the command before any work, naming every missing file and how to fetch it, or the setting."""
    check_choice("upsampler", upsampler, UPSAMPLERS)
    if not upscale_factor > 0:
        raise SystemExit(f"the upscale factor (postprocess.py's --scale, sample.py's and eval.py's --upscale_factor) "
                         f"must be > 0, got {upscale_factor}")
    if not 0 <= weight <= 1:
        raise SystemExit(f"the restoration weight (CodeFormer's fidelity: postprocess.py's --weight, sample.py's and "
                         f"eval.py's --restore_weight) must be in [0, 1], got {weight}")
    wanted = dict(upscaler=(upscale_factor != 1 and upsampler == "real_esrgan", upscaler), restorer=(restore, restorer),
                  detector=(restore, detector), parser=(restore and (parse or parser is not None), parser))
    try:
        return faces.model_paths({kind: path for kind, (used, path) in wanted.items() if used} | (also or {}))
    except faces.MissingModel as e:
        raise SystemExit(str(e))

def enhance(image, upscale_factor=2, restore=True, weight=0.5, tile=256, overlap=16,
            upscaler=None, restorer=None, detector=None, parse=False, parser=None, upsampler="real_esrgan"):
    """upsampler "real_esrgan", the paper's order: super-resolution first, then face restoration on the enlarged
    image. "bilinear", the official inference script's (CodeFormer's helper without a background upsampler): the
    image enlarged bilinearly, the faces found and restored in the image as it was, pasted into the enlargement.
    upscale_factor 1 enlarges nothing; restore=False skips faces. Prints what it did."""
    check_image(image)
    if upsampler not in UPSAMPLERS:
        raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {upsampler!r}")
    h, w = image.shape[:2]
    upscaled, canvas = upscale_factor != 1, None
    if upscaled and upsampler == "real_esrgan":
        image = upscale(image, upscale_factor, tile, overlap, upscaler)
        print(f"upscaled {w}x{h} -> {image.shape[1]}x{image.shape[0]} (Real-ESRGAN)")
    elif upscaled:
        size = (round(w * upscale_factor), round(h * upscale_factor))
        canvas = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        print(f"upscaled {w}x{h} -> {canvas.shape[1]}x{canvas.shape[0]} (bilinear)")
    if not restore:
        return image if canvas is None else canvas
    image, n = restore_faces(image, weight, restorer, detector, parse, parser, canvas)
    if n:
        print(f"restored {n} face{'s' if n > 1 else ''} (CodeFormer, weight {weight})")
    else:
        print("no face found: upscaled only" if upscaled else "no face found: image unchanged")
    return image

if __name__ == "__main__":
    from PIL import Image
    from data import read_rgb
    # the images; configure() gets the config files and the settings (it would read the images as config files)
    settings = [a for a in sys.argv[1:] if a.startswith("-") or a.endswith(".py")]
    paths = [a for a in sys.argv[1:] if a not in settings]
    configure(globals(), settings)
    if not paths:
        raise SystemExit("no image given: python postprocess.py in.png [more.png ...] [--key=value ...] "
                         "(--help lists the settings)")
    if not (tile > 0 and overlap >= 0):
        raise SystemExit(f"tile must be > 0 and overlap >= 0; got tile={tile}, overlap={overlap}")
    names = {}
    for p in paths:
        if not os.path.isfile(p):
            raise SystemExit(f"{p}: no such file")
        name = os.path.join(out_dir, os.path.splitext(os.path.basename(p))[0] + "_enhanced.png")
        if name in names:
            raise SystemExit(f"{names[name]} and {p} would both be written to {name}: enhance them with "
                             "different --out_dir values, or rename one")
        names[name] = p
    there = [n for n in names if os.path.exists(n)]
    if there and not overwrite:
        raise SystemExit(f"{', '.join(there)} {'is' if len(there) == 1 else 'are'} there already: pick another "
                         "--out_dir, or replace them with --overwrite")
    models = find_models(scale, not no_restore, upscaler_model or None, restorer_model or None,
                         detector_model or None, parse, parser_model or None, upsampler, weight)
    os.makedirs(out_dir, exist_ok=True)
    for name, p in names.items():
        print(p)
        image = enhance(np.asarray(read_rgb(p)), scale, not no_restore, weight, tile, overlap, models.get("upscaler"),
                        models.get("restorer"), models.get("detector"), parse, models.get("parser"), upsampler)
        Image.fromarray(image).save(name)
        print(f"-> {name}")
