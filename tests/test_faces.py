"""
faces.py on stand-in ONNX models (tests/standins.py): detection decoding + NMS + letterbox,
alignment (numpy vs torch, gradients, the ArcFace crop), parsing masks, ArcFace (onnxruntime vs torch),
model files (local, Hugging Face cache, CRC32 check, MissingModel offline).
Run: python -m pytest -q tests/test_faces.py
"""

import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from huggingface_hub import constants as hf_constants
import torch

import faces
import standins
from conftest import hub_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a face and its duplicates, in 640-letterbox pixels
LANDMARKS = np.array([[200, 200], [260, 200], [230, 240], [205, 270], [255, 270]], np.float32)
PLANTED = [
    dict(box=(170, 150, 290, 310), landmarks=LANDMARKS, score=0.9),
    dict(box=(400, 300, 500, 420), landmarks=LANDMARKS + (250, 110), score=0.7, stride=16),
]
DUPLICATES = [
    dict(box=(174, 152, 292, 306), landmarks=LANDMARKS + 3, score=0.8, anchor=1),        # same cell, other anchor
    dict(box=(165, 148, 288, 312), landmarks=LANDMARKS - 2, score=0.6, stride=16),       # another stride
    dict(box=(402, 298, 505, 418), landmarks=LANDMARKS + (252, 108), score=0.65, stride=32),
    dict(box=(20, 20, 60, 60), landmarks=LANDMARKS * 0.2, score=0.3, stride=32),         # below the threshold
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("standins")
    return dict(
        detector=standins.detector(str(d / "det.onnx"), PLANTED + DUPLICATES),
        # same faces, outputs as (1, N, k) and in reverse order: decoding must not rely on either
        detector_batched=standins.detector(str(d / "det_b.onnx"), PLANTED + DUPLICATES, batch_dim=True, reverse=True),
        recognizer=standins.recognizer(str(d / "rec.onnx")),
        recognizer_other=standins.recognizer(str(d / "rec1.onnx"), seed=1),
    )


def check_faces(found, scale):
    assert len(found) == len(PLANTED), f"expected {len(PLANTED)} faces after NMS, got {[f.score for f in found]}"
    for f, p in zip(found, PLANTED):  # PLANTED is in score order
        box_err = np.abs(f.box - np.array(p["box"]) / scale).max()
        lm_err = np.abs(f.landmarks - p["landmarks"] / scale).max()
        assert box_err < 1 and lm_err < 1, f"score {f.score}: box off by {box_err:.3f} px, landmarks by {lm_err:.3f} px"
        assert math.isclose(f.score, p["score"], rel_tol=1e-6)
        assert f.box.dtype == np.float32 and f.box.shape == (4,) and f.landmarks.shape == (5, 2)


def test_detect_square(models):
    """Planted boxes and landmarks come back within 1 px, duplicates and low scores removed, best first."""
    check_faces(faces.detect(np.full((640, 640, 3), 200, np.uint8), models["detector"]), 1.0)


@pytest.mark.parametrize("kind", ["detector", "detector_batched"])
def test_detect_letterbox(models, kind):
    """An 800x600 image is scaled by 0.8 into the letterbox: letterbox coordinates / 0.8 come back."""
    check_faces(faces.detect(np.full((600, 800, 3), 200, np.uint8), models[kind]), 0.8)


def test_letterbox():
    """800x600 -> 640x480 at the top left (scale 0.8), black below."""
    image = np.zeros((600, 800, 3), np.uint8)
    image[:, :400] = 255  # left half white
    canvas, scale = faces.letterbox(image, 640)
    assert scale == 0.8 and canvas.shape == (640, 640, 3)
    assert canvas[:480, :318].min() == 255 and canvas[:480, 322:].max() == 0 and canvas[480:].max() == 0


def test_detect_no_face(models):
    assert faces.detect(np.zeros((300, 200, 3), np.uint8), models["detector"]) == []


def smooth_image(h, w, c=3):
    y, x = np.mgrid[:h, :w].astype(np.float32)
    return np.stack([0.5 + 0.4 * np.sin(x / 15 + k) * np.cos(y / 20 - k) for k in range(c)], -1).astype(np.float32)


def similarity(scale, degrees, tx, ty):
    a = math.radians(degrees)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]])


def apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_similarity_transform_recovers_template():
    """A face placed by a known similarity transform: its landmarks map back onto the ArcFace template."""
    place = similarity(1.2, 15, 90, 40)  # template (crop) pixels -> image pixels
    landmarks = apply(place, faces.ARCFACE_TEMPLATE.astype(np.float64))
    m = faces.similarity_transform(landmarks, faces.ARCFACE_TEMPLATE)
    inverse = np.linalg.inv(np.vstack([place, [0, 0, 1]]))[:2]
    assert np.abs(m - inverse).max() < 1e-4, f"recovered\n{m}\nexpected\n{inverse}"
    err = np.abs(apply(m, landmarks) - faces.ARCFACE_TEMPLATE).max()
    assert err < 1e-3, f"landmarks land {err} px from the template"
    # a reflection is never returned: mirrored points get the best rotation, det > 0
    assert np.linalg.det(faces.similarity_transform(landmarks * [-1, 1], faces.ARCFACE_TEMPLATE)[:, :2]) > 0


def test_warp_numpy_and_torch_agree():
    """cv2.warpAffine and the differentiable warp give the same crop (same pixel-centre convention)."""
    image = smooth_image(200, 240)
    place = similarity(1.2, 15, 90, 40)
    matrices = [faces.similarity_transform(apply(place, faces.ARCFACE_TEMPLATE.astype(np.float64)),
                                           faces.ARCFACE_TEMPLATE),
                similarity(0.7, -30, 10, 60)]
    want = np.stack([faces.warp(image, m, 112) for m in matrices])  # (2, 112, 112, 3)
    got = faces.warp_torch(torch.from_numpy(image).permute(2, 0, 1)[None].repeat(2, 1, 1, 1),
                           torch.tensor(np.stack(matrices), dtype=torch.float32), 112)
    err = np.abs(got.permute(0, 2, 3, 1).numpy() - want).max()
    assert err < 1e-3, f"max abs difference {err}"


def test_warp_torch_gradcheck():
    """Gradients of warp_torch with respect to pixels and matrix match finite differences (float64)."""
    images = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    matrix = torch.tensor(similarity(0.9, 17, 0.3, -0.2)[None], requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, m: faces.warp_torch(i, m, 5), (images, matrix))


def test_arcface_crop_is_the_two_line_crop_inside_the_image():
    """arcface_crop equals similarity_transform + warp_torch per image where the crop lies inside the image,
    is black (-1) where it reaches past the image (the two-line form gave 0 there), and passes gradients."""
    images = (torch.from_numpy(smooth_image(200, 240)).permute(2, 0, 1) * 2 - 1).repeat(2, 1, 1, 1)
    template = faces.ARCFACE_TEMPLATE.astype(np.float64)
    landmarks = [apply(similarity(1.3, 12, 70, 30), template),    # crop well inside the 240x200 image
                 apply(similarity(1.0, -20, -40, 110), template)]  # crop partly left of and below it
    images.requires_grad_()
    got = faces.arcface_crop(images, landmarks)
    assert got.shape == (2, 3, 112, 112)
    for i, lm in enumerate(landmarks):
        M = faces.similarity_transform(lm, faces.ARCFACE_TEMPLATE)
        want = faces.warp_torch(images[i][None], torch.tensor(M, dtype=torch.float32)[None], 112)[0]
        # crop pixels whose 2x2 bilinear neighbourhood lies inside the image
        crop_to_image = np.linalg.inv(np.vstack([M, [0, 0, 1]]))[:2]
        v, u = np.mgrid[:112, :112]
        x, y = np.moveaxis(apply(crop_to_image, np.stack([u, v], -1).reshape(-1, 2).astype(np.float64)), -1, 0)
        inside = torch.from_numpy(((x >= 0) & (x <= 239) & (y >= 0) & (y <= 199)).reshape(112, 112))
        outside = torch.from_numpy(((x < -1) | (x > 240) | (y < -1) | (y > 200)).reshape(112, 112))
        err = (got[i] - want).abs()[:, inside].max().item()
        assert err < 1e-5, f"image {i}: max abs difference {err:.2e} from the two-line crop inside the image"
        if i == 1:
            assert outside.sum() > 500 and (got[i][:, outside] == -1).all(), \
                f"outside the image: {outside.sum()} px, values {got[i][:, outside].unique()[:5]} (want -1)"
    got.sum().backward()
    assert images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


