"""
onnx_torch.GraphModule against onnxruntime: small ArcFace-like graphs (TorchScript export at opset 11 as
InsightFace does, and an MXNet-style graph built by hand), a small SCRFD-shaped detector exported as det_10g
is, gradients to the input, shapes kept on the host, refused ops and attributes, and one tiny graph per
supported op.
Run: python -m pytest -q tests/test_onnx_torch.py
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

import onnx_torch
import standins


def rel_err(a, b):
    """max |a - b| / max |b|: the parity measure the tests report."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def onnxruntime_run(path, *xs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})


def save_graph(path, nodes, inputs, outputs, inits=(), opset=11, extra_inputs=()):
    """A model from onnx.helper pieces. inputs: {name: shape} float32 (None dims are dynamic);
    inits: {name: np.ndarray}; extra_inputs: initializer names also listed as graph inputs (old style)."""
    inits = dict(inits)
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()]
        + [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(inits[n].dtype), inits[n].shape)
           for n in extra_inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [onnx.numpy_helper.from_array(v, n) for n, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------------------------------------
# ArcFace-like stand-ins

class Block(nn.Module):
    """InsightFace IBasicBlock: BN -> conv -> BN -> PReLU -> strided conv -> BN, plus a 1x1 strided shortcut."""

    def __init__(self, cin, cout):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + self.downsample(x)


class TinyIResNet(nn.Module):
    """IResNet layout with 8-16 channels: 112x112 -> four strided blocks -> 7x7 -> Flatten -> Gemm -> 512."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.prelu = nn.PReLU(8)
        self.layers = nn.Sequential(Block(8, 8), Block(8, 16), Block(16, 16), Block(16, 16))
        self.bn2 = nn.BatchNorm2d(16)
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(16 * 7 * 7, 512)
        self.features = nn.BatchNorm1d(512)

    def forward(self, x):  # (B, 3, 112, 112)
        x = self.layers(self.prelu(self.bn1(self.conv1(x))))  # (B, 16, 7, 7)
        x = torch.flatten(self.dropout(self.bn2(x)), 1)
        return self.features(self.fc(x))  # (B, 512)


@pytest.fixture(scope="module")
def iresnet_onnx(tmp_path_factory):
    torch.manual_seed(0)
    net = TinyIResNet()
    with torch.no_grad():  # random running stats and affines, so a folded or misplaced norm would show
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(0.0, 0.5)
    net.eval()
    path = tmp_path_factory.mktemp("onnx") / "iresnet.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 112, 112),), str(path), dynamo=False, opset_version=11,
                      input_names=["input.1"], output_names=["embedding"],
                      dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def mxnet_onnx(tmp_path_factory):
    """MXNet-converted layout: (x - 127.5) * 0.0078125 on raw pixels, conv/BN/PReLU, Reshape(0, -1), Gemm."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = {
        "mean": np.float32(127.5).reshape(()), "scale": np.float32(0.0078125).reshape(()),
        "w1": f(8, 3, 4, 4) * 0.3, "b1": f(8),
        "bn_s": 1 + 0.2 * f(8), "bn_b": f(8) * 0.2, "bn_m": f(8) * 0.3, "bn_v": rng.uniform(0.5, 2, 8).astype(np.float32),
        "slope": rng.uniform(0, 0.5, (8, 1, 1)).astype(np.float32),
        "w2": f(16, 8, 4, 4) * 0.1,
        "fc_w": f(512, 16 * 7 * 7) * 0.05, "fc_b": f(512),
    }
    nodes = [
        helper.make_node("Sub", ["data", "mean"], ["sub"], name="minus"),
        helper.make_node("Mul", ["sub", "scale"], ["norm"], name="mul"),
        helper.make_node("Conv", ["norm", "w1", "b1"], ["c1"], kernel_shape=[4, 4], strides=[4, 4], name="conv0"),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], epsilon=2e-5, name="bn0"),
        helper.make_node("PRelu", ["bn", "slope"], ["act"], name="relu0"),
        helper.make_node("Conv", ["act", "w2"], ["c2"], kernel_shape=[4, 4], strides=[4, 4], name="conv1"),
        helper.make_node("Constant", [], ["shape"], value=onnx.numpy_helper.from_array(np.array([0, -1], np.int64))),
        helper.make_node("Reshape", ["c2", "shape"], ["flat"], name="reshape0"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc1"], transB=1, name="pre_fc1"),
    ]
    path = tmp_path_factory.mktemp("onnx") / "mxnet.onnx"
    # MXNet conversions list the weights among the graph inputs too
    return save_graph(path, nodes, {"data": ["N", 3, 112, 112]}, ["fc1"], inits, extra_inputs=["w1", "fc_w"])


