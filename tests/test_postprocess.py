"""postprocess.py with stand-in ONNX models: seamless Real-ESRGAN tiles, CodeFormer paste-back, enhance and the CLI.
Run: python -m pytest -q tests/test_postprocess.py"""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import faces
import postprocess
import standins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("standins")
    return dict(nearest=standins.upscaler(str(d / "nearest.onnx")),
                conv=standins.upscaler(str(d / "conv.onnx"), conv=True),
                identity=standins.restorer(str(d / "identity.onnx")),
                green=standins.restorer(str(d / "green.onnx"), (0, 255, 0)))

def smooth_image(h, w, seed=0):
    """Blurred noise: a photo-like image, so warping twice loses little."""
    rng = np.random.default_rng(seed)
    x = cv2.GaussianBlur(rng.uniform(0, 255, (h, w, 3)).astype(np.float32), (0, 0), 3)
    x = (x - x.min()) / max(x.max() - x.min(), 1e-6) * 255
    return np.rint(x).astype(np.uint8)

def plant(path, shape, *centres, eye_distance=40.0):
    """A stand-in detector (tests/standins.py) that finds upright faces at the given (x, y) centres of
    an image of `shape`, eye-mouth landmarks scaled from the FFHQ template. Returns the file's path.
    Images with no pixel above 127 have no face for it."""
    t = faces.FFHQ_TEMPLATE.astype(np.float64)
    s = eye_distance / (t[1, 0] - t[0, 0])
    letterbox = standins.DET_SIZE / max(shape[:2])  # the detector sees the image scaled into 640x640
    planted = []
    for cx, cy in centres:
        lm = (t - t.mean(0)) * s + (cx, cy)
        box = (lm[:, 0].min() - 15, lm[:, 1].min() - 25, lm[:, 0].max() + 15, lm[:, 1].max() + 15)
        planted.append(dict(box=np.array(box) * letterbox, landmarks=lm * letterbox, score=0.9))
    return standins.detector(str(path), planted)

def crop_footprint(image, face, grow):
    """Pixels covered by the 512 crop of `face` mapped back into the image, grown by `grow` pixels."""
    m = faces.similarity_transform(face.landmarks, faces.FFHQ_TEMPLATE)
    h, w = image.shape[:2]
    area = cv2.warpAffine(np.ones((512, 512), np.float32), cv2.invertAffineTransform(m), (w, h))
    return cv2.dilate((area > 0).astype(np.uint8), np.ones((2 * grow + 1,) * 2, np.uint8)) > 0

# -----------------------------------------------------------------------------
# Real-ESRGAN tiles

@pytest.mark.parametrize("h,w,tile,overlap", [(37, 2 * 16 + 1, 16, 4),  # 1-pixel-wide last column of tiles
                                              (2 * 16 + 1, 21, 16, 0),  # 1-pixel-high last row, no context
                                              (1, 1, 16, 4), (50, 40, 64, 8)])  # one pixel; one tile
def test_tiles_exact_with_nearest(models, h, w, tile, overlap):
    """Tiled x4 nearest-neighbour equals whole-image upsampling exactly, border tiles of 1 pixel included."""
    image = smooth_image(h, w)
    out = postprocess.upscale(image, scale=4, tile=tile, overlap=overlap, model=models["nearest"])
    want = image.repeat(4, 0).repeat(4, 1)
    assert out.shape == want.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - want)
    assert diff.max() == 0, f"tiled != whole: max diff {diff.max()} at {np.argwhere(diff)[:3].tolist()}"

