"""
Run an ONNX graph with torch ops, so gradients flow through it and it runs on the training device.

The identity loss backpropagates through ArcFace (InsightFace's arcface_w600k_r50.onnx, an IResNet-50),
and onnxruntime gives no gradients; the face detector (InsightFace's SCRFD det_10g, retinaface_10g.onnx)
runs on every decoded x0 estimate, where a trip to onnxruntime on the host would stall the GPU. This
small executor evaluates such a graph node by node with torch functions. It knows only the ops these
two exports hold:

- ArcFace, a TorchScript export at opset 11 (how InsightFace exports its PyTorch IResNets): Conv (batch
  norms after a conv folded in), BatchNormalization (those before a conv, and the BatchNorm1d after the
  last linear layer), PRelu, Add, Identity, Flatten and Gemm; a model converted from MXNet adds Sub and
  Mul (input normalisation), Reshape and Constant.
- SCRFD, exported by InsightFace's detection/scrfd/tools/scrfd2onnx.py (torch.onnx.export, opset 11,
  dynamic input size, onnxsim) from mmdet modules (configs/scrfd/scrfd_10g_bnkps.py): a ResNetV1e
  backbone (Conv + Relu, MaxPool after the stem, AveragePool with ceil_mode and count_include_pad=0 in
  the downsampling shortcuts), a PAFPN neck whose top-down path upsamples with
  F.interpolate(size=..., mode="nearest") (Resize with sizes computed by Shape, Gather, Unsqueeze,
  Concat, Slice and Cast), and per-stride heads that end in Mul (the learned Scale), Transpose, Reshape
  and Sigmoid (SCRFDHead.forward_single).

Any other op is refused at load time, by name.
Tensors that hold shapes (Shape's output, integer constants, Resize's roi and scales) stay on the CPU
whatever device the module is on, so reading them costs no device sync.
"""

import math
import re

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import helper, numpy_helper


def conv(a, x, w, b=None):
    # 2-D with symmetric pads only (GraphModule refuses other Convs): ONNX pads are (top, left, bottom, right)
    pads = a.get("pads", [0, 0, 0, 0])
    return F.conv2d(x, w, b, a.get("strides", [1, 1]), pads[:2], a.get("dilations", [1, 1]), a.get("group", 1))


def pool(a, x, average):
    # 2-D, symmetric pads (GraphModule refuses others). ONNX AveragePool's count_include_pad defaults to 0,
    # torch's to True; ceil_mode lets the last window overhang the input (ResNetV1e's avg_down shortcut)
    k, s, pads = a["kernel_shape"], a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0])[:2]
    if average:
        return F.avg_pool2d(x, k, s, pads, bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0)))
    return F.max_pool2d(x, k, s, pads, a.get("dilations", [1, 1]), bool(a.get("ceil_mode", 0)))


def resize(a, x, roi=None, scales=None, sizes=None):
    # mode nearest, coordinate_transformation_mode asymmetric, nearest_mode floor (GraphModule refuses
    # others): out[i] = in[floor(i / scale)], torch's "nearest". Only H and W change: N and C are never
    # resized by an FPN, and an export at batch 1 may hold sizes (1, C, h, w) that onnxsim folded.
    if sizes is not None and sizes.numel():
        return F.interpolate(x, size=sizes.tolist()[2:], mode="nearest")
    # with scales the source index is i / scale, not i * in / out: pass the scale itself to torch
    return F.interpolate(x, scale_factor=scales.tolist()[2:], mode="nearest", recompute_scale_factor=False)


def slice_(a, x, starts, ends, axes=None, steps=None):
    # opset 10+ form (inputs, not attributes); out-of-range starts/ends clamp as Python's slices do
    starts, ends = starts.tolist(), ends.tolist()
    axes = range(len(starts)) if axes is None else axes.tolist()
    steps = [1] * len(starts) if steps is None else steps.tolist()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        n = x.shape[axis]
        kept = range(n)[start:end:step]
        if step < 0:  # torch slices only forwards: flip, then walk the mirrored indices upwards
            x, kept = x.flip(axis), range(n - 1 - kept.start, n - 1 - kept.start - len(kept) * step, -step)
        x = x[(slice(None),) * (axis % x.dim()) + (slice(kept.start, kept.stop, kept.step),)]
    return x


