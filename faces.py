"""
The face models of MagiCapture, run with onnxruntime (the detector and ArcFace also with torch ops):

- detect            SCRFD-style detector (InsightFace det_10g): boxes + 5 landmarks
- detector_torch, detect_torch
                    the same detector run with torch ops on the training device, batched, with nothing
                    read back to the host: the largest face's landmarks on each x0 estimate (eq. 7)
- similarity_transform(_torch), warp, warp_torch
                    5-point alignment; the torch versions are batched and differentiable, for eq. 7
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

import functools
import os
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
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
DET_TOP_K = 128  # detect_torch's NMS candidates per image, best scores first: room for several faces' anchors
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


def model_paths(chosen):
    """{kind: model_path(kind, path)} for chosen {kind: local path or None}; every file that is missing is named
    in one MissingModel (offline, each would otherwise cost a trip to a machine with network)."""
    found, missing = {}, []
    for kind, path in chosen.items():
        try:
            found[kind] = model_path(kind, path)
        except (MissingModel, FileNotFoundError) as e:
            missing.append(str(e))
    if missing:
        raise MissingModel("\n".join(missing))
    return found


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
        # the cache's snapshot path is a link to a blob, which a new download would link again: the blob must go
        raise RuntimeError(f"{path}: CRC32 {crc:08x} does not match {HUB_REPO}/{hash_name} ({expected}); the "
                           f"download is corrupt or incomplete. Delete {os.path.realpath(path)} and {path} (the "
                           "cached file and its link) and run again.")


_sessions = {}
_said_cpu = False


def session(path):
    """An onnxruntime session for `path`, made once per process; on the GPU when onnxruntime can use it."""
    global _said_cpu
    if path not in _sessions:
        cuda = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
        # on torch's current GPU (each torchrun process its own), not onnxruntime's default, GPU 0
        gpu = ("CUDAExecutionProvider", {"device_id": torch.cuda.current_device()}) if cuda else None
        providers = [gpu, "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
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
    h, w = max(1, round(H * scale)), max(1, round(W * scale))  # a photo over 1280:1 keeps a row
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:h, :w] = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    return canvas, scale


def per_image(out, batch, batch_minor=False):
    """One detector output of a batch -> (batch, N, k). Exports give (N, k) or (1, N, k) per image. A batch comes
    out image after image, or, batch_minor, location by location with the images inside, (y, x, image, anchor)
    rows: InsightFace's SCRFD head before its October 2021 fix, which retinaface_10g's export has."""
    k = out.shape[-1]
    if batch_minor:
        out = out.reshape(-1, batch, 2, k).swapaxes(0, 1)  # 2 anchors per location
    return out.reshape(batch, -1, k)


def detector_levels(outputs, batch, batch_minor=False):
    """The detector's 9 outputs per stride, in output order: [(stride, scores (batch, N, 1), box distances
    (batch, N, 4), landmark offsets (batch, N, 10))], N = (640 / stride)^2 * 2. numpy arrays or tensors.
    Grouped by width and N rather than by position or name (copies of the model differ in both)."""
    by_width = {1: {}, 4: {}, 10: {}}
    for out in outputs:
        if out.shape[-1] not in by_width:
            raise ValueError(f"an output of shape {tuple(out.shape)}: not an SCRFD/RetinaFace detector, whose 9 "
                             "outputs are scores, boxes and 5 landmarks ((N, 1), (N, 4), (N, 10)) at strides 8, 16, 32")
        out = per_image(out, batch, batch_minor)
        by_width[out.shape[-1]][out.shape[1]] = out
    levels = []
    for n, score in by_width[1].items():
        stride = int(round((DET_SIZE * DET_SIZE * 2 / n) ** 0.5))
        if not ((DET_SIZE // stride) ** 2 * 2 == n and n in by_width[4] and n in by_width[10]):
            raise ValueError(f"outputs {[tuple(o.shape) for o in by_width[1].values()]}: no 640x640, 2-anchor "
                             f"stride fits {n} rows (an SCRFD/RetinaFace detector, such as retinaface_10g.onnx, "
                             "is needed)")
        levels.append((stride, score, by_width[4][n], by_width[10][n]))
    return levels


def detect(image, model=None, threshold=0.5, nms=0.4):
    """Faces in an HxWx3 uint8 RGB image, best score first (score 0.5 and NMS IoU 0.4 as InsightFace)."""
    if not (image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        raise ValueError(f"detect wants an HxWx3 uint8 RGB image, got {image.dtype} {image.shape}")
    path = model_path("detector", model)
    canvas, scale = letterbox(image, DET_SIZE)
    x = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
    try:
        levels = detector_levels(run(session(path), x), 1)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    boxes, scores, landmarks = [], [], []
    for stride, score, bbox, kps in levels:
        score, bbox, kps = score[0], bbox[0], kps[0]
        g = DET_SIZE // stride
        # anchor centres: grid (x, y) * stride, no +0.5, 2 anchors per location listed one after the other
        ys, xs = np.mgrid[:g, :g]
        centres = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, 2, axis=0).astype(np.float32)
        keep = score[:, 0] >= threshold
        c = centres[keep]
        d = bbox[keep] * stride
        k = kps[keep].reshape(-1, 5, 2) * stride
        boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], 1))  # (cx - d0, cy - d1, cx + d2, cy + d3)
        landmarks.append(c[:, None] + k)
        scores.append(score[keep, 0])
    boxes, scores, landmarks = (np.concatenate(a) for a in (boxes, scores, landmarks))
    return [Face(box=(boxes[i] / scale).astype(np.float32), score=float(scores[i]),
                 landmarks=(landmarks[i] / scale).astype(np.float32))
            for i in non_max_suppression(boxes, scores, nms)]


def detector_torch(model=None):
    """The detector as a frozen torch module for detect_torch (move it to the images' device): (B, 3, 640, 640)
    normalised letterboxes -> the 9 outputs, batched. Runs the .onnx graph with torch ops (onnx_torch) and checks
    it against onnxruntime once, here, on two random inputs: batched in torch, one at a time in onnxruntime."""
    path = model_path("detector", model)
    net = onnx_torch.GraphModule(path).eval()
    x = torch.rand(2, 3, DET_SIZE, DET_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        outs, first = net(x), net(x[:1])
    # how its batch comes out (per_image): image after image if the batch's first image reads as it does alone
    net.batch_minor = not all(torch.allclose(per_image(o, 2)[0], per_image(f, 1)[0], rtol=1e-3, atol=1e-4)
                              for o, f in zip(outs, first))
    got = [per_image(o, len(x), net.batch_minor).float().numpy() for o in outs]
    for i in range(len(x)):
        for name, g, ref in zip(net.output_names, got, run(session(path), x[i:i + 1].numpy())):
            ref = ref.reshape(-1, ref.shape[-1]).astype(np.float32)
            err = np.abs(g[i] - ref).max() if g[i].shape == ref.shape else np.inf
            # scores are probabilities (onnxruntime's Sigmoid is good to about 2e-7), boxes and landmarks in strides
            if not err <= 1e-3 * max(np.abs(ref).max(), 1.0):  # "not <=" also catches NaN
                raise RuntimeError(f"{path}: the detector in PyTorch disagrees with onnxruntime on random input {i} "
                                   f"of a batch of 2, output {name}: shape {g[i].shape} vs {ref.shape}, max abs "
                                   f"difference {err:.3g} (max |output| {np.abs(ref).max():.3g})")
    return net


def cv2_linear_taps(n_in, n_out, device, clamp):
    """cv2.resize's INTER_LINEAR taps along one axis (resize.cpp): for each output pixel two source indices
    and their 11-bit fixed-point weights (summing to 2048), made on `device` (no copy from the host)."""
    # source coordinate (d + 0.5) * scale - 0.5 in double, rounded to float, scale = 1 / (n_out / n_in)
    f = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (1 / (n_out / n_in)) - 0.5).float()
    i = f.floor()
    f = f - i
    if clamp:  # columns: a tap past either edge takes the edge pixel at full weight; rows keep their fraction
        f = torch.where((i < 0) | (i >= n_in - 1), 0.0, f)
    i = i.long()
    return i.clamp(0, n_in - 1), (i + 1).clamp(0, n_in - 1), ((1 - f) * 2048).round().int(), (f * 2048).round().int()


def resize_like_cv2(pixels, h, w):
    """cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR) of uint8 images, bit-exact, on (B, C, H, W)
    float pixel values 0..255 on any device: rows of 11-bit fixed-point taps, then columns with cv2's
    vectorised rounding. Not antialiased when shrinking, as cv2. A float bilinear resize (F.interpolate) of the
    same pixels is one level off on about 12% of them."""
    H, W = pixels.shape[-2:]
    x0, x1, a0, a1 = cv2_linear_taps(W, w, pixels.device, clamp=True)
    y0, y1, b0, b1 = cv2_linear_taps(H, h, pixels.device, clamp=False)
    p = pixels.int()
    rows = p.index_select(3, x0) * a0 + p.index_select(3, x1) * a1  # (B, C, H, w), pixel * 2048
    top, bottom = rows.index_select(2, y0) >> 4, rows.index_select(2, y1) >> 4
    out = ((b0[:, None] * top) >> 16) + ((b1[:, None] * bottom) >> 16)  # 16-bit multiply-high, as cv2's SIMD
    return ((out + 2) >> 2).clamp(0, 255).float()


def letterbox_torch(images, size):
    """letterbox() for a batch: (B, 3, H, W) float images in [-1, 1] on any device -> ((B, 3, size, size) float32
    pixel values 0..255, scale). The pixels are data.to_uint8's 8-bit levels, resized as cv2 resizes uint8
    (resize_like_cv2), so the canvas is letterbox()'s to the bit; black padding at the bottom/right."""
    B, C, H, W = images.shape
    scale = min(size / H, size / W)
    h, w = max(1, round(H * scale)), max(1, round(W * scale))  # a photo over 1280:1 keeps a row
    pixels = ((images.detach().float() / 2 + 0.5).clamp(0, 1) * 255).round()  # data.to_uint8's levels
    if (h, w) != (H, W):
        pixels = resize_like_cv2(pixels, h, w)
    return F.pad(pixels, (0, size - w, 0, size - h)), scale