def test_tiles_seamless_with_conv(models):
    """With a 5x5 receptive field, 16 px of context make tiles equal one whole-image run (to one 8-bit
    level: float noise at a rounding edge) everywhere; with no context the same comparison finds the
    seams, so the test can see them."""
    image = smooth_image(70, 2 * 32 + 1, seed=1)  # not a multiple of the tile, 1-pixel-wide last tile
    sess = faces.session(models["conv"])
    whole = postprocess.tiled(sess, image, tile=10 ** 6, overlap=0).astype(int)
    diff = np.abs(postprocess.tiled(sess, image, tile=32, overlap=16) - whole)
    assert diff.max() <= 1, f"seams: max {diff.max()}, {(diff > 1).sum()} values off by more than one level"
    seams = np.abs(postprocess.tiled(sess, image, tile=32, overlap=0) - whole)
    assert seams.max() > 3, f"no-context tiles should differ at the seams, max diff {seams.max()}"

def test_upscale_scale2(models):
    """scale=2 is the 4x result shrunk with area averaging: for nearest x4, the input repeated 2x2."""
    image = smooth_image(23, 30)
    out = postprocess.upscale(image, scale=2, tile=8, overlap=2, model=models["nearest"])
    assert out.shape == (46, 60, 3)
    assert np.array_equal(out, image.repeat(2, 0).repeat(2, 1))

# -----------------------------------------------------------------------------
# CodeFormer paste-back

def test_identity_restorer_keeps_image(models, tmp_path):
    """A restorer that returns its crop changes the image by no more than two bilinear warps would
    (the crop reaches past the image edge here, so the edge pixels are checked too)."""
    image = smooth_image(200, 240)
    det = plant(tmp_path / "det.onnx", image.shape, (120, 100), eye_distance=50)
    out, n = postprocess.restore_faces(image, weight=0.5, model=models["identity"], detector=det)
    assert n == 1 and out.shape == image.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - image)
    print(f"identity restore: max diff {diff.max()}, mean diff {diff.mean():.4f}")
    assert diff.max() <= 4 and diff.mean() < 0.3, f"identity restore: max diff {diff.max()}, mean {diff.mean():.4f}"

def test_painting_restorer_stays_on_the_face(models, tmp_path):
    """A restorer that paints its crop green lands green on the face and leaves every pixel outside the
    crop's footprint exactly as it was."""
    image = smooth_image(300, 320)
    det = plant(tmp_path / "det.onnx", image.shape, (160, 150), eye_distance=40)
    (face,) = faces.detect(image, det)
    out, n = postprocess.restore_faces(image, model=models["green"], detector=det)
    assert n == 1
    x, y = face.landmarks[2].round().astype(int)  # the nose
    centre = out[y - 5:y + 6, x - 5:x + 6].reshape(-1, 3)
    assert np.abs(centre.astype(int) - (0, 255, 0)).max() <= 1, f"face centre not painted: {centre[:3].tolist()}"
    outside = ~crop_footprint(image, face, grow=1)
    assert outside.sum() > 0.5 * outside.size
    changed = np.any(out != image, axis=-1)
    assert not (changed & outside).any(), f"{(changed & outside).sum()} pixels changed outside the face crop"

def test_parse_mask_narrows_the_blend(models, tmp_path):
    """With a face parser, only the parsed face classes are replaced: hair (here the left half of the
    aligned crop) and everything outside the face box stay exactly as they were."""
    image = smooth_image(300, 320)
    det = plant(tmp_path / "det.onnx", image.shape, (160, 150), eye_distance=40)
    (face,) = faces.detect(image, det)
    labels = np.full((512, 512), 17)  # hair
    labels[:, 256:] = 1               # skin: the right half of the crop
    parser = standins.parser(str(tmp_path / "parser.onnx"), labels)
    out, n = postprocess.restore_faces(image, model=models["green"], detector=det, parser=parser)
    assert n == 1
    face_region = faces.face_mask(image, face, parser) > 0
    changed = np.any(out != image, axis=-1)
    assert not (changed & ~face_region).any(), f"{(changed & ~face_region).sum()} pixels changed outside the parsed face"
    assert changed.sum() > 0.3 * face_region.sum(), f"only {changed.sum()} of {face_region.sum()} face pixels changed"
    x, y = face.landmarks[2].round().astype(int)  # the nose, on the crop's centre line: right of it is skin
    skin = (x + int(face.box[2])) // 2            # middle of the skin part of the box: beyond the feathered edge
    assert np.abs(out[y, skin].astype(int) - (0, 255, 0)).max() <= 2, f"skin not painted: {out[y, skin]}"
    assert (out[y, x - 12] == image[y, x - 12]).all(), "hair changed"

