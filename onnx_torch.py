"""
Run an ONNX graph with torch ops, so gradients flow through it.

The identity loss backpropagates through ArcFace (InsightFace's
arcface_w600k_r50.onnx, an IResNet-50), and onnxruntime gives no gradients.
This small executor evaluates the same graph node by node with torch
functions. It knows only the ops an ArcFace export holds (DESIGN.md section
4): a TorchScript export at opset 11 has Conv (batch norms after a conv folded
in), BatchNormalization (those before a conv), PRelu, Add, Identity, Flatten
and Gemm; an MXNet conversion adds Sub/Mul for normalisation and Reshape. A
few cheap extras sit beside them. Any other op is refused at load time.
"""

import math
import re

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import helper, numpy_helper


def conv(a, x, w, b=None):
    # ONNX pads are (x1_begin, x2_begin, ..., x1_end, x2_end, ...), for the spatial dims only
    k = w.dim() - 2
    pads = a.get("pads", [0] * 2 * k)
    begin, end = pads[:k], pads[k:]
    if begin != end:  # asymmetric: pad first (F.pad lists the last dim first), then convolve unpadded
        x = F.pad(x, [p for i in reversed(range(k)) for p in (begin[i], end[i])])
        begin = [0] * k
    fn = (F.conv1d, F.conv2d, F.conv3d)[k - 1]
    return fn(x, w, b, a.get("strides", [1] * k), begin, a.get("dilations", [1] * k), a.get("group", 1))


def gemm(a, A, B, C=None):
    # Y = alpha * A' B' + beta * C, A' and B' optionally transposed
    A = A.t() if a.get("transA", 0) else A
    B = B.t() if a.get("transB", 0) else B
    y = a.get("alpha", 1.0) * (A @ B)
    return y if C is None else y + a.get("beta", 1.0) * C


def reshape(a, x, shape):
    # 0 copies the input's dim at that position (unless allowzero), -1 is inferred
    shape = shape.tolist()
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def div(a, x, y):
    # integer Div truncates in ONNX; torch's / would give floats
    if x.is_floating_point():
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


# op name -> fn(attributes, *inputs) -> output. Missing optional inputs arrive as None.
OPS = {
    # what an ArcFace export holds (TorchScript opset 11, or converted from MXNet)
    "Conv": conv,
    "BatchNormalization": lambda a, x, scale, b, mean, var: F.batch_norm(
        x, mean, var, scale, b, training=False, eps=a.get("epsilon", 1e-5)),
    # slope broadcasts numpy-style against x, as onnxruntime does: exports store it as (C, 1, 1)
    "PRelu": lambda a, x, slope: torch.where(x >= 0, x, x * slope),
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Identity": lambda a, x: x,
    "Flatten": lambda a, x: x.reshape(math.prod(x.shape[:a.get("axis", 1)]), -1),
    "Gemm": gemm,
    "Reshape": reshape,
    # cheap extras
    "Relu": lambda a, x: F.relu(x),
    "Sigmoid": lambda a, x: torch.sigmoid(x),
    "Div": div,
    "MatMul": lambda a, x, y: x @ y,
    "Transpose": lambda a, x: x.permute(a.get("perm", list(reversed(range(x.dim()))))),
    "Concat": lambda a, *xs: torch.cat(xs, dim=a["axis"]),
    "GlobalAveragePool": lambda a, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "Dropout": lambda a, x, *rest: x,  # inference: identity (the optional mask output is not produced)
    # Constant is folded into a stored tensor at load time and never runs
}


def constant_value(node):
    """The tensor a Constant node holds: a `value` tensor, or (opset 12+) value_float(s)/value_int(s)."""
    attr = node.attribute[0]
    v = helper.get_attribute_value(attr)
    if attr.type == onnx.AttributeProto.TENSOR:
        return torch.from_numpy(numpy_helper.to_array(v).copy())
    if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
        return torch.tensor(v)  # float32 or int64, as ONNX says
    raise NotImplementedError(f"Constant node {node.name}: attribute {attr.name} is not supported")


class GraphModule(nn.Module):
    """An ONNX file as a frozen nn.Module: forward(*inputs) returns the graph's output(s)."""

    def __init__(self, path):
        super().__init__()
        graph = onnx.load(path).graph
        # refuse the whole file up front, naming every op we cannot run
        problems = {}
        for i, node in enumerate(graph.node):
            name = node.name or f"#{i}"
            if node.op_type not in OPS and node.op_type != "Constant":
                problems.setdefault(node.op_type, f"ONNX op {node.op_type} (node {name}) is not supported")
            for a in node.attribute:
                if a.name == "auto_pad" and a.s not in (b"", b"NOTSET"):
                    problems.setdefault("auto_pad", f"ONNX op {node.op_type} (node {name}): "
                                        f"auto_pad {a.s.decode()} is not supported, only explicit pads")
        if problems:
            raise NotImplementedError(f"{path}: " + "; ".join(problems.values())
                                      + f". onnx_torch runs only: {', '.join(sorted(OPS))}, Constant")

        # initializers and Constant outputs become frozen tensors on the module, so .to() moves them;
        # float ones are Parameters (requires_grad=False), integer ones (shapes) buffers
        self.stored = {}  # ONNX value name -> attribute name on this module
        tensors = [(t.name, torch.from_numpy(numpy_helper.to_array(t).copy())) for t in graph.initializer]
        tensors += [(n.output[0], constant_value(n)) for n in graph.node if n.op_type == "Constant"]
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