@torch.no_grad()
def detect_torch(net, images, threshold=0.5, nms=0.4, top_k=DET_TOP_K):
    """largest(detect(image)) for a batch, as torch ops with fixed shapes on the images' device, so nothing is
    read back to the host: (B, 3, H, W) float in [-1, 1] -> found (B,) bool, landmarks (B, 5, 2) float32 in
    image pixels of the largest face after NMS (zeros where none was found). net: detector_torch() on the
    images' device. detect()'s letterbox (to the bit), anchors, score >= threshold and greedy NMS, over the
    top_k best-scoring anchors of each image: the result can differ only where more than top_k pass."""
    B = len(images)
    canvas, scale = letterbox_torch(images, DET_SIZE)
    scores, boxes, landmarks = [], [], []
    for stride, score, bbox, kps in detector_levels(net((canvas - 127.5) / 128.0), B, net.batch_minor):
        g = DET_SIZE // stride
        # anchor centres as detect(), made on the device: grid (x, y) * stride, 2 anchors per location
        ys, xs = torch.meshgrid(*[torch.arange(g, device=images.device)] * 2, indexing="ij")
        c = (torch.stack([xs, ys], -1).reshape(-1, 1, 2) * stride).expand(-1, 2, -1).reshape(-1, 2).float()
        d = bbox * stride
        boxes.append(torch.cat([c - d[..., :2], c + d[..., 2:]], -1))  # (B, N, 4)
        landmarks.append(c[:, None] + kps.reshape(B, -1, 5, 2) * stride)  # (B, N, 5, 2)
        scores.append(score[..., 0])
    scores, boxes, landmarks = (torch.cat(t, 1) for t in (scores, boxes, landmarks))
    # best first, ties in anchor order (detect()'s stable argsort); the top_k of each image go on
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :top_k]  # (B, K)
    valid = scores.gather(1, order) >= threshold
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    landmarks = landmarks.gather(1, order[..., None, None].expand(-1, -1, 5, 2))
    # greedy NMS, as non_max_suppression(): a box goes when a kept, better one overlaps it by IoU > nms
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])  # (B, K)
    wh = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:]) - torch.maximum(boxes[:, :, None, :2],
                                                                                     boxes[:, None, :, :2])
    inter = wh.clamp(min=0).prod(-1)  # (B, K, K)
    over = ~(inter / torch.clamp(area[:, :, None] + area[:, None, :] - inter, min=1e-9) <= nms)
    keep = valid.clone()
    for i in range(1, keep.shape[1]):
        keep[:, i] &= ~(over[:, i, :i] & keep[:, :i]).any(1)
    # largest(): the kept face with the largest box in image pixels, first in score order on a tie
    boxes = boxes / scale
    best = torch.where(keep, (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]), -torch.inf).argmax(1)
    found = keep.any(1)
    chosen = (landmarks / scale).gather(1, best[:, None, None, None].expand(-1, 1, 5, 2))[:, 0]  # (B, 5, 2)
    return found, torch.where(found[:, None, None], chosen, 0.0)

