"""
The face models of MagiCapture, run with onnxruntime:

- detect            SCRFD-style detector (InsightFace det_10g): boxes + 5 landmarks
- similarity_transform, warp, warp_torch
                    5-point alignment; warp_torch is differentiable, for eq. 7
- arcface_crop      the aligned 112x112 ArcFace crop of a batch of images, differentiable (eq. 7)
- face_mask         BiSeNet face parsing inside the detected box: M_s of eq. 4
                    (the reference's non-face mask M_r of eq. 5-6 is 1 - face_mask)
- embed, csim       ArcFace identity embeddings and the paper's CSIM metric
- arcface_torch     the same ArcFace run with torch ops, so L_id (eq. 7) has gradients

The .onnx files come from the Hub repo facefusion/models-3.0.0 through
huggingface_hub's cache (checked against their .hash files), or from a local path;
model_path raises MissingModel, saying how to fetch the file, when neither is there.
Licences: the InsightFace models (detector, ArcFace) are for non-commercial
research only; BiSeNet (yakhyo/face-parsing) is MIT.
"""

import os
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from model import hub_file
import onnx_torch

HUB_REPO = "facefusion/models-3.0.0"
FILES = dict(detector="retinaface_10g.onnx", recognizer="arcface_w600k_r50.onnx", parser="bisenet_resnet_34.onnx",
             restorer="codeformer.onnx", upscaler="real_esrgan_x4.onnx")

# 5 landmarks: left eye, right eye, nose, left mouth corner, right mouth corner
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)  # InsightFace, 112x112 crop
FFHQ_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]], np.float32)  # FFHQ alignment, 512x512

DET_SIZE = 640  # the detector sees a 640x640 letterbox
ARCFACE_SIZE = 112
PARSE_SIZE = 512
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# -----------------------------------------------------------------------------
# model files and sessions

_verified = set()  # paths whose CRC32 matched their .hash in this process (a 170 MB file takes a moment)


class MissingModel(RuntimeError):
    """A face model is neither a given local file nor in the Hugging Face cache, and cannot be downloaded."""


def model_path(kind, model=None):
    """Local path of the .onnx for `kind` (a key of FILES): `model` if given, else the Hub copy.
    Raises MissingModel when the Hub copy is neither cached nor downloadable."""
    if model is not None:
        if not os.path.isfile(model):
            raise FileNotFoundError(f"{kind} model file not found: {model}")
        return model
    name = FILES[kind]
    try:
        path = hub_file(HUB_REPO, name)
    except OSError as e:
        raise MissingModel(
            f"{name} (the {kind} model) is not in the Hugging Face cache and cannot be downloaded from the Hub "
            f"repo {HUB_REPO} ({e}). Fetch it where there is network with `hf download {HUB_REPO} {name} "
            f"--local-dir DIR` (copy DIR here if that is another machine) and pass "
            f"--{kind}_model=DIR/{name}.") from None
    if path not in _verified:
        check_hash(path, os.path.splitext(name)[0] + ".hash")
        _verified.add(path)
    return path


def check_hash(path, hash_name):
    """Compare the file's CRC32 with the repo's `hash_name` (8 hex digits); skip if it cannot be had
    (a mirror without .hash files, or offline with only the model cached)."""
    try:
        hash_path = hub_file(HUB_REPO, hash_name)
    except OSError:
        return
    with open(hash_path) as f:
        expected = f.read().strip().lower()
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(chunk, crc)
    if f"{crc:08x}" != expected:
        raise RuntimeError(f"{path}: CRC32 {crc:08x} does not match {HUB_REPO}/{hash_name} ({expected}); the "
                           f"download is corrupt or incomplete. Delete it from the Hugging Face cache and run again.")


_sessions = {}
_said_cpu = False


def session(path):
    """An onnxruntime session for `path`, made once per process; on the GPU when onnxruntime can use it."""
    global _said_cpu
    if path not in _sessions:
        cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        sess = ort.InferenceSession(path, providers=providers)
        # onnxruntime-gpu falls back to the CPU without an error when its CUDA/cuDNN do not match torch's
        if torch.cuda.is_available() and "CUDAExecutionProvider" not in sess.get_providers() and not _said_cpu:
            print("faces: onnxruntime runs the face models on the CPU (no usable CUDA provider): slower, same results")
            _said_cpu = True
        _sessions[path] = sess
    return _sessions[path]


NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def run(sess, x):
    """All outputs of a one-input session on the NCHW array x, cast to the input's dtype."""
    inp = sess.get_inputs()[0]  # names and dtypes differ between copies of the same model
    return sess.run(None, {inp.name: x.astype(NP_TYPES[inp.type])})

# -----------------------------------------------------------------------------
# detection


@dataclass
class Face:
    box: np.ndarray        # (4,) float32 x1, y1, x2, y2 in input-image pixels
    score: float
    landmarks: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left and right mouth corners


