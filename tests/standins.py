"""
Stand-in ONNX files with the signatures of the real face models (facefusion/models-3.0.0: retinaface_10g,
arcface_w600k_r50, bisenet_resnet_34, codeformer, real_esrgan_x4), for tests that cannot download them.
Built node by node with onnx.helper (no exporter needed), except scrfd(): a small SCRFD-shaped torch module
exported as InsightFace exports det_10g. Each builder writes `path` and returns it.
"""

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

OPSET = 11  # what InsightFace's TorchScript exports use
DET_SIZE = 640


def save(path, nodes, inputs, outputs, initializers, opset=OPSET):
    graph = helper.make_graph(nodes, "standin", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="standins")
    m.ir_version = 7 if opset == OPSET else 8  # readable by any onnxruntime
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return path


def image_input(name, size, batch=1):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, 3, size, size])


def detector(path, faces, batch_dim=False, reverse=False):
    """SCRFD-style detector whose nine outputs decode to `faces`, whatever the image.

    faces: dicts with box (x1, y1, x2, y2) and landmarks (5, 2) in 640-letterbox pixels, score, and
    optionally stride (8, 16, 32; default 8) and anchor (0 or 1; default 0). The face sits on the grid
    cell holding its box centre. Every other anchor scores 0.01. An image with no pixel brighter than
    127 (all inputs < 0 after normalisation) gets all scores 0: a "no-face image" for tests.
    batch_dim: outputs (1, N, k) instead of (N, k); reverse: list the outputs in reverse order.
    """
    scores, boxes, kps = {}, {}, {}
    for s in (8, 16, 32):
        n = (DET_SIZE // s) ** 2 * 2
        scores[s] = np.full((n, 1), 0.01, np.float32)
        boxes[s] = np.zeros((n, 4), np.float32)
        kps[s] = np.zeros((n, 10), np.float32)
    for f in faces:
        s, a = f.get("stride", 8), f.get("anchor", 0)
        box, lm = np.asarray(f["box"], np.float32), np.asarray(f["landmarks"], np.float32)
        gx, gy = int((box[0] + box[2]) / 2 // s), int((box[1] + box[3]) / 2 // s)
        i = (gy * (DET_SIZE // s) + gx) * 2 + a
        assert scores[s][i, 0] == 0.01, f"two planted faces on anchor {i} of stride {s}"
        c = np.array([gx, gy], np.float32) * s  # anchor centre: grid * stride, no +0.5
        scores[s][i] = f["score"]
        boxes[s][i] = np.concatenate([c - box[:2], box[2:] - c]) / s
        kps[s][i] = ((lm - c) / s).reshape(-1)
    consts = [scores[s] for s in (8, 16, 32)] + [boxes[s] for s in (8, 16, 32)] + [kps[s] for s in (8, 16, 32)]
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    # gate = 1 if some pixel is above 127.5 else 0; zero = 0 * max: both make the outputs depend on the input
    nodes = [helper.make_node("ReduceMax", ["input.1"], ["max"], keepdims=0),
             helper.make_node("Greater", ["max", "zero_f"], ["bright"]),
             helper.make_node("Cast", ["bright"], ["gate"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["max", "zero_f"], ["zero"])]
    init = {"zero_f": np.array(0, np.float32)}
    for name, v in zip(names, consts):
        v = v[None] if batch_dim else v
        init[name + "_c"] = v
        if name.startswith("score"):
            nodes.append(helper.make_node("Mul", [name + "_c", "gate"], [name]))
        else:
            nodes.append(helper.make_node("Add", [name + "_c", "zero"], [name]))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(init[name + "_c"].shape)) for name in names]
    return save(path, nodes, [image_input("input.1", DET_SIZE)], outputs[::-1] if reverse else outputs, init)


class TinySCRFD(nn.Module):
    """SCRFD's layout (InsightFace configs/scrfd/scrfd_10g_bnkps.py) with 8 channels: a ResNetV1e-like backbone
    (conv + BN + ReLU stem, max pool, strided convs, an avg_down shortcut: AvgPool2d(ceil_mode=True,
    count_include_pad=False) + 1x1 conv), a PAFPN neck (top-down F.interpolate(size=..., mode="nearest") + add,
    bottom-up strided convs + add) over strides 8/16/32, and per-stride heads (BN, conv + ReLU; score conv with
    sigmoid, box conv times a learned scale, landmark conv; 2 anchors per location) whose outputs are reshaped
    to (N, 1), (N, 4), (N, 10) rows with the batch folded in (SCRFDHead.forward_single). batch_minor: the rows
    location by location with a batch's images inside, permute(2, 3, 0, 1), as the head exported det_10g (InsightFace
    before its October 2021 fix); else image after image, permute(0, 2, 3, 1), as later exports."""

    def __init__(self, c=8, batch_minor=True):
        super().__init__()
        self.order = (2, 3, 0, 1) if batch_minor else (0, 2, 3, 1)
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.ModuleList(nn.Conv2d(c, c, 3, 2, 1) for _ in range(3))  # strides 8, 16, 32
        self.avg_down = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), nn.Conv2d(c, c, 1))
        self.lateral = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(3))
        self.bottom_up = nn.ModuleList(nn.Conv2d(c, c, 3, 2, 1) for _ in range(2))
        self.heads = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1), nn.ReLU())
                                   for _ in range(3))
        self.cls = nn.ModuleList(nn.Conv2d(c, 2, 3, 1, 1) for _ in range(3))
        self.reg = nn.ModuleList(nn.Conv2d(c, 2 * 4, 3, 1, 1) for _ in range(3))
        self.kps = nn.ModuleList(nn.Conv2d(c, 2 * 10, 3, 1, 1) for _ in range(3))
        self.scales = nn.Parameter(torch.ones(3))

    def forward(self, x):
        x = self.stem(x)  # stride 4
        c8 = F.relu(self.stages[0](x))
        c16 = F.relu(self.stages[1](c8) + self.avg_down(c8))
        c32 = F.relu(self.stages[2](c16))
        p = [lat(f) for lat, f in zip(self.lateral, (c8, c16, c32))]
        for i in (2, 1):  # top-down, sized like the finer map as mmdet's FPN does
            p[i - 1] = p[i - 1] + F.interpolate(p[i], size=p[i - 1].shape[2:], mode="nearest")
        for i in (0, 1):
            p[i + 1] = p[i + 1] + self.bottom_up[i](p[i])
        scores, boxes, kps = [], [], []
        for i, f in enumerate(p):
            f = self.heads[i](f)
            scores.append(self.cls[i](f).permute(*self.order).reshape(-1, 1).sigmoid())
            boxes.append((self.reg[i](f) * self.scales[i]).permute(*self.order).reshape(-1, 4))
            kps.append(self.kps[i](f).permute(*self.order).reshape(-1, 10))
        return (*scores, *boxes, *kps)

    def score_logits(self, x):
        """(B, N) score logits of all anchors, strides 8, 16, 32, as the outputs list them."""
        logits = []
        hooks = [conv.register_forward_hook(lambda m, i, o: logits.append(o.permute(0, 2, 3, 1).reshape(len(x), -1)))
                 for conv in self.cls]
        self(x)
        for h in hooks:
            h.remove()
        return torch.cat(logits, 1)