def gather(a, x, indices):
    # out = x.shape[:axis] + indices.shape + x.shape[axis + 1:]; negative indices count from the end.
    # SCRFD gathers only from shapes, on the CPU; data on a GPU would take the indices there (a copy)
    axis = a.get("axis", 0) % x.dim()
    idx = indices.to(x.device).reshape(-1) % x.shape[axis]
    return x.index_select(axis, idx).reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1:])


def unsqueeze(a, x):
    # opset 11: axes is an attribute, negative axes count in the output's rank
    for axis in sorted(ax % (x.dim() + len(a["axes"])) for ax in a["axes"]):
        x = x.unsqueeze(axis)
    return x


def gemm(a, A, B, C=None):
    # Y = alpha * A' B' + beta * C, A' and B' optionally transposed
    A = A.t() if a.get("transA", 0) else A
    B = B.t() if a.get("transB", 0) else B
    y = a.get("alpha", 1.0) * (A @ B)
    return y if C is None else y + a.get("beta", 1.0) * C


def reshape(a, x, shape):
    # a 0 copies the input's dim at that position, -1 is inferred (opset 11 has no allowzero)
    return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape.tolist())])


# op name -> fn(attributes, *inputs) -> output. Missing optional inputs arrive as None.
OPS = {
    # TorchScript export, opset 11
    "Conv": conv,
    "BatchNormalization": lambda a, x, scale, b, mean, var: F.batch_norm(
        x, mean, var, scale, b, training=False, eps=a.get("epsilon", 1e-5)),
    # slope broadcasts numpy-style against x, as onnxruntime does: exports store it as (C, 1, 1)
    "PRelu": lambda a, x, slope: torch.where(x >= 0, x, x * slope),
    "Add": lambda a, x, y: x + y,
    "Identity": lambda a, x: x,
    "Flatten": lambda a, x: x.reshape(math.prod(x.shape[:a.get("axis", 1)]), -1),
    "Gemm": gemm,
    # converted from MXNet: (x - 127.5) * 0.0078125 on raw pixels, Reshape(0, -1) before the last Gemm
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Reshape": reshape,
    # SCRFD (scrfd2onnx.py, opset 11): backbone, FPN upsampling and its shape arithmetic, heads
    "Relu": lambda a, x: F.relu(x),
    "MaxPool": lambda a, x: pool(a, x, average=False),
    "AveragePool": lambda a, x: pool(a, x, average=True),
    "Resize": resize,
    "Shape": lambda a, x: torch.tensor(x.shape, dtype=torch.int64),  # on the CPU: no device sync to read it
    "Gather": gather,
    "Unsqueeze": unsqueeze,
    "Concat": lambda a, *xs: torch.cat(xs, a["axis"]),
    "Slice": slice_,
    "Cast": lambda a, x: x.to(torch.from_numpy(np.empty(0, helper.tensor_dtype_to_np_dtype(a["to"]))).dtype),
    "Transpose": lambda a, x: x.permute(a.get("perm", list(range(x.dim()))[::-1])),
    "Sigmoid": lambda a, x: torch.sigmoid(x),
    # Constant is folded into a stored tensor at load time and never runs
}