def test_several_faces_each_restored(models, tmp_path):
    image = smooth_image(200, 400)
    det = plant(tmp_path / "det.onnx", image.shape, (100, 100), (300, 100), eye_distance=30)
    out, n = postprocess.restore_faces(image, model=models["green"], detector=det)
    assert n == 2
    for face in faces.detect(image, det):
        x, y = face.landmarks[2].round().astype(int)
        assert np.abs(out[y, x].astype(int) - (0, 255, 0)).max() <= 1, f"face at {x},{y} not restored"

# -----------------------------------------------------------------------------
# enhance and the CLI

def test_enhance_no_face_upscales_only(models, tmp_path, capsys):
    image = smooth_image(20, 30) // 2  # dark: the stand-in detector finds no face
    det = plant(tmp_path / "det.onnx", (40, 60), (30, 20))
    out = postprocess.enhance(image, upscale_factor=2, upscaler=models["nearest"], detector=det,
                              restorer="never-loaded.onnx")
    assert np.array_equal(out, image.repeat(2, 0).repeat(2, 1))
    said = capsys.readouterr().out
    assert "upscaled 30x20 -> 60x40" in said and "no face found: upscaled only" in said, said

def test_enhance_restores_on_the_upscaled_image(models, tmp_path, monkeypatch, capsys):
    """Paper's order: faces are detected on the enlarged image."""
    image = smooth_image(100, 100)
    det = plant(tmp_path / "det.onnx", (200, 200), (100, 100), eye_distance=40)
    seen, detect = [], faces.detect
    monkeypatch.setattr(faces, "detect", lambda im, model=None, **kw: seen.append(im.shape) or detect(im, model, **kw))
    out = postprocess.enhance(image, upscale_factor=2, weight=0.7, upscaler=models["nearest"],
                              restorer=models["green"], detector=det)
    assert seen == [(200, 200, 3)] and out.shape == (200, 200, 3)
    assert np.abs(out[100, 100].astype(int) - (0, 255, 0)).max() <= 1
    assert "restored 1 face (CodeFormer, weight 0.7)" in capsys.readouterr().out

def test_enhance_bilinear_restores_at_the_drawn_size(models, tmp_path, monkeypatch, capsys):
    """The official script's order: faces found and restored in the image as drawn, pasted into its bilinear 2x
    enlargement (no Real-ESRGAN model needed); away from the face the result is that enlargement exactly, and a
    restorer that returns its crop changes it by no more than resampling would."""
    image = smooth_image(150, 160)
    det = plant(tmp_path / "det.onnx", image.shape, (80, 75), eye_distance=30)
    (face,) = faces.detect(image, det)
    seen, detect = [], faces.detect
    monkeypatch.setattr(faces, "detect", lambda im, model=None, **kw: seen.append(im.shape) or detect(im, model, **kw))
    assert set(postprocess.find_models(2, True, None, models["green"], det, upsampler="bilinear")) == {"restorer",
                                                                                                      "detector"}
    out = postprocess.enhance(image, upscale_factor=2, restorer=models["green"], detector=det, upsampler="bilinear")
    assert seen == [(150, 160, 3)] and out.shape == (300, 320, 3)
    assert "upscaled 160x150 -> 320x300 (bilinear)" in capsys.readouterr().out
    x, y = face.landmarks[2].round().astype(int)  # the nose, at twice its coordinates in the enlargement
    assert np.abs(out[2 * y, 2 * x].astype(int) - (0, 255, 0)).max() <= 1, out[2 * y, 2 * x]
    enlarged = cv2.resize(image, (320, 300), interpolation=cv2.INTER_LINEAR)
    outside = ~cv2.resize(crop_footprint(image, face, grow=2).astype(np.uint8), (320, 300),
                          interpolation=cv2.INTER_NEAREST).astype(bool)
    assert outside.sum() > 0.3 * outside.size and (out[outside] == enlarged[outside]).all()
    same = postprocess.enhance(image, upscale_factor=2, restorer=models["identity"], detector=det, upsampler="bilinear")
    diff = np.abs(same.astype(int) - enlarged)
    assert diff.max() <= 2 and diff.mean() < 0.15, (diff.max(), diff.mean())