def test_torchscript_export_holds_the_arcface_ops(iresnet_onnx):
    """The stand-in's export holds the ops of InsightFace's arcface_w600k_r50.onnx (TorchScript, opset 11)."""
    ops = {n.op_type for n in onnx.load(str(iresnet_onnx)).graph.node}
    assert {"Conv", "BatchNormalization", "PRelu", "Add", "Flatten", "Gemm"} <= ops <= set(onnx_torch.OPS), ops


@pytest.mark.parametrize("graph", ["iresnet_onnx", "mxnet_onnx"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_matches_onnxruntime(graph, batch, request):
    """GraphModule gives onnxruntime's (B, 512) embedding, at batch 1 and a dynamic batch of 3."""
    path = request.getfixturevalue(graph)
    torch.manual_seed(batch)
    x = torch.randn(batch, 3, 112, 112) * (127.5 if graph == "mxnet_onnx" else 1) + (127.5 if graph == "mxnet_onnx" else 0)
    with torch.no_grad():
        ours = onnx_torch.GraphModule(path)(x)
    (ref,) = onnxruntime_run(path, x)
    assert ours.shape == ref.shape == (batch, 512)
    err = rel_err(ours, ref)
    assert err < 1e-4, f"max abs diff / max abs = {err:.2e}"


def test_double_precision_follows_the_module(mxnet_onnx):
    """.double() moves float weights to float64 (integer shapes stay int64) and float32 inputs are cast."""
    m = onnx_torch.GraphModule(mxnet_onnx).double()
    assert m.shape.dtype == torch.int64
    x = torch.rand(2, 3, 112, 112) * 255
    out = m(x)
    assert out.dtype == torch.float64
    err = rel_err(out, onnxruntime_run(mxnet_onnx, x)[0])
    assert err < 1e-4, f"max abs diff / max abs = {err:.2e}"


def test_gradient_reaches_input_and_weights_are_frozen(iresnet_onnx):
    """The identity loss backpropagates into pixels: input.grad is finite and nonzero; no weight trains."""
    m = onnx_torch.GraphModule(iresnet_onnx)
    params = list(m.parameters())
    assert params and not any(p.requires_grad for p in params)
    x = torch.randn(2, 3, 112, 112, requires_grad=True)
    emb = torch.nn.functional.normalize(m(x), dim=-1)
    (1 - (emb[0] * emb[1]).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    assert all(p.grad is None for p in params)


# ---------------------------------------------------------------------------------------------------------
# SCRFD-shaped stand-in (tests/standins.py): the ops of InsightFace's det_10g export

SCRFD_OPS = {"Conv", "BatchNormalization", "Relu", "MaxPool", "AveragePool", "Add", "Resize", "Shape", "Gather",
             "Unsqueeze", "Concat", "Slice", "Cast", "Mul", "Transpose", "Reshape", "Sigmoid"}


@pytest.fixture(scope="module")
def scrfd_onnx(tmp_path_factory):
    # 200 x 136: odd feature maps (25 x 17 at stride 8), so ceil_mode pools overhang and the FPN's Resize
    # goes from 13 x 9 to 25 x 17, not a plain doubling
    noise = torch.randn(1, 3, 200, 136, generator=torch.Generator().manual_seed(0))
    black = torch.full((1, 3, 200, 136), -127.5 / 128)
    return standins.scrfd(str(tmp_path_factory.mktemp("onnx") / "scrfd.onnx"), noise, black)


def test_scrfd_export_holds_the_det_10g_ops(scrfd_onnx):
    """The stand-in's torch.onnx export holds the ops of SCRFD's (scrfd2onnx.py, opset 11) and GraphModule runs
    them all."""
    ops = {n.op_type for n in onnx.load(str(scrfd_onnx)).graph.node}
    assert SCRFD_OPS <= ops <= set(onnx_torch.OPS) | {"Constant", "Identity"}, \
        f"missing {SCRFD_OPS - ops}, not runnable {ops - set(onnx_torch.OPS) - {'Constant', 'Identity'}}"


def test_scrfd_matches_onnxruntime(scrfd_onnx):
    """All 9 outputs of the SCRFD-shaped graph equal onnxruntime's, for a batch of 2 at a size it was not traced at."""
    x = torch.randn(2, 3, 200, 136, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = onnx_torch.GraphModule(scrfd_onnx)(x)
    refs = onnxruntime_run(scrfd_onnx, x)
    assert len(ours) == len(refs) == 9
    for o, r in zip(ours, refs):
        assert tuple(o.shape) == r.shape, f"shape {tuple(o.shape)} vs onnxruntime {r.shape}"
        # relative to at least 1: scores are probabilities, and onnxruntime's Sigmoid is good to about 2e-7
        err = (o - torch.from_numpy(r)).abs().max().item() / max(np.abs(r).max(), 1.0)
        assert err < 1e-5, f"output of shape {r.shape}: max abs diff / max(1, max abs) = {err:.2e}"


def test_shapes_stay_on_the_host(scrfd_onnx):
    """Moved to another device (meta: no data), the weights follow but shapes and Resize's roi/scales stay on the
    CPU, and the graph runs there: nothing of the device's data is read back to size a tensor."""
    m = onnx_torch.GraphModule(scrfd_onnx).to("meta")
    stored = {name: getattr(m, attr) for name, attr in m.stored.items()}
    on_cpu = {name for name, t in stored.items() if t.device.type == "cpu"}
    resize_inputs = {n.input[i] for n in onnx.load(str(scrfd_onnx)).graph.node if n.op_type == "Resize" for i in (1, 2)}
    assert all(p.device.type == "meta" for p in m.parameters())
    assert on_cpu == {name for name, t in stored.items() if not t.is_floating_point()} | resize_inputs, on_cpu
    outs = m(torch.empty(2, 3, 200, 136, device="meta"))
    n8 = 25 * 17 * 2  # stride 8, 2 anchors per location
    assert [tuple(o.shape) for o in outs[::3]] == [(2 * n8, 1), (2 * n8, 4), (2 * n8, 10)]
    assert all(o.device.type == "meta" for o in outs)


def test_unsupported_ops_are_named(tmp_path):
    """A graph with Tanh and MatMul (ops neither ArcFace nor SCRFD exports hold) is refused at load, and the error
    names both ops and their first nodes."""
    nodes = [helper.make_node("Tanh", ["x"], ["s"], name="tanh0"),
             helper.make_node("MatMul", ["s", "s"], ["y"], name="matmul0"),
             helper.make_node("Tanh", ["y"], ["z"], name="tanh1")]
    path = save_graph(tmp_path / "bad.onnx", nodes, {"x": [2, 2]}, ["z"])
    with pytest.raises(NotImplementedError) as e:
        onnx_torch.GraphModule(path)
    msg = str(e.value)
    assert "ONNX op Tanh (node tanh0)" in msg and "ONNX op MatMul (node matmul0)" in msg and "tanh1" not in msg, msg


W = np.ones((1, 1, 3, 3), np.float32)


@pytest.mark.parametrize("nodes,inputs,inits,error", [
    ([helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", name="c")], {"x": [1, 1, 5, 5]}, {"w": W},
     "auto_pad SAME_UPPER is not supported"),
    ([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 2, 1], name="c")], {"x": [1, 1, 5, 5]}, {"w": W},
     r"pads \[1, 0, 2, 1\] are not supported"),
    ([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1], name="c")], {"x": [1, 1, 5]}, {"w": W[0]},
     r"pads \[1, 1\] are not supported, only a 2-D Conv"),
    ([helper.make_node("Constant", [], ["k"], value_float=3.0, name="k"), helper.make_node("Mul", ["x", "k"], ["y"])],
     {"x": [2]}, {}, "Constant \\(node k\\) with value_float is not supported"),
    ([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], name="p")], {"x": [1, 1, 5, 5]},
     {}, r"MaxPool \(node p\): pads \[0, 0, 1, 1\] are not supported"),
    ([helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2], name="p")], {"x": [1, 1, 4, 4]}, {},
     "the Indices output is not supported"),
    ([helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode="linear", name="r")], {"x": [1, 1, 4, 4]},
     {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)},
     r"Resize \(node r\): mode, coordinate_transformation_mode, nearest_mode \('linear', 'half_pixel'"),
    ([helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="u")], {"x": [2]}, {"axes": np.array([0], np.int64)},
     r"Unsqueeze \(node u\): axes as an input \(opset 13\+\) is not supported"),
    ([helper.make_node("Slice", ["x"], ["y"], starts=[0], ends=[1], name="s")], {"x": [2]}, {},
     r"Slice \(node s\): starts/ends as attributes \(opset 1-9\) are not supported"),
], ids=["auto_pad", "asymmetric_pads", "conv1d", "constant_value_float", "pool_asymmetric_pads", "maxpool_indices",
        "resize_linear", "unsqueeze_axes_input", "slice_attributes"])