def test_arcface_crop_matches_embeds_input():
    """The differentiable crop of a [-1, 1] image is what embed() feeds ArcFace (cv2 crop of the uint8 image,
    black border), within cv2's 8-bit rounding."""
    image = np.rint(smooth_image(200, 240) * 255).astype(np.uint8)
    landmarks = apply(similarity(1.0, -20, -40, 110), faces.ARCFACE_TEMPLATE.astype(np.float64))
    want = faces.arcface_input(faces.warp(image, faces.similarity_transform(landmarks, faces.ARCFACE_TEMPLATE), 112))
    images = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    err = np.abs(faces.arcface_crop(images, [landmarks]).numpy() - want).max()
    assert err < 2 / 127.5, f"max abs difference {err:.4f} (2 uint8 levels = {2 / 127.5:.4f})"


def test_face_mask(tmp_path):
    """The planted parsing comes back inside the box, 0 outside; `classes` picks what counts."""
    labels = np.zeros((512, 512), np.int64)  # in FFHQ-aligned crop pixels (row v, column u)
    labels[100:400, 100:400] = 1   # skin
    labels[180:220, 150:230] = 4   # l_eye
    labels[20:100, 50:460] = 17    # hair
    parser = standins.parser(str(tmp_path / "parser.onnx"), labels)
    # landmarks at half the FFHQ template + (40, 20): crop (u, v) <-> image (u / 2 + 40, v / 2 + 20)
    face = faces.Face(box=np.array([100, 60, 220, 230], np.float32), score=0.9,
                      landmarks=faces.FFHQ_TEMPLATE / 2 + np.array([40, 20], np.float32))
    image = np.full((300, 400, 3), 128, np.uint8)
    mask = faces.face_mask(image, face, parser)
    assert mask.shape == (300, 400) and mask.dtype == np.float32 and 0 <= mask.min() and mask.max() <= 1
    at = lambda m, x, y: m[y, x]  # noqa: E731
    assert at(mask, 150, 150) == 1, "skin inside the box"
    assert at(mask, 135, 120) == 1, "eye inside the box"
    assert at(mask, 150, 65) == 0, "hair is not face by default"
    assert at(mask, 95, 150) == 0, "skin outside the box"
    outside = mask.copy()
    outside[60:230, 100:220] = 0
    assert outside.max() == 0, "mask outside the box"
    # skin + eye inside the box: x 100..220, y 70..220 -> 120 x 150 px, give or take the soft edges
    assert abs(mask.sum() - 120 * 150) < 300, f"area {mask.sum()}"
    with_hair = faces.face_mask(image, face, parser, classes=tuple(range(1, 14)) + (17,))
    assert at(with_hair, 150, 65) == 1, "hair counts when asked for"
    eyes = faces.face_mask(image, face, parser, classes=(4,))
    assert at(eyes, 135, 120) == 1 and at(eyes, 150, 150) == 0, "classes=(4,) keeps the eye only"


def test_embed_and_csim(models):
    """embed is unit-norm; csim of an image with itself is 1; an image without a face is named."""
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (480, 640, 3)).astype(np.uint8)
    face = faces.detect(image, models["detector"])[0]
    e = faces.embed(image, face, models["recognizer"])
    assert e.shape == (512,) and e.dtype == np.float32 and abs(np.linalg.norm(e) - 1) < 1e-5
    same = faces.csim(image, image, models["detector"], models["recognizer"])
    assert abs(same - 1) < 1e-5, f"csim with itself {same}"
    other = rng.randint(0, 256, (480, 640, 3)).astype(np.uint8)
    assert faces.csim(image, other, models["detector"], models["recognizer"]) < 1 - 1e-4
    dark = np.full((480, 640, 3), 40, np.uint8)  # the stand-in detector finds nothing in a dark image
    with pytest.raises(ValueError, match="image_b"):
        faces.csim(image, dark, models["detector"], models["recognizer"])