@torch.no_grad()
def scrfd(path, calibrate, empty, seed=0, batch_minor=True):
    """TinySCRFD with random weights, exported with torch.onnx.export as scrfd2onnx.py does (opset 11, input
    "input.1" of dynamic batch and size; outputs score/bbox/kps_8/16/32). He-initialised convs (so textures
    move the scores), random batch-norm statistics, boxes about 4 strides wide and landmarks within a few
    strides of their anchor. The score biases are set so that a handful of anchors of each image of
    `calibrate` ((B, 3, H, W) normalised letterboxes) pass 0.5 and none of `empty`'s, and no score of theirs
    lies near 0.5: the threshold sits in the widest gap between logits, below every calibration image's 4th
    best and above its 33rd and above all of `empty`'s."""
    gen = torch.Generator().manual_seed(seed)
    net = TinySCRFD(batch_minor=batch_minor).eval()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / m.weight[0].numel()) ** 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    for reg, kps in zip(net.reg, net.kps):
        reg.weight.mul_(0.02)
        reg.bias.fill_(2.0)  # distances to the four sides: 2 strides, give or take
        kps.weight.mul_(0.02)
        kps.bias.copy_(torch.randn(kps.bias.shape, generator=gen))
    net.scales.copy_(torch.tensor([1.0, 0.9, 1.1]))
    logits = net.score_logits(calibrate).sort(descending=True).values  # (B, N)
    blank = net.score_logits(empty)
    top, bottom = logits[:, 3].min(), max(logits[:, 32].max(), blank.max())
    assert top > bottom, "no threshold gives every calibration image 4 to 32 passing anchors and none of empty's"
    between = torch.cat([logits.flatten(), blank.flatten()]).sort(descending=True).values
    between = torch.cat([top[None], between[(between < top) & (between > bottom)], bottom[None]])
    gap = (between[:-1] - between[1:]).argmax()
    for cls in net.cls:
        cls.bias.sub_((between[gap] + between[gap + 1]) / 2)
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    torch.onnx.export(net, (calibrate[:1],), path, dynamo=False, opset_version=OPSET, input_names=["input.1"],
                      output_names=names, dynamic_axes={"input.1": {0: "batch", 2: "height", 3: "width"}})
    return path