def largest(faces):
    """The face with the largest box: the subject when a photo holds several."""
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


def non_max_suppression(boxes, scores, iou):
    """Indices of the boxes kept by greedy non-maximum suppression, best score first."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        wh = np.minimum(boxes[i, 2:], boxes[rest, 2:]) - np.maximum(boxes[i, :2], boxes[rest, :2])
        inter = wh.clip(min=0).prod(axis=1)
        order = rest[inter / np.maximum(area[i] + area[rest] - inter, 1e-9) <= iou]  # floor: empty boxes
    return keep


def letterbox(image, size):
    """(size, size, 3) uint8 canvas holding the image scaled to fit, keeping its aspect, at the top left;
    black padding at the bottom/right, as InsightFace. Returns (canvas, scale)."""
    H, W = image.shape[:2]
    scale = min(size / H, size / W)
    h, w = int(round(H * scale)), int(round(W * scale))
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:h, :w] = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    return canvas, scale


def detect(image, model=None, threshold=0.5, nms=0.4):
    """Faces in an HxWx3 uint8 RGB image, best score first (score 0.5 and NMS IoU 0.4 as InsightFace)."""
    if not (image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        raise ValueError(f"detect wants an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
    sess = session(model_path("detector", model))
    canvas, scale = letterbox(image, DET_SIZE)
    x = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
    # 9 outputs, per stride: scores (N, 1), box distances (N, 4), landmark offsets (N, 10), N = (640/s)^2 * 2.
    # Group them by width and N rather than by position; some exports add a batch dim of 1.
    by_width = {1: {}, 4: {}, 10: {}}
    for out in run(sess, x):
        out = out.reshape(-1, out.shape[-1])
        assert out.shape[1] in by_width, f"unexpected detector output of shape {out.shape}"
        by_width[out.shape[1]][len(out)] = out
    boxes, scores, landmarks = [], [], []
    for n, score in by_width[1].items():
        stride = int(round((DET_SIZE * DET_SIZE * 2 / n) ** 0.5))
        g = DET_SIZE // stride
        assert g * g * 2 == n and n in by_width[4] and n in by_width[10], \
            f"detector outputs {[o.shape for o in by_width[1].values()]}: no 640x640, 2-anchor stride fits {n} rows"
        # anchor centres: grid (x, y) * stride, no +0.5, 2 anchors per location listed one after the other
        ys, xs = np.mgrid[:g, :g]
        centres = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, 2, axis=0).astype(np.float32)
        keep = score[:, 0] >= threshold
        c = centres[keep]
        d = by_width[4][n][keep] * stride
        k = by_width[10][n][keep].reshape(-1, 5, 2) * stride
        boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], 1))  # (cx - d0, cy - d1, cx + d2, cy + d3)
        landmarks.append(c[:, None] + k)
        scores.append(score[keep, 0])
    boxes, scores, landmarks = (np.concatenate(a) for a in (boxes, scores, landmarks))
    return [Face(box=(boxes[i] / scale).astype(np.float32), score=float(scores[i]),
                 landmarks=(landmarks[i] / scale).astype(np.float32))
            for i in non_max_suppression(boxes, scores, nms)]

# -----------------------------------------------------------------------------
# alignment


def similarity_transform(src, dst):
    """(2, 3) float64 matrix of the rotation + uniform scale + translation that best maps the points src
    onto dst in least squares (Umeyama 1991), as [s R | t]."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)  # (2, 2)
    U, S, Vt = np.linalg.svd(cov)
    d = np.array([1.0, -1.0 if np.linalg.det(U) * np.linalg.det(Vt) < 0 else 1.0])  # a rotation, never a reflection
    R = U @ np.diag(d) @ Vt
    s = (S * d).sum() / (a ** 2).sum(1).mean()
    t = mu_d - s * R @ mu_s
    return np.concatenate([s * R, t[:, None]], 1)


def warp(image, matrix, size):
    """The size x size crop that `matrix` (image pixels -> crop pixels) maps the image onto:
    bilinear, black (0) outside the image, as InsightFace's crops."""
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def norm_to_pixels(w, h):
    """3x3 map from grid_sample's [-1, 1] coordinates (align_corners=False) to pixels of a w x h image."""
    return torch.tensor([[w / 2, 0, (w - 1) / 2], [0, h / 2, (h - 1) / 2], [0, 0, 1]], dtype=torch.float64)