def test_unsupported_attributes_are_named(tmp_path, nodes, inputs, inits, error):
    """What neither an ArcFace nor an SCRFD export holds is refused at load rather than run by guesswork."""
    path = save_graph(tmp_path / "bad.onnx", nodes, inputs, ["y"], inits, opset=13)  # value_float: opset 12+
    with pytest.raises(NotImplementedError, match=error):
        onnx_torch.GraphModule(path)


# ---------------------------------------------------------------------------------------------------------
# one tiny graph per supported op: (name, nodes, {input: shape}, outputs, initializers)

R = np.random.default_rng(1)


def rnd(*s):
    return R.standard_normal(s).astype(np.float32)


def node(op, ins, outs=("y",), **attrs):
    return helper.make_node(op, list(ins), list(outs), **attrs)


CASES = [
    ("conv_groups_strides_pads_dilations", [node("Conv", ["x", "w", "b"], group=2, strides=[2, 1],
                                                 pads=[1, 2, 1, 2], dilations=[1, 2])],
     {"x": [2, 4, 9, 10]}, ["y"], {"w": rnd(6, 2, 3, 3), "b": rnd(6)}),
    ("conv_symmetric_pads_no_bias", [node("Conv", ["x", "w"], pads=[1, 1, 1, 1])],
     {"x": [1, 3, 6, 6]}, ["y"], {"w": rnd(5, 3, 3, 3)}),
    ("conv_no_pads_kernel_shape", [node("Conv", ["x", "w", "b"], kernel_shape=[4, 4], strides=[4, 4])],
     {"x": [1, 3, 8, 12]}, ["y"], {"w": rnd(2, 3, 4, 4), "b": rnd(2)}),
    ("batchnorm_epsilon", [node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)],
     {"x": [2, 3, 4, 4]}, ["y"], {"s": rnd(3), "b": rnd(3), "m": rnd(3), "v": R.uniform(0.1, 2, 3).astype(np.float32)}),
    ("batchnorm_2d_input", [node("BatchNormalization", ["x", "s", "b", "m", "v"])],
     {"x": [3, 5]}, ["y"], {"s": rnd(5), "b": rnd(5), "m": rnd(5), "v": R.uniform(0.1, 2, 5).astype(np.float32)}),
    ("prelu_slope_c11", [node("PRelu", ["x", "a"])], {"x": [2, 3, 4, 5]}, ["y"], {"a": rnd(3, 1, 1)}),
    ("prelu_slope_scalar", [node("PRelu", ["x", "a"])], {"x": [2, 3, 4, 5]}, ["y"], {"a": rnd(1)}),
    ("prelu_slope_c_on_2d", [node("PRelu", ["x", "a"])], {"x": [4, 6]}, ["y"], {"a": rnd(6)}),
    ("prelu_slope_last_dim_numpy_broadcast", [node("PRelu", ["x", "a"])], {"x": [2, 3, 4, 5]}, ["y"], {"a": rnd(5)}),
    ("gemm_transB_alpha_beta_bias_1d", [node("Gemm", ["x", "w", "c"], transB=1, alpha=0.5, beta=2.0)],
     {"x": [3, 4]}, ["y"], {"w": rnd(5, 4), "c": rnd(5)}),
    ("gemm_transA_bias_2d", [node("Gemm", ["x", "w", "c"], transA=1)], {"x": [4, 3]}, ["y"], {"w": rnd(4, 5), "c": rnd(3, 5)}),
    ("gemm_no_bias", [node("Gemm", ["x", "w"])], {"x": [3, 4]}, ["y"], {"w": rnd(4, 2)}),
    ("reshape_zero_and_minus_one", [node("Reshape", ["x", "s"])], {"x": [2, 3, 4, 5]}, ["y"],
     {"s": np.array([0, -1, 5], np.int64)}),
    ("reshape_from_constant", [node("Constant", [], ["s"], value=onnx.numpy_helper.from_array(np.array([-1, 6], np.int64))),
                               node("Reshape", ["x", "s"])], {"x": [2, 3, 4]}, ["y"], {}),
    ("flatten_axis_0", [node("Flatten", ["x"], axis=0)], {"x": [2, 3, 4]}, ["y"], {}),
    ("flatten_default_axis", [node("Flatten", ["x"])], {"x": [2, 3, 4, 5]}, ["y"], {}),
    ("flatten_axis_neg1", [node("Flatten", ["x"], axis=-1)], {"x": [2, 3, 4]}, ["y"], {}),
    ("add_sub_mul_identity_broadcast", [node("Add", ["x", "a"], ["t1"]), node("Sub", ["t1", "b"], ["t2"]),
                                        node("Mul", ["t2", "a"], ["t3"]), node("Identity", ["t3"])],
     {"x": [2, 3, 4]}, ["y"], {"a": rnd(4), "b": rnd(3, 1)}),
    ("constant_scalar_and_two_outputs", [node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.float32(3))),
                                         node("Mul", ["x", "k"], ["y1"]), node("Sub", ["k", "x"], ["y2"])],
     {"x": [2, 3]}, ["y1", "y2"], {}),
    # SCRFD's ops
    ("relu_sigmoid", [node("Relu", ["x"], ["r"]), node("Sigmoid", ["x"], ["s"])], {"x": [2, 3, 4]}, ["r", "s"], {}),
    ("maxpool_stem_pads", [node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
     {"x": [2, 3, 9, 8]}, ["y"], {}),
    ("maxpool_ceil_mode", [node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
     {"x": [1, 2, 7, 5]}, ["y"], {}),
    ("averagepool_ceil_mode_exclude_pad", [node("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                                                count_include_pad=0)], {"x": [1, 2, 7, 5]}, ["y"], {}),
    ("averagepool_pads_default_excludes", [node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                                pads=[1, 1, 1, 1])], {"x": [1, 2, 7, 6]}, ["y"], {}),
    ("averagepool_pads_include_pad", [node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                           count_include_pad=1)], {"x": [1, 2, 7, 6]}, ["y"], {}),
    # mmdet's FPN: F.interpolate(x, size=y.shape[2:], mode="nearest") as torch.onnx exports it at opset 11
    ("resize_sizes_from_shapes", [node("Shape", ["z"], ["sy"]), node("Gather", ["sy", "two"], ["h"], axis=0),
                                  node("Gather", ["sy", "three"], ["w"], axis=0),
                                  node("Unsqueeze", ["h"], ["h1"], axes=[0]),
                                  node("Unsqueeze", ["w"], ["w1"], axes=[0]),
                                  node("Concat", ["h1", "w1"], ["hw"], axis=0), node("Cast", ["hw"], ["hw64"], to=7),
                                  node("Shape", ["x"], ["sx"]), node("Slice", ["sx", "zero", "two1", "zero"], ["nc"]),
                                  node("Concat", ["nc", "hw64"], ["sizes"], axis=0),
                                  node("Resize", ["x", "roi", "scales", "sizes"], ["up"], mode="nearest",
                                       coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                                  node("Add", ["up", "z"])],
     {"x": [2, 3, 4, 3], "z": [2, 3, 7, 5]}, ["y"],
     {"two": np.array(2, np.int64), "three": np.array(3, np.int64), "zero": np.array([0], np.int64),
      "two1": np.array([2], np.int64), "roi": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32)}),
    ("resize_scales", [node("Resize", ["x", "roi", "scales"], mode="nearest",
                            coordinate_transformation_mode="asymmetric", nearest_mode="floor")], {"x": [1, 2, 5, 4]}, ["y"],
     {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 1.5, 2], np.float32)}),
    ("transpose_perm_and_default", [node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                                    node("Transpose", ["x"], ["d"])],
     {"x": [2, 3, 4, 5]}, ["t", "d"], {}),
    ("concat_negative_axis", [node("Concat", ["x", "z"], axis=-1)], {"x": [2, 3], "z": [2, 4]}, ["y"], {}),
    # the head's reshape to rows, from a shape gathered with 1-D and scalar indices
    ("shape_gather_unsqueeze_concat_reshape", [node("Shape", ["x"], ["s"]), node("Gather", ["s", "first"], ["n"]),
                                               node("Unsqueeze", ["n"], ["n1"], axes=[-1]),
                                               node("Gather", ["s", "second"], ["c"]),
                                               node("Concat", ["n1", "c", "minus1"], ["shape"], axis=0),
                                               node("Reshape", ["x", "shape"])],
     {"x": [2, 3, 4, 5]}, ["y"],
     {"first": np.array(0, np.int64), "second": np.array([-3], np.int64), "minus1": np.array([-1], np.int64)}),
    ("slice_axes_steps_negative", [node("Slice", ["x", "st", "en", "ax", "sp"])], {"x": [4, 7, 6]}, ["y"],
     {"st": np.array([-1, 1, 5], np.int64), "en": np.array([-2 ** 63, 100, 0], np.int64),
      "ax": np.array([1, 0, -1], np.int64), "sp": np.array([-2, 1, -2], np.int64)}),
    ("slice_default_axes_steps", [node("Slice", ["x", "st", "en"])], {"x": [4, 7]}, ["y"],
     {"st": np.array([1, -3], np.int64), "en": np.array([3, 2 ** 63 - 1], np.int64)}),
    ("cast_to_float", [node("Shape", ["x"], ["s"]), node("Cast", ["s"], ["f"], to=1), node("Mul", ["x", "f"])],
     {"x": [2, 3, 3]}, ["y"], {}),
]


def test_every_supported_op_has_a_case():
    """Each op GraphModule runs (and Constant) is checked against onnxruntime by a case below."""
    tested = {n.op_type for case in CASES for n in case[1]}
    assert tested == set(onnx_torch.OPS) | {"Constant"}, f"untested: {set(onnx_torch.OPS) - tested}"


@pytest.mark.parametrize("name,nodes,inputs,outputs,inits", CASES, ids=[c[0] for c in CASES])
def test_op_matches_onnxruntime(tmp_path, name, nodes, inputs, outputs, inits):
    """Each supported op, with its attributes, gives onnxruntime's output."""
    path = save_graph(tmp_path / f"{name}.onnx", nodes, inputs, outputs, inits)
    xs = [torch.randn(*s) for s in inputs.values()]
    ours = onnx_torch.GraphModule(path)(*xs)
    ours = ours if isinstance(ours, tuple) else (ours,)
    refs = onnxruntime_run(path, *xs)
    assert len(ours) == len(refs)
    for o, r in zip(ours, refs):
        assert tuple(o.shape) == r.shape, f"shape {tuple(o.shape)} vs onnxruntime {r.shape}"
        err = rel_err(o, r)
        assert err < 1e-5, f"max abs diff / max abs = {err:.2e}"