def cli(*args):
    return subprocess.run([sys.executable, "postprocess.py", *args], cwd=ROOT, capture_output=True, text=True)

def test_cli_writes_enhanced_png(models, tmp_path):
    """python postprocess.py a.png b.png --out_dir=... writes <name>_enhanced.png per input; --no_restore
    skips faces; an output already there stops the command unless --overwrite; settings may come from a config
    file (a .py argument)."""
    from PIL import Image
    for name in ("a", "b"):
        Image.fromarray(smooth_image(60, 80)).save(tmp_path / f"{name}.png")
    det = plant(tmp_path / "det.onnx", (120, 160), (80, 60), eye_distance=30)
    (tmp_path / "conf.py").write_text("weight = 0.7\n")
    common = [f"--upscaler_model={models['nearest']}", f"--restorer_model={models['green']}", f"--detector_model={det}",
              str(tmp_path / "conf.py")]
    for args, said in ([str(tmp_path / "a.png"), str(tmp_path / "b.png")], "restored 1 face (CodeFormer, weight 0.7)"), \
                      ([str(tmp_path / "a.png"), "--no_restore"], "a_enhanced.png is there already"), \
                      ([str(tmp_path / "a.png"), "--no_restore", "--overwrite"], "upscaled 80x60 -> 160x120"):
        r = cli(*args, f"--out_dir={tmp_path / 'out'}", *common)
        assert said in r.stdout + r.stderr and r.returncode == (0 if "upscaled" in said or "restored" in said else 1), \
            r.stdout + r.stderr
    b = np.asarray(Image.open(tmp_path / "out" / "b_enhanced.png"))
    a = np.asarray(Image.open(tmp_path / "out" / "a_enhanced.png"))  # written again with --no_restore
    assert a.shape == b.shape == (120, 160, 3)
    assert (b[60, 80] == (0, 255, 0)).all() and (a[60, 80] != (0, 255, 0)).any()

@pytest.mark.parametrize("args,message", [
    (["a.png", "--wieght=0.7"], "unknown setting 'wieght'; did you mean 'weight'"),
    (["a.png", "--CROP=256"], "unknown setting 'CROP'"),  # a constant, not a setting
    (["--weight=0.7"], "no image given"),
    (["missing.png"], "missing.png: no such file"),
    (["README.md", "--weight=3"], "--weight, sample.py's and eval.py's --restore_weight) must be in [0, 1], got 3"),
    (["README.md", "--upscaler_model=none.onnx"], "upscaler model file not found: none.onnx"),
    (["README.md", "tests/../README.md"], "would both be written to out/enhanced/README_enhanced.png"),
])
def test_cli_errors(args, message):
    """The command line's settings are the module's globals: typos are named, constants are not settings,
    no image or a missing one, a value out of range, a model file that is not there and two inputs of one name
    stop with a message before any image is read."""
    r = cli(*args)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]

def test_cli_help_lists_settings():
    """--help prints the module docstring and the settings, with the value given before it."""
    r = cli("--weight=0.7", "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "python postprocess.py" in r.stdout and "  weight = 0.7    (default 0.5)" in r.stdout, r.stdout
    assert "  tile = 256\n" in r.stdout and "CROP" not in r.stdout, r.stdout