def recognizer(path, seed=0, width=(8, 8, 16, 16, 16), pixels=False):
    """ArcFace-shaped network, 112x112 -> 512, random weights: the layer types of a TorchScript
    IResNet export (Conv with folded BN, BatchNormalization before a conv, PRelu, residual Add,
    Identity, Flatten, Gemm), small channels. Batch dimension dynamic. pixels: the same network behind a
    Sub 127.5 and a Mul 1/127.5, on 0..255 pixels, as ArcFace models converted from MXNet normalise their input."""
    rng = np.random.RandomState(seed)
    init, nodes = {}, []
    image = "input.1"
    if pixels:
        init.update(mean=np.array(127.5, np.float32), scale=np.array(1 / 127.5, np.float32))
        nodes += [helper.make_node("Sub", ["input.1", "mean"], ["centred"]),
                  helper.make_node("Mul", ["centred", "scale"], ["normalised"])]
        image = "normalised"

    def tensor(name, *shape, std=1.0, mean=0.0):
        init[name] = (mean + std * rng.randn(*shape)).astype(np.float32)
        return name

    def conv(name, x, cin, cout, k, stride):  # conv with a bias: a batch norm after it was folded in
        w = tensor(name + ".w", cout, cin, k, k, std=(2.0 / (cin * k * k)) ** 0.5)
        b = tensor(name + ".b", cout, std=0.1)
        nodes.append(helper.make_node("Conv", [x, w, b], [name], kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[k // 2] * 4))
        return name

    def bn(name, x, c):
        init[name + ".var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        nodes.append(helper.make_node("BatchNormalization", [x, tensor(name + ".g", c, std=0.2, mean=1.0),
                                      tensor(name + ".b", c, std=0.1), tensor(name + ".mean", c, std=0.1),
                                      name + ".var"], [name], epsilon=1e-5))
        return name

    def prelu(name, x, c):
        init[name + ".slope"] = rng.uniform(0.1, 0.3, (c, 1, 1)).astype(np.float32)  # stored (C, 1, 1) as exports do
        nodes.append(helper.make_node("PRelu", [x, name + ".slope"], [name]))
        return name

    # stem: conv 3x3 + (folded) BN + PReLU, then IResNet blocks: BN, conv, PReLU, conv (stride 2), + shortcut
    x = prelu("stem.prelu", conv("stem.conv", image, 3, width[0], 3, 1), width[0])
    for i, (cin, cout) in enumerate(zip(width[:-1], width[1:])):
        p = f"layer{i}"
        y = conv(p + ".conv2", prelu(p + ".prelu", conv(p + ".conv1", bn(p + ".bn1", x, cin), cin, cout, 3, 1), cout),
                 cout, cout, 3, 2)
        nodes.append(helper.make_node("Add", [y, conv(p + ".down", x, cin, cout, 1, 2)], [p + ".out"]))
        x = p + ".out"
    side = 112 // 2 ** (len(width) - 1)
    nodes.append(helper.make_node("Identity", [bn("bn2", x, width[-1])], ["dropout"]))  # dropout, exported as Identity
    nodes.append(helper.make_node("Flatten", ["dropout"], ["flat"], axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", tensor("fc.w", 512, width[-1] * side * side,
                                                          std=(1.0 / (width[-1] * side * side)) ** 0.5),
                                           tensor("fc.b", 512, std=0.1)], ["embedding"], transB=1))
    return save(path, nodes, [image_input("input.1", 112, batch="None")],
                [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["None", 512])], init)