def unsupported(node):
    """Why GraphModule cannot run `node`, or None if it can."""
    name = node.name or node.output[0]
    if node.op_type == "Constant":  # opset 11 holds a `value` tensor; value_float(s)/value_int(s) came in opset 12
        attr = node.attribute[0].name
        return None if attr == "value" else f"ONNX Constant (node {name}) with {attr} is not supported, only value"
    if node.op_type not in OPS:
        return f"ONNX op {node.op_type} (node {name}) is not supported"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op = f"ONNX {node.op_type} (node {name})"
    if node.op_type in ("Conv", "MaxPool", "AveragePool"):
        auto_pad, pads = attrs.get("auto_pad", b"NOTSET"), attrs.get("pads", [0, 0, 0, 0])
        if auto_pad not in (b"", b"NOTSET"):
            return f"{op}: auto_pad {auto_pad.decode()} is not supported, only explicit pads"
        if len(pads) != 4 or pads[:2] != pads[2:] or len(attrs.get("kernel_shape", [0, 0])) != 2:
            return f"{op}: pads {pads} are not supported, only a 2-D {node.op_type} with symmetric pads"
    if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
        return f"{op}: the Indices output is not supported"
    if node.op_type == "AveragePool" and attrs.get("dilations", [1, 1]) != [1, 1]:
        return f"{op}: dilations {attrs['dilations']} are not supported"
    if node.op_type == "Resize":
        how = tuple(attrs.get(k, d).decode() for k, d in (("mode", b"nearest"), ("coordinate_transformation_mode",
                    b"half_pixel"), ("nearest_mode", b"round_prefer_floor")))
        if how != ("nearest", "asymmetric", "floor") or len(node.input) < 3:
            return (f"{op}: mode, coordinate_transformation_mode, nearest_mode {how} with {len(node.input)} inputs "
                    "are not supported, only nearest, asymmetric, floor (torch's nearest) with roi, scales[, sizes]")
    if node.op_type == "Unsqueeze" and len(node.input) > 1:
        return f"{op}: axes as an input (opset 13+) is not supported, only the axes attribute (opset 11)"
    if node.op_type == "Slice" and "starts" in attrs:
        return f"{op}: starts/ends as attributes (opset 1-9) are not supported, only as inputs (opset 10+)"
    return None


class GraphModule(nn.Module):
    """An ONNX file as a frozen nn.Module: forward(*inputs) returns the graph's output(s)."""

    def __init__(self, path):
        super().__init__()
        graph = onnx.load(path).graph
        # refuse the whole file up front, naming every op we cannot run
        problems = {}  # op type -> the first of its nodes we cannot run
        for node in graph.node:
            why = unsupported(node)
            if why:
                problems.setdefault(node.op_type, why)
        if problems:
            raise NotImplementedError(f"{path}: " + "; ".join(problems.values())
                                      + f". onnx_torch runs only: {', '.join(sorted(OPS))}, Constant")

        # initializers and Constant outputs become frozen tensors on the module. Float ones are Parameters
        # (requires_grad=False), so .to() moves them; integer ones (shapes) and Resize's roi and scales are
        # plain CPU tensors that .to() leaves alone: torch takes shapes as Python numbers, and reading one
        # from the GPU would wait for the GPU to finish its queue
        self.stored = {}  # ONNX value name -> attribute name on this module
        on_host = {n.input[i] for n in graph.node if n.op_type == "Resize" for i in (1, 2) if len(n.input) > i}
        tensors = [(t.name, torch.from_numpy(numpy_helper.to_array(t).copy())) for t in graph.initializer]
        tensors += [(n.output[0], torch.from_numpy(numpy_helper.to_array(n.attribute[0].t).copy()))
                    for n in graph.node if n.op_type == "Constant"]
        for onnx_name, t in tensors:
            attr = re.sub(r"\W", "_", onnx_name)  # "onnx::Conv_23" -> "onnx__Conv_23"
            while hasattr(self, attr) or attr in self.stored.values():
                attr += "_"
            if t.is_floating_point() and onnx_name not in on_host:
                self.register_parameter(attr, nn.Parameter(t, requires_grad=False))
            else:
                setattr(self, attr, t)
            self.stored[onnx_name] = attr

        # older files also list initializers among the graph inputs; the real inputs are the rest
        self.input_names = [v.name for v in graph.input if v.name not in self.stored]
        self.output_names = [v.name for v in graph.output]
        self.nodes = [(n.op_type, list(n.input), n.output[0], {a.name: helper.get_attribute_value(a) for a in n.attribute})
                      for n in graph.node if n.op_type != "Constant"]

    def forward(self, *inputs):
        assert len(inputs) == len(self.input_names), f"expected inputs {self.input_names}, got {len(inputs)}"
        dtype = next((p.dtype for p in self.parameters()), None)
        values = {name: getattr(self, attr) for name, attr in self.stored.items()}
        for name, x in zip(self.input_names, inputs):
            values[name] = x.to(dtype) if dtype is not None and x.is_floating_point() else x
        # ONNX lists nodes in topological order, so one pass evaluates the graph
        for op, ins, out, attrs in self.nodes:
            values[out] = OPS[op](attrs, *[values[n] if n else None for n in ins])  # "" = optional input left out
        outs = tuple(values[n] for n in self.output_names)
        return outs[0] if len(outs) == 1 else outs
