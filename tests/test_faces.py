"""
faces.py on stand-in ONNX models (tests/standins.py): detection decoding + NMS + letterbox, the torch detector
(detect_torch against detect(), cv2's resize to the bit, nothing read back to the host), alignment (numpy vs
torch, gradients, the ArcFace crop), parsing masks, ArcFace (onnxruntime vs torch), model files (local,
Hugging Face cache, CRC32 check, MissingModel offline).
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
from torch.utils._python_dispatch import TorchDispatchMode

import data
import faces
import onnx_torch
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
    canvas, scale = faces.letterbox(np.full((64, 90000, 3), 255, np.uint8), 640)  # over 1280:1: still one row
    assert canvas[0].min() == 255 and canvas[1:].max() == 0


def test_detect_no_face(models):
    assert faces.detect(np.zeros((300, 200, 3), np.uint8), models["detector"]) == []


# -----------------------------------------------------------------------------
# the torch detector, on an SCRFD-shaped stand-in (a real conv graph, random weights)

# textured squares on black, as (x, y, side) in fractions of the width, height, shorter side: the stand-in's
# scores rise on texture, so each square draws a few anchors; a black image draws none
SEVERAL = [(0.1, 0.12, 0.15), (0.45, 0.2, 0.25), (0.65, 0.62, 0.2)]
ONE = [(0.3, 0.3, 0.3)]


def squares(h, w, spec, seed):
    """(h, w, 3) uint8: black with squares of blocky noise (blocks of about 1/160 of the side, so a resized
    copy keeps its texture)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), np.uint8)
    block = max(1, round(min(h, w) / 160))
    for fx, fy, fs in spec:
        x0, y0, side = int(fx * w), int(fy * h), int(fs * min(h, w))
        n = -(-side // block)
        noise = rng.integers(0, 256, (n, n, 3)).repeat(block, 0).repeat(block, 1)
        image[y0:y0 + side, x0:x0 + side] = noise[:side, :side]
    return image


def face_batch(h, w):
    """Several faces, none (black), one: uint8 images and the same as a (3, 3, h, w) tensor in [-1, 1]."""
    images = [squares(h, w, SEVERAL, 1), np.zeros((h, w, 3), np.uint8), squares(h, w, ONE, 2)]
    return images, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


DETECT_SIZES = [(640, 640), (512, 512), (480, 640)]


def scrfd_standin(path, batch_minor=True):
    """(path, detector_torch module) of a TinySCRFD export (standins.scrfd), its score threshold set on the
    several-faces and black images at each size test_detect_torch_matches_detect uses."""
    def letterboxes(images):
        canvases = np.stack([faces.letterbox(image, faces.DET_SIZE)[0] for image in images])
        return torch.from_numpy((canvases.astype(np.float32) - 127.5) / 128).permute(0, 3, 1, 2)

    batches = [face_batch(h, w)[0] for h, w in DETECT_SIZES]
    path = standins.scrfd(path, letterboxes([b[0] for b in batches]), letterboxes([b[1] for b in batches]),
                          batch_minor=batch_minor)
    return path, faces.detector_torch(path)


@pytest.fixture(scope="module")
def scrfd(tmp_path_factory):
    """The stand-in in the real retinaface_10g's layout: a batch's rows location by location, the images inside."""
    return scrfd_standin(str(tmp_path_factory.mktemp("scrfd") / "scrfd.onnx"))


@pytest.mark.parametrize("size", [(512, 512), (1024, 1024), (600, 800), (200, 300)],
                         ids=["upscale_512", "downscale_1024", "landscape_600x800", "portrait_200x300"])
def test_letterbox_torch_is_cv2s_to_the_bit(size):
    """letterbox_torch of a [-1, 1] tensor equals letterbox() of its data.to_uint8 image (cv2.INTER_LINEAR on
    uint8, not antialiased when shrinking) exactly, at the training sizes up and down and off-square."""
    h, w = size
    image = np.random.default_rng(h).integers(0, 256, (h, w, 3)).astype(np.uint8)
    want, want_scale = faces.letterbox(image, faces.DET_SIZE)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert np.array_equal(data.to_uint8(tensor[0] / 2 + 0.5), image), "the test image must survive to_uint8 unchanged"
    got, scale = faces.letterbox_torch(tensor, faces.DET_SIZE)
    got = got[0].permute(1, 2, 0).numpy()
    diff = np.abs(got - want)
    assert scale == want_scale and got.shape == want.shape
    assert diff.max() == 0, f"{(diff > 0).mean():.2%} of the values differ, by up to {diff.max()} levels"


@pytest.mark.parametrize("size", DETECT_SIZES, ids=["640", "upscale_512", "landscape_480x640"])
def test_detect_torch_matches_detect(scrfd, size):
    """detect_torch on a batch (several faces, none, one) gives largest(detect()) of each image: the same found
    flags, landmarks within 1e-3 px. Both see the same 8-bit letterbox; what differs is torch's and onnxruntime's
    float arithmetic (about 1e-6 of an output, times a stride of at most 32 px), and the planted thresholds sit
    far from any score, so the found flags must agree exactly."""
    path, net = scrfd
    images, tensor = face_batch(*size)
    found, landmarks = faces.detect_torch(net, tensor)
    assert found.shape == (3,) and found.dtype == torch.bool and landmarks.shape == (3, 5, 2)
    assert landmarks.dtype == torch.float32 and torch.isfinite(landmarks).all()
    want = [faces.detect(image, path) for image in images]
    assert len(want[0]) >= 2 and want[1] == [] and len(want[2]) >= 1, \
        f"the stand-in should find several faces, none, some: found {[len(w) for w in want]}"
    assert found.tolist() == [bool(w) for w in want]
    for i, w in enumerate(want):
        if w:
            err = np.abs(landmarks[i].numpy() - faces.largest(w).landmarks).max()
            assert err < 1e-3, f"image {i}: landmarks {err:.2e} px from largest(detect())"
    assert (landmarks[1] == 0).all(), "an image without a face gets zeros"


def test_detect_torch_reads_either_batch_layout(scrfd, tmp_path):
    """retinaface_10g's export lists a batch's rows location by location with the images inside, later exports
    image after image: detector_torch tells which from the model itself, and detect_torch matches detect() on a
    batch of three either way (read the wrong way, the batch's images swap anchors)."""
    for batch_minor in (True, False):
        path, net = scrfd if batch_minor else scrfd_standin(str(tmp_path / "later.onnx"), batch_minor=False)
        assert net.batch_minor == batch_minor
        images, tensor = face_batch(640, 640)
        found, landmarks = faces.detect_torch(net, tensor)
        want = [faces.detect(image, path) for image in images]
        assert found.tolist() == [bool(w) for w in want] == [True, False, True]
        for i in (0, 2):
            assert np.abs(landmarks[i].numpy() - faces.largest(want[i]).landmarks).max() < 1e-3


def test_detect_torch_keeps_the_top_k(scrfd):
    """With top_k=1 only each image's best anchor goes through NMS: found where detect() finds a face, and the
    landmarks of detect()'s best-scored face (not the largest)."""
    path, net = scrfd
    images, tensor = face_batch(640, 640)
    found, landmarks = faces.detect_torch(net, tensor, top_k=1)
    want = [faces.detect(image, path) for image in images]
    assert found.tolist() == [bool(w) for w in want]
    err = np.abs(landmarks[0].numpy() - want[0][0].landmarks).max()
    assert err < 1e-3, f"landmarks {err:.2e} px from detect()'s best face"


class HostReads(TorchDispatchMode):
    """Records the aten ops that read a device's data on the host or copy host data to a device: on a GPU each
    waits for the GPU to finish its queue. .item(), .tolist(), bool(t) (_local_scalar_dense), outputs whose
    size depends on the data (nonzero, masked_select, boolean-mask indexing), linalg's error checks, and copies
    between the CPU and another device (.to(device), torch.as_tensor(array, device=...)). The CPU's own reads
    (shapes kept on the host) cost nothing and pass."""

    DATA_SIZED = {torch.ops.aten.nonzero, torch.ops.aten.masked_select, torch.ops.aten._linalg_check_errors,
                  torch.ops.aten.unique_consecutive, torch.ops.aten._unique2, torch.ops.aten.is_nonzero}

    def __init__(self, cpu=False):
        super().__init__()
        self.reads, self.cpu = [], cpu  # cpu: also the CPU's own reads (a step run on the CPU stands for a GPU's)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if "device" in kwargs:
            devices.add(torch.device(kwargs["device"]).type)
        op = func.overloadpacket
        if (op is torch.ops.aten._local_scalar_dense and (self.cpu or tensors[0].device.type != "cpu") or op in self.DATA_SIZED
                or op is torch.ops.aten.index and any(t.dtype in (torch.bool, torch.uint8) for t in tensors[1:])
                or op in (torch.ops.aten._to_copy, torch.ops.aten.copy_) and "cpu" in devices and len(devices) > 1):
            self.reads.append(f"{func} on {sorted(devices)}")
        return func(*args, **kwargs)


def no_host_reads(fn, monkeypatch):
    """fn() under HostReads, on the meta device (no data at all: a read raises), with torch.tensor(data, device=...)
    refused (it copies host data to the device below the dispatcher, where HostReads cannot see it)."""
    tensor = torch.tensor

    def host_only(data, *args, **kwargs):
        assert kwargs.get("device") in (None, "cpu"), f"torch.tensor(..., device={kwargs['device']}) copies host data"
        return tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", host_only)
    with HostReads() as mode:
        out = fn()
    return out, mode.reads


def test_host_reads_are_caught(monkeypatch):
    """The check below catches what it must: .item(), boolean-mask indexing, nonzero (recorded, or raised on meta
    tensors), host data sent to a device (.to, as_tensor, torch.tensor)."""
    x = torch.ones(4, device="meta")
    cases = [("item", lambda: x.sum().item()), ("mask", lambda: x[x > 0]), ("nonzero", lambda: x.nonzero()),
             ("to", lambda: torch.ones(2).to("meta")),
             ("as_tensor", lambda: torch.as_tensor(np.ones(2), device="meta"))]
    for name, fn in cases:
        try:
            _, reads = no_host_reads(fn, monkeypatch)
        except (RuntimeError, NotImplementedError):  # meta tensors have no data to read
            reads = ["raised"]
        assert reads, f"{name} went unnoticed"
    with pytest.raises(AssertionError, match="copies host data"):
        no_host_reads(lambda: torch.tensor([1.0], device="meta"), monkeypatch)


@pytest.mark.parametrize("size", [(512, 512), (600, 800)], ids=["square_512", "landscape_600x800"])
def test_detect_torch_and_crop_read_nothing_back(scrfd, size, monkeypatch):
    """The identity loss's detection and crop run with no host sync: detect_torch and arcface_crop with tensor
    landmarks run on the meta device (no data, so any read raises) with no op that reads device data back, sizes
    an output by the data, or copies host data over (HostReads). torch.cuda is not here; on a GPU the same ops
    pass torch.cuda.set_sync_debug_mode("error")."""
    _, net = scrfd
    net = net.to("meta")
    images = torch.empty(3, 3, *size, device="meta")
    faces.arcface_crop(images, torch.empty(3, 5, 2, device="meta"))  # the template goes to a device once, first
    (found, landmarks), reads = no_host_reads(lambda: faces.detect_torch(net, images), monkeypatch)
    assert reads == [] and found.shape == (3,) and landmarks.shape == (3, 5, 2), reads
    crops, reads = no_host_reads(lambda: faces.arcface_crop(images, landmarks), monkeypatch)
    assert reads == [] and crops.shape == (3, 3, 112, 112), reads


def test_detector_torch_self_check_fails_loudly(scrfd, monkeypatch):
    """If the torch graph does not reproduce onnxruntime (here: one score bias changed), loading raises, naming the
    file and the difference."""
    path, _ = scrfd
    real = onnx_torch.GraphModule

    def off(p):
        net = real(p)
        next(t for name, t in net.named_parameters() if t.shape == (2,)).data += 1  # a score conv's bias
        return net

    monkeypatch.setattr(onnx_torch, "GraphModule", off)
    with pytest.raises(RuntimeError, match=f"(?s){path}: the detector in PyTorch disagrees.*max abs difference"):
        faces.detector_torch(path)


def test_detector_torch_names_unsupported_ops(models):
    """A detector graph with ops onnx_torch cannot run is refused at load, naming them (train.py then keeps the
    onnxruntime detector)."""
    with pytest.raises(NotImplementedError, match="(?s)ONNX op ReduceMax.*ONNX op Greater"):
        faces.detector_torch(models["detector"])


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


def umeyama_svd(src, dst):
    """Reference: Umeyama's SVD solution, with the sign fix that keeps it a rotation."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    d = np.array([1.0, -1.0 if np.linalg.det(U) * np.linalg.det(Vt) < 0 else 1.0])
    R = U @ np.diag(d) @ Vt
    s = (S * d).sum() / (a ** 2).sum(1).mean()
    return np.concatenate([s * R, (mu_d - s * R @ mu_s)[:, None]], 1)


def test_similarity_closed_form_is_umeyamas():
    """similarity_transform_torch's closed form gives Umeyama's SVD solution, batched, mirrored point sets included
    (where the best similarity is not a reflection)."""
    rng = np.random.default_rng(0)
    src = rng.normal(0, 40, (64, 5, 2)) + rng.uniform(0, 500, (64, 1, 2))
    src[::2] *= [-1, 1]
    got = faces.similarity_transform_torch(torch.from_numpy(src), torch.from_numpy(faces.ARCFACE_TEMPLATE).double())
    want = np.stack([umeyama_svd(p, faces.ARCFACE_TEMPLATE.astype(np.float64)) for p in src])
    err = np.abs(got.numpy() - want).max() / np.abs(want).max()
    assert err < 1e-10, f"max abs difference / max |matrix| = {err:.2e}"


def test_arcface_crop_takes_tensor_landmarks():
    """arcface_crop with a (B, 5, 2) float32 tensor of landmarks (detect_torch's) equals the crop from B numpy
    arrays within 1e-5."""
    images = (torch.from_numpy(smooth_image(200, 240)).permute(2, 0, 1) * 2 - 1).repeat(2, 1, 1, 1)
    template = faces.ARCFACE_TEMPLATE.astype(np.float64)
    landmarks = [apply(similarity(1.3, 12, 70, 30), template).astype(np.float32),
                 apply(similarity(1.0, -20, -40, 110), template).astype(np.float32)]
    want = faces.arcface_crop(images, landmarks)
    got = faces.arcface_crop(images, torch.from_numpy(np.stack(landmarks)))
    err = (got - want).abs().max().item()
    assert got.shape == (2, 3, 112, 112) and err < 1e-5, f"max abs difference {err:.2e}"


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
    above = faces.Face(face.box - np.array([0, 300, 0, 300], np.float32), 0.9, face.landmarks)
    assert faces.face_mask(image, above, parser).max() == 0, "a box wholly above the image marks nothing"


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


def test_recognizer_that_normalises_its_own_input(models, tmp_path):
    """A recognizer converted from MXNet (Sub 127.5, Mul 1/127.5 first, on 0..255 pixels) gets pixels, in
    embed() and in arcface_torch: the same embeddings as the same network fed [-1, 1] (fed [-1, 1] itself, it
    would see an almost constant image and give one embedding for every face)."""
    own = standins.recognizer(str(tmp_path / "mx.onnx"), pixels=True)
    assert faces.takes_pixels(own) and not faces.takes_pixels(models["recognizer"])
    image = smooth_image(120, 100)
    face = faces.Face(np.array([20, 20, 80, 100], np.float32), 0.9, faces.ARCFACE_TEMPLATE * 0.6 + 15)
    e, want = faces.embed(image, face, own), faces.embed(image, face, models["recognizer"])
    assert np.abs(e - want).max() < 1e-5
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        d = (faces.arcface_torch(own)(x) - faces.arcface_torch(models["recognizer"])(x)).abs().max()
    assert d < 1e-4, d


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
            with pytest.raises(RuntimeError, match="(?s)retinaface_10g.onnx: CRC32.*Delete") as e:
                faces.model_path("detector")
            assert os.path.realpath(snapshot / "retinaface_10g.onnx") in str(e.value)  # the blob the link names
        else:
            assert faces.model_path("detector") == str(snapshot / "retinaface_10g.onnx"), case

def test_model_paths_names_every_missing_file(tmp_path):
    """faces.model_paths finds each chosen file, and names every missing one in one MissingModel (offline, one
    message per run would cost a trip each)."""
    there = tmp_path / "det.onnx"
    there.write_bytes(b"")
    assert faces.model_paths({"detector": str(there)}) == {"detector": str(there)}
    with pytest.raises(faces.MissingModel) as e:
        faces.model_paths({"detector": str(there), "recognizer": str(tmp_path / "r.onnx"),
                           "parser": str(tmp_path / "p.onnx")})
    assert "recognizer model file not found" in str(e.value) and "parser model file not found" in str(e.value)