def parser(path, label_map):
    """BiSeNet-shaped parser: (1, 3, 512, 512) -> first output (1, 19, 512, 512) logits whose argmax is
    `label_map` (512x512 ints in 0..18), whatever the image. A second output (as BiSeNet's auxiliary
    heads) argmaxes to class 18 everywhere, so reading the wrong output shows."""
    labels = np.asarray(label_map, np.int32).reshape(1, 1, 512, 512)
    init = {"labels": labels, "classes": np.arange(19, dtype=np.int32).reshape(1, 19, 1, 1),
            "ten": np.array(10, np.float32), "zero_f": np.array(0, np.float32),
            "aux": np.eye(19, dtype=np.float32)[18].reshape(1, 19, 1, 1)}
    nodes = [helper.make_node("Equal", ["labels", "classes"], ["onehot_b"]),  # (1, 19, 512, 512)
             helper.make_node("Cast", ["onehot_b"], ["onehot"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMax", ["input"], ["max"], keepdims=0),
             helper.make_node("Mul", ["max", "zero_f"], ["zero"]),
             helper.make_node("Mul", ["onehot", "ten"], ["scaled"]),
             helper.make_node("Add", ["scaled", "zero"], ["out"]),
             helper.make_node("Add", ["aux", "zero"], ["out16"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 19, 512, 512]),
               helper.make_tensor_value_info("out16", TensorProto.FLOAT, [1, 19, 1, 1])]
    return save(path, nodes, [image_input("input", 512)], outputs, init)


# -----------------------------------------------------------------------------
# enhancement models (postprocess.py): opset 17 for Resize with scales and no roi

def image_io(name, dims=("N", 3, "H", "W")):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def upscaler(path, conv=False, seed=0):
    """Real-ESRGAN x4's interface: (N, 3, H, W) in [0, 1] -> (N, 3, 4H, 4W), any H and W.
    conv=False: exact nearest-neighbour x4 (every pixel repeated 4x4). conv=True: two 3x3 convolutions
    and a sigmoid first (receptive field 5x5), so a seam between tiles would show."""
    init = {"scales": np.array([1, 1, 4, 4], np.float32)}
    nodes, src = [], "input"
    if conv:
        rng = np.random.default_rng(seed)
        init.update(w1=rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32),
                    w2=rng.normal(0, 0.3, (3, 8, 3, 3)).astype(np.float32),
                    b1=rng.normal(0, 0.1, 8).astype(np.float32))
        nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c1"], ["r1"]),
                 helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
                 helper.make_node("Sigmoid", ["c2"], ["s"])]
        src = "s"
    # asymmetric coordinates + floor: exact pixel replication
    nodes.append(helper.make_node("Resize", [src, "", "scales"], ["output"], mode="nearest",
                                  coordinate_transformation_mode="asymmetric", nearest_mode="floor"))
    return save(path, nodes, [image_io("input")], [image_io("output")], init, opset=17)


def restorer(path, colour=None):
    """CodeFormer's interface: image (1, 3, 512, 512) float32 + weight (1,) float64 -> (1, 3, 512, 512).
    colour None: returns its input (identity); else paints the whole crop that RGB colour (0..255).
    The weight is used (times 0), so onnxruntime checks it is fed as float64 (1,)."""
    dims = (1, 3, 512, 512)
    weight = helper.make_tensor_value_info("weight", TensorProto.DOUBLE, [1])
    nodes = [helper.make_node("Cast", ["weight"], ["wf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["wf", "zero"], ["w0"])]
    init = {"zero": np.zeros(1, np.float32)}
    if colour is None:
        nodes.append(helper.make_node("Add", ["input", "w0"], ["output"]))
    else:
        init["colour"] = ((np.array(colour, np.float32) / 255 - 0.5) / 0.5).reshape(1, 3, 1, 1)
        nodes += [helper.make_node("Mul", ["input", "zero"], ["x0"]),
                  helper.make_node("Add", ["x0", "colour"], ["xc"]),
                  helper.make_node("Add", ["xc", "w0"], ["output"])]
    return save(path, nodes, [image_io("input", dims), weight], [image_io("output", dims)], init, opset=17)
