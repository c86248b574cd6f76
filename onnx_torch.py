"""
Run an ONNX graph with torch ops, so gradients flow through it.

The identity loss backpropagates through ArcFace (InsightFace's
arcface_w600k_r50.onnx, an IResNet-50), and onnxruntime gives no gradients.
This small executor evaluates the same graph node by node with torch
functions. It knows only the ops an ArcFace export holds: a TorchScript export
at opset 11 (how InsightFace exports its PyTorch IResNets) has Conv (batch norms
after a conv folded in), BatchNormalization (those before a conv, and the
BatchNorm1d after the last linear layer), PRelu, Add, Identity, Flatten and
Gemm; a model converted from MXNet adds Sub and Mul (input normalisation),
Reshape and Constant. Any other op is refused at load time, by name.
"""

import math
import re

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import helper, numpy_helper


def conv(a, x, w, b=None):
    # 2-D with symmetric pads only (GraphModule refuses other Convs): ONNX pads are (top, left, bottom, right)
    pads = a.get("pads", [0, 0, 0, 0])
    return F.conv2d(x, w, b, a.get("strides", [1, 1]), pads[:2], a.get("dilations", [1, 1]), a.get("group", 1))


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
    if node.op_type == "Conv":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        auto_pad, pads = attrs.get("auto_pad", b"NOTSET"), attrs.get("pads", [0, 0, 0, 0])
        if auto_pad not in (b"", b"NOTSET"):
            return f"ONNX Conv (node {name}): auto_pad {auto_pad.decode()} is not supported, only explicit pads"
        if len(pads) != 4 or pads[:2] != pads[2:]:
            return f"ONNX Conv (node {name}): pads {pads} are not supported, only a 2-D Conv with symmetric pads"
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

        # initializers and Constant outputs become frozen tensors on the module, so .to() moves them;
        # float ones are Parameters (requires_grad=False), integer ones (shapes) buffers
        self.stored = {}  # ONNX value name -> attribute name on this module
        tensors = [(t.name, torch.from_numpy(numpy_helper.to_array(t).copy())) for t in graph.initializer]
        tensors += [(n.output[0], torch.from_numpy(numpy_helper.to_array(n.attribute[0].t).copy()))
                    for n in graph.node if n.op_type == "Constant"]
        for onnx_name, t in tensors:
            attr = re.sub(r"\W", "_", onnx_name)  # "onnx::Conv_23" -> "onnx__Conv_23"
            while hasattr(self, attr) or attr in self.stored.values():
                attr += "_"
            if t.is_floating_point():
                self.register_parameter(attr, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(attr, t)
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