# -----------------------------------------------------------------------------
# alignment


def similarity_transform_torch(src, dst):
    """(B, 2, 3) matrices [s R | t] of the rotation + uniform scale + translation that best map the points
    src (B, P, 2) onto dst ((P, 2) or (B, P, 2)) in least squares, never a reflection (Umeyama 1991).
    In 2-D it has a closed form, no SVD: with the centred points as complex numbers a and b,
    s e^(i theta) = sum(conj(a) b) / sum(|a|^2). Batched tensor ops, nothing read back to the host."""
    mu_s, mu_d = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    a, b = src - mu_s, dst - mu_d
    norm = (a ** 2).sum((-2, -1))
    p = (a * b).sum((-2, -1)) / norm  # s cos(theta)
    q = (a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]).sum(-1) / norm  # s sin(theta)
    sR = torch.stack([torch.stack([p, -q], -1), torch.stack([q, p], -1)], -2)  # (B, 2, 2)
    t = mu_d[..., 0, :] - (sR @ mu_s.transpose(-1, -2))[..., 0]  # (B, 2)
    return torch.cat([sR, t[..., None]], -1)


def similarity_transform(src, dst):
    """similarity_transform_torch for one face: src, dst (P, 2) points -> (2, 3) float64 numpy matrix."""
    src, dst = (torch.from_numpy(np.asarray(v, np.float64)) for v in (src, dst))
    return similarity_transform_torch(src[None], dst)[0].numpy()