def warp_torch(images, matrices, size):
    """warp() for a batch, differentiable: (B, C, H, W) float, (B, 2, 3) image -> crop pixel transforms
    -> (B, C, size, size). Gradients reach the pixels (and the matrices)."""
    B, C, H, W = images.shape
    M = torch.as_tensor(matrices, dtype=images.dtype, device=images.device)
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=images.dtype, device=images.device).expand(B, 1, 3)
    crop_to_image = torch.linalg.inv(torch.cat([M, bottom], 1))  # (B, 3, 3): what cv2 samples with
    # grid_sample with align_corners=False puts pixel centre p at (2p + 1) / n - 1 in [-1, 1]: with pixel
    # centres at integers on both sides, this is cv2's convention. theta = image->norm @ crop->image @ norm->crop
    crop_from_norm = norm_to_pixels(size, size).to(images)
    image_to_norm = torch.linalg.inv(norm_to_pixels(W, H)).to(images)
    theta = (image_to_norm @ crop_to_image @ crop_from_norm)[:, :2]  # (B, 2, 3)
    grid = F.affine_grid(theta, (B, C, size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def arcface_crop(images, landmarks):
    """(B, 3, H, W) float images in [-1, 1] and B (5, 2) landmark arrays (image pixels) -> (B, 3, 112, 112)
    ArcFace inputs: each face aligned to ARCFACE_TEMPLATE, differentiable in the pixels (for eq. 7).
    Outside the image the crop is -1, black, as embed()'s crops (cv2's border 0 on uint8)."""
    matrices = np.stack([similarity_transform(lm, ARCFACE_TEMPLATE) for lm in landmarks])  # (B, 2, 3)
    return warp_torch(images + 1, matrices, ARCFACE_SIZE) - 1  # grid_sample pads 0: shift black to 0 and back

# -----------------------------------------------------------------------------
# face parsing


def face_mask(image, face, model=None, classes=tuple(range(1, 14))):
    """(H, W) float32 in [0, 1]: 1 where BiSeNet finds one of `classes` inside the face box, 0 elsewhere.

    Default classes 1-13 (skin, brows, eyes, glasses, ears, earring, nose, mouth, lips; no hair, neck,
    cloth, hat), inside the detector's box: the official MagiCapture face region. The face is parsed in
    an FFHQ-aligned 512 crop (BiSeNet was trained on CelebAMask-HQ, whose faces are aligned much the same
    way); the class mask is warped back with the inverse transform, so its edges are soft (bilinear).
    """
    sess = session(model_path("parser", model))
    matrix = similarity_transform(face.landmarks, FFHQ_TEMPLATE)  # image -> 512 crop
    crop = warp(image, matrix, PARSE_SIZE).astype(np.float32) / 255.0
    x = ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None]
    labels = run(sess, x)[0][0].argmax(0)  # first output (1, 19, 512, 512) -> (512, 512) classes
    chosen = np.isin(labels, classes).astype(np.float32)
    H, W = image.shape[:2]
    mask = cv2.warpAffine(chosen, matrix, (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    inside = np.zeros_like(mask)
    x1, y1 = np.floor(face.box[:2]).clip(0).astype(int)
    x2, y2 = np.ceil(face.box[2:]).astype(int)
    inside[y1:y2, x1:x2] = 1
    return mask * inside

# -----------------------------------------------------------------------------
# identity


def arcface_input(crop):
    """(112, 112, 3) uint8 RGB aligned crop -> (1, 3, 112, 112) float32 in [-1, 1], as ArcFace expects."""
    return (crop.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]


def embed(image, face, model=None):
    """(512,) float32 L2-normalised ArcFace embedding of the face, aligned to the 112x112 template."""
    sess = session(model_path("recognizer", model))
    crop = warp(image, similarity_transform(face.landmarks, ARCFACE_TEMPLATE), ARCFACE_SIZE)
    e = run(sess, arcface_input(crop))[0][0].astype(np.float32)
    return e / np.linalg.norm(e)


def csim(image_a, image_b, detector=None, recognizer=None):
    """The paper's CSIM: cosine of the ArcFace embeddings of the largest face in each image."""
    embeddings = []
    for name, image in (("image_a", image_a), ("image_b", image_b)):
        faces = detect(image, detector)
        if not faces:
            raise ValueError(f"csim: no face found in {name}")
        embeddings.append(embed(image, largest(faces), recognizer))
    return float(embeddings[0] @ embeddings[1])


def arcface_torch(model=None):
    """ArcFace as a frozen torch module with gradients to its input, for L_id (eq. 7):
    (B, 3, 112, 112) aligned RGB in [-1, 1] -> (B, 512) embeddings, not normalised (as the ONNX output).
    Runs the .onnx graph with torch ops (onnx_torch) and checks it against onnxruntime once, here."""
    path = model_path("recognizer", model)
    net = onnx_torch.GraphModule(path).eval()
    x = torch.rand(1, 3, ARCFACE_SIZE, ARCFACE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        got = net(x).float().numpy()
    ref = run(session(path), x.numpy())[0].astype(np.float32)
    err = np.abs(got - ref).max()
    if not err <= 1e-3 * np.abs(ref).max():  # "not <=" also catches NaN
        raise RuntimeError(f"{path}: ArcFace in PyTorch disagrees with onnxruntime on a random input: "
                           f"max abs difference {err:.3g} (max |output| {np.abs(ref).max():.3g})")
    return net