def test_arcface_torch_matches_onnxruntime(models):
    """The torch ArcFace equals onnxruntime within 1e-4 and passes gradients to its input."""
    pytest.importorskip("onnx_torch")
    net = faces.arcface_torch(models["recognizer"])
    x = (torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_()
    got = net(x)
    want = faces.run(faces.session(models["recognizer"]), x.detach().numpy())[0]
    err = np.abs(got.detach().numpy() - want).max() / np.abs(want).max()
    assert got.shape == (3, 512) and err < 1e-4, f"max abs difference / max |output| = {err:.3g}"
    got.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().max() > 0 and torch.isfinite(x.grad).all()


def test_arcface_torch_self_check_fails_loudly(models, monkeypatch):
    """If the torch graph does not reproduce onnxruntime (here: other weights), loading raises with the difference."""
    onnx_torch = pytest.importorskip("onnx_torch")
    real = onnx_torch.GraphModule
    monkeypatch.setattr(onnx_torch, "GraphModule", lambda path: real(models["recognizer_other"]))
    with pytest.raises(RuntimeError, match="max abs difference"):
        faces.arcface_torch(models["recognizer"])


# run in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and HF_HOME when imported.
# DNS always fails, as on a machine without network; the script counts the look-ups.
NO_NETWORK = """
import socket, time
lookups = []
def no_network(*args, **kwargs):
    lookups.append(args[0])
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
socket.getaddrinfo = no_network
import faces
t = time.perf_counter()
try:
    faces.model_path("recognizer")
except faces.MissingModel as e:
    print(time.perf_counter() - t, len(lookups), e.__cause__ is None and e.__suppress_context__)
    print(e)
faces.model_path("detector")  # uncaught, to see the traceback a user sees
"""


# offline: no look-up at all. Without network: the one HEAD (and huggingface_hub 2.x's own user-agent look-up);
# hf_hub_download's retries would add 5 more, waiting 1 + 2 + 4 + 8 + 8 s.
@pytest.mark.parametrize("offline,max_lookups", [("1", 0), ("", 2)], ids=["HF_HUB_OFFLINE", "no_network"])
def test_missing_model_is_one_clear_error(tmp_path, offline, max_lookups):
    """An empty cache, offline or without network: MissingModel at once (no retries), naming the file, the repo,
    the hf download command and the setting, with no chained traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE=offline, HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-c", NO_NETWORK], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    out = r.stdout.splitlines()
    assert r.returncode != 0 and len(out) == 2, r.stdout + r.stderr[-3000:]
    seconds, n, no_chain = out[0].split()
    assert float(seconds) < 2 and int(n) <= max_lookups and no_chain == "True", \
        f"{float(seconds):.2f} s, {n} DNS look-ups (at most {max_lookups}), cause suppressed: {no_chain}"
    for part in ["arcface_w600k_r50.onnx", faces.HUB_REPO,
                 f"`hf download {faces.HUB_REPO} arcface_w600k_r50.onnx --local-dir DIR`",
                 "--recognizer_model=DIR/arcface_w600k_r50.onnx"]:
        assert part in out[1], f"{part!r} not in: {out[1]}"
    assert r.stderr.count("Traceback") == 1 and "direct cause" not in r.stderr and "During handling" not in r.stderr, \
        r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("faces.MissingModel: retinaface_10g.onnx") \
        and "--detector_model=DIR/retinaface_10g.onnx" in last, last


def test_model_path_local_cache_and_hash(models, tmp_path, monkeypatch):
    """A local path is used as is (missing -> named); a cached Hub copy is used without the network, checked
    against its cached .hash (skipped when there is none), and fails when its CRC32 differs."""
    det = models["detector"]
    assert faces.model_path("detector", det) == det
    with pytest.raises(FileNotFoundError, match="nowhere.onnx"):
        faces.model_path("detector", str(tmp_path / "nowhere.onnx"))

    data = open(det, "rb").read()
    crc = zlib.crc32(data)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # any network use would raise MissingModel
    cases = [("match", f"{crc:08x}"), ("no_hash", None), ("mismatch", f"{(crc + 1) % 2 ** 32:08x}")]
    for case, hash_text in cases:
        files = {"retinaface_10g.onnx": data} if hash_text is None else \
            {"retinaface_10g.onnx": data, "retinaface_10g.hash": hash_text.encode()}
        snapshot = hub_cache(tmp_path / case, faces.HUB_REPO, files)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / case))
        if case == "mismatch":
            with pytest.raises(RuntimeError, match="(?s)retinaface_10g.onnx: CRC32.*Delete it"):
                faces.model_path("detector")
        else:
            assert faces.model_path("detector") == str(snapshot / "retinaface_10g.onnx"), case