def warp(image, matrix, size):
    """The size x size crop that `matrix` (image pixels -> crop pixels) maps the image onto:
    bilinear, black (0) outside the image, as InsightFace's crops."""
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def warp_torch(images, matrices, size):
    """warp() for a batch, differentiable: (B, C, H, W) float, (B, 2, 3) image -> crop pixel transforms
    -> (B, C, size, size). Gradients reach the pixels (and the matrices). With matrices on the images' device
    nothing goes to or from the host (the 2x2 inverse is written out: torch.linalg.inv reads an error flag back
    from the GPU)."""
    B, C, H, W = images.shape
    M = torch.as_tensor(matrices, dtype=images.dtype, device=images.device)
    A, t = M[:, :, :2], M[:, :, 2]
    det = A[:, 0, 0] * A[:, 1, 1] - A[:, 0, 1] * A[:, 1, 0]
    inv = torch.stack([torch.stack([A[:, 1, 1], -A[:, 0, 1]], -1),
                       torch.stack([-A[:, 1, 0], A[:, 0, 0]], -1)], -2) / det[:, None, None]
    # crop pixel c -> image pixel p = inv (c - t), what cv2 samples with. grid_sample with align_corners=False
    # puts pixel centre c of n pixels at u = (2c + 1) / n - 1 in [-1, 1]: with pixel centres at integers on both
    # sides, this is cv2's convention. theta maps the crop's u to the image's: c = u size / 2 + (size - 1) / 2,
    # then u_image = (p - (n - 1) / 2) / (n / 2) with n = W for x, H for y
    lin = inv * (size / 2)  # (B, 2, 2)
    at_centre = (inv @ ((size - 1) / 2 - t)[..., None])[..., 0]  # (B, 2): p at the crop's u = 0
    theta = torch.stack([torch.cat([lin[:, 0], at_centre[:, :1] - (W - 1) / 2], -1) / (W / 2),
                         torch.cat([lin[:, 1], at_centre[:, 1:] - (H - 1) / 2], -1) / (H / 2)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, (B, C, size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@functools.lru_cache
def arcface_template(device):
    """ARCFACE_TEMPLATE as a float64 tensor on `device`, copied there once: a copy to the GPU waits for its queue."""
    return torch.from_numpy(ARCFACE_TEMPLATE).double().to(device)


def arcface_crop(images, landmarks):
    """(B, 3, H, W) float images in [-1, 1] and their landmarks in image pixels, a (B, 5, 2) tensor (detect_torch's,
    on the images' device: nothing then goes to or from the host) or B (5, 2) arrays -> (B, 3, 112, 112) ArcFace
    inputs: each face aligned to ARCFACE_TEMPLATE, differentiable in the pixels (for eq. 7).
    Outside the image the crop is -1, black, as embed()'s crops (cv2's border 0 on uint8)."""
    if not torch.is_tensor(landmarks):
        landmarks = torch.from_numpy(np.stack(landmarks))
    landmarks = landmarks.to(images.device, torch.float64)  # the transform in float64, as embed()'s
    matrices = similarity_transform_torch(landmarks, arcface_template(images.device))  # (B, 2, 3)
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
    x2, y2 = np.ceil(face.box[2:]).clip(0).astype(int)  # a box wholly above or left of the image: nothing
    inside[y1:y2, x1:x2] = 1
    return mask * inside

# -----------------------------------------------------------------------------
# identity


@functools.lru_cache(maxsize=None)
def takes_pixels(path):
    """Whether a recognizer normalises its input itself: ArcFace models converted from MXNet begin with a Sub and
    a Mul on 0..255 pixels (InsightFace tells them apart by those first nodes); the others take [-1, 1]."""
    import onnx
    return {"Sub", "Mul"} <= {n.op_type for n in onnx.load(path, load_external_data=False).graph.node[:8]}


def arcface_input(crop, pixels=False):
    """(112, 112, 3) uint8 RGB aligned crop -> (1, 3, 112, 112) float32 in [-1, 1], as ArcFace expects (pixels:
    0..255, for a recognizer that takes_pixels)."""
    x = crop.astype(np.float32)
    return (x if pixels else x / 127.5 - 1.0).transpose(2, 0, 1)[None]


def embed(image, face, model=None):
    """(512,) float32 L2-normalised ArcFace embedding of the face, aligned to the 112x112 template."""
    path = model_path("recognizer", model)
    crop = warp(image, similarity_transform(face.landmarks, ARCFACE_TEMPLATE), ARCFACE_SIZE)
    e = run(session(path), arcface_input(crop, takes_pixels(path)))[0][0].astype(np.float32)
    return e / np.linalg.norm(e)


class FromUnit(nn.Module):
    """[-1, 1] -> 0..255 pixels, before a recognizer that takes_pixels."""

    def forward(self, x):
        return (x + 1) * 127.5


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
    if takes_pixels(path):
        net = nn.Sequential(FromUnit(), net).eval()
    x = torch.rand(1, 3, ARCFACE_SIZE, ARCFACE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        got = net(x).float().numpy()
    ref = run(session(path), ((x + 1) * 127.5 if takes_pixels(path) else x).numpy())[0].astype(np.float32)
    err = np.abs(got - ref).max()
    if not err <= 1e-3 * np.abs(ref).max():  # "not <=" also catches NaN
        raise RuntimeError(f"{path}: ArcFace in PyTorch disagrees with onnxruntime on a random input: "
                           f"max abs difference {err:.3g} (max |output| {np.abs(ref).max():.3g})")
    return net
