"""Each supported ONNX op: float import exact against onnxruntime, quantized reference
within quantization tolerance of onnxruntime's float result; and the errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgekit
from edgekit.errors import ModelFormatError, UnsupportedOpsError
from edgekit.graph.float_exec import run_graph
from edgekit.graph.onnx_import import import_onnx

from .conftest import RESNET8

RNG = np.random.default_rng(0)
C = 8


def _w(*shape, scale=0.3):
    return RNG.normal(0, scale, shape).astype(np.float32)


def build(tmp_path, nodes, inits, in_shape=(None, C, 12, 12), out_name="y", opset=14, name="m"):
    g = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape[1:]])],
        [helper.make_value_info(out_name, helper.make_tensor_type_proto(TensorProto.FLOAT, None))],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m)  # fills in the output's type
    p = tmp_path / f"{name}.onnx"
    onnx.save(m, str(p))
    return p


def conv(x, y, w, **kw):
    return helper.make_node("Conv", [x, w], [y], **kw)


CASES = {
    "conv3x3": ([conv("x", "y", "w", pads=[1, 1, 1, 1])], {"w": _w(16, C, 3, 3)}),
    "conv_stride2_asym_pads": ([conv("x", "y", "w", strides=[2, 2], pads=[0, 0, 1, 1])], {"w": _w(16, C, 3, 3)}),
    "conv_bias_relu": (
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        {"w": _w(16, C, 3, 3), "b": _w(16)},
    ),
    "depthwise_mult2": ([conv("x", "y", "w", group=C, pads=[1, 1, 1, 1])], {"w": _w(2 * C, 1, 3, 3)}),
    "grouped": ([conv("x", "y", "w", group=2, pads=[1, 1, 1, 1])], {"w": _w(12, C // 2, 3, 3)}),
    "dilated": ([conv("x", "y", "w", dilations=[2, 2], pads=[2, 2, 2, 2])], {"w": _w(8, C, 3, 3)}),
    "same_upper": ([conv("x", "y", "w", strides=[2, 2], auto_pad="SAME_UPPER")], {"w": _w(8, C, 3, 3)}),
    "conv_bn_relu6": (
        [
            conv("x", "c", "w", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"]),
            helper.make_node("Clip", ["bn", "lo", "hi"], ["y"]),
        ],
        {
            "w": _w(8, C, 3, 3),
            "g": RNG.uniform(0.5, 2, 8).astype(np.float32),
            "be": _w(8),
            "mu": _w(8),
            "var": RNG.uniform(0.5, 2, 8).astype(np.float32),
            "lo": np.array(0, np.float32),
            "hi": np.array(6, np.float32),
        },
    ),
    "batchnorm_alone": (
        [helper.make_node("BatchNormalization", ["x", "g", "be", "mu", "var"], ["y"])],
        {
            "g": RNG.uniform(0.5, 2, C).astype(np.float32),
            "be": _w(C),
            "mu": _w(C),
            "var": RNG.uniform(0.5, 2, C).astype(np.float32),
        },
    ),
    "add_residual": (
        [conv("x", "c", "w", pads=[1, 1, 1, 1]), helper.make_node("Add", ["x", "c"], ["y"])],
        {"w": _w(C, C, 3, 3)},
    ),
    "mul_const_per_channel": (
        [helper.make_node("Mul", ["x", "s"], ["y"])],
        {"s": RNG.uniform(-2, 2, (1, C, 1, 1)).astype(np.float32)},
    ),
    "sub_div_const": (
        [helper.make_node("Sub", ["x", "s"], ["t"]), helper.make_node("Div", ["t", "d"], ["y"])],
        {"s": np.array(0.25, np.float32), "d": np.array(2.0, np.float32)},
    ),
    "relu": ([helper.make_node("Relu", ["x"], ["y"])], {}),
    "clip": (
        [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
        {"lo": np.array(-0.5, np.float32), "hi": np.array(0.75, np.float32)},
    ),
    "maxpool": (
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
        {},
    ),
    "avgpool_exclude_pad": (
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
        {},
    ),
    "avgpool_include_pad": (
        [
            helper.make_node(
                "AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1
            )
        ],
        {},
    ),
    "avgpool_ceil": (
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
        {},
    ),
    "global_avgpool": ([helper.make_node("GlobalAveragePool", ["x"], ["y"])], {}),
    "concat": (
        [
            helper.make_node("Relu", ["x"], ["r"]),
            conv("x", "c", "w", pads=[1, 1, 1, 1]),
            helper.make_node("Concat", ["r", "c"], ["y"], axis=1),
        ],
        {"w": _w(4, C, 3, 3, scale=1.0)},
    ),
    "reshape_flatten_gemm": (
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1)],
        {"w": _w(10, C * 144, scale=0.05), "b": _w(10)},
    ),
    "reshape_matmul_add": (
        [
            helper.make_node("Reshape", ["x", "shape"], ["f"]),
            helper.make_node("MatMul", ["f", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["y"]),
        ],
        {"shape": np.array([-1, C * 144], np.int64), "w": _w(C * 144, 10, scale=0.05), "b": _w(10)},
    ),
    "transpose_to_nhwc": ([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], {}),
    "pad": ([helper.make_node("Pad", ["x", "pads"], ["y"])], {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}),
    "softmax_output": (
        [
            helper.make_node("GlobalAveragePool", ["x"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "w"], ["l"], transB=1),
            helper.make_node("Softmax", ["l"], ["y"], axis=1),
        ],
        {"w": _w(10, C, scale=1.0)},
    ),
    "sigmoid": ([helper.make_node("Sigmoid", ["x"], ["y"])], {}),
    "hardswish": ([helper.make_node("HardSwish", ["x"], ["y"])], {}),
}

# Quantization tolerance in output LSBs, with calibration covering the test inputs (so no
# clipping): the RMS error stays within one LSB; the worst case grows with the input rounding
# that a layer sums up (sum |w| * s_in / 2), largest for wide layers and for the global pool
# that keeps its input's coarse scale (TFLite's AVERAGE_POOL_2D constraint).
RMS_LSB = {"default": 1.0, "softmax_output": 1.6}
MAX_LSB = {
    "default": 3.0,
    "conv_bn_relu6": 8.0,
    "add_residual": 4.0,
    "reshape_flatten_gemm": 8.0,
    "reshape_matmul_add": 8.0,
    "softmax_output": 10.0,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_against_onnxruntime(tmp_path, case):
    nodes, inits = CASES[case]
    path = build(tmp_path, nodes, inits, name=case)
    x_cal = RNG.uniform(-2, 2, (256, C, 12, 12)).astype(np.float32)
    x = RNG.uniform(-2, 2, (32, C, 12, 12)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0]

    graph = import_onnx(path)
    got_float = run_graph(graph, {"x": x})[graph.outputs[0]]
    np.testing.assert_allclose(got_float, want, rtol=1e-4, atol=1e-4)

    qm = edgekit.quantize(path, np.concatenate([x_cal, x]), observer="minmax", progress=False)  # no clipping
    got = qm.run(x)["y"]
    out = qm.tensors["y"]
    err = got - want
    if "softmax" in qm.outputs[0].epilogue:  # compare the integer logits before the float softmax
        logits = qm.run(x, integer=True)["y"].astype(np.float32)
        real = (logits - out.zero_point) * out.scale
        ref = np.log(want) - np.log(want).mean(axis=1, keepdims=True)
        err = (real - real.mean(axis=1, keepdims=True)) - ref
    rms, worst = np.sqrt(np.mean(err**2)) / out.scale, np.abs(err).max() / out.scale
    assert rms <= RMS_LSB.get(case, RMS_LSB["default"]), f"{case}: RMS error {rms:.2f} LSB"
    assert worst <= MAX_LSB.get(case, MAX_LSB["default"]), f"{case}: worst error {worst:.2f} LSB"
    from edgekit.cli import integer_only

    assert integer_only(qm)


def test_resnet8_import_cancels_every_transpose(cifar_test):
    graph = import_onnx(RESNET8)
    ops = [n.op for n in graph.nodes]
    assert "transpose" not in ops
    assert ops.count("conv2d") == 9 and ops.count("add") == 3 and ops.count("dense") == 1
    x = cifar_test[0][:64].astype(np.float32)
    want = ort.InferenceSession(str(RESNET8), providers=["CPUExecutionProvider"]).run(None, {"input_1": x})[0]
    np.testing.assert_allclose(run_graph(graph, {"input_1": x})["Identity"], want, atol=1e-5)


def test_unsupported_ops_are_listed_in_one_error(tmp_path):
    nodes = [
        helper.make_node("Erf", ["x"], ["a"], name="erf_1"),
        helper.make_node("Tanh", ["a"], ["b"], name="tanh_1"),
        helper.make_node("Erf", ["b"], ["c"], name="erf_2"),
        helper.make_node("MatMul", ["c", "c"], ["y"], name="matmul_xx"),
    ]
    path = build(tmp_path, nodes, {}, in_shape=(None, 4, 4))
    with pytest.raises(UnsupportedOpsError) as err:
        import_onnx(path)
    msg = str(err.value)
    for text in ("Erf: 2 node(s)", "'erf_1'", "'erf_2'", "Tanh: 1 node(s)", "'tanh_1'", "MatMul", "'matmul_xx'"):
        assert text in msg
    assert len(err.value.unsupported) == 4


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all\n" * 10, bytes(range(256)) * 40])
def test_corrupt_files_fail_clearly(tmp_path, content):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(ModelFormatError, match="bad.onnx"):
        import_onnx(p)


def test_truncated_model_fails_clearly(tmp_path):
    p = tmp_path / "cut.onnx"
    p.write_bytes(RESNET8.read_bytes()[:5000])
    with pytest.raises(ModelFormatError, match="cut.onnx"):
        import_onnx(p)


def test_missing_file_and_cli_message_without_traceback(tmp_path):
    with pytest.raises(ModelFormatError, match="no such file"):
        import_onnx(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.zeros((2, 3), np.float32))
    r = subprocess.run(
        [sys.executable, "-m", "edgekit.cli", "export", str(bad), "--calib", str(calib), "-o", str(tmp_path / "o.ekq")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "edgekit: error:" in r.stderr and "not a valid ONNX model" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.ekq").exists()


def test_dynamic_spatial_input_is_refused(tmp_path):
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    p = tmp_path / "dyn.onnx"
    onnx.save(m, str(p))
    with pytest.raises(ModelFormatError, match="dynamic size on axis 2"):
        import_onnx(p)


def test_softmax_inside_the_graph_is_refused_by_name(tmp_path):
    nodes = [
        helper.make_node("Softmax", ["x"], ["s"], axis=1, name="inner_softmax"),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    path = build(tmp_path, nodes, {}, in_shape=(None, 6))
    with pytest.raises(UnsupportedOpsError, match="inner_softmax"):
        edgekit.quantize(path, RNG.normal(size=(16, 6)).astype(np.float32), progress=False)


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_opsets_11_to_21(tmp_path, opset):
    nodes = [
        conv("x", "c", "w", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["l"], transB=1),
        helper.make_node("Softmax", ["l"], ["y"], axis=1),
    ]
    inits = {"w": _w(6, C, 3, 3), "lo": np.array(0, np.float32), "hi": np.array(6, np.float32), "fc": _w(5, 6)}
    path = build(tmp_path, nodes, inits, opset=opset, name=f"opset{opset}")
    x = RNG.uniform(-2, 2, (16, C, 12, 12)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    graph = import_onnx(path)
    np.testing.assert_allclose(run_graph(graph, {"x": x})["y"], want, atol=1e-5)
    assert [n.op for n in graph.nodes].count("clip") == 0  # Clip(0, 6) fused into the conv


def test_constant_subgraphs_are_folded(tmp_path):
    """A reshape target computed by Concat/Mul of constants (as exporters emit) folds away."""
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([C * 36], np.int64))),
        helper.make_node("Concat", ["minus1", "k"], ["shape"], axis=0),
        helper.make_node("Mul", ["two", "three"], ["six"]),
        helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("Mul", ["f", "six"], ["y"]),
    ]
    inits = {"minus1": np.array([-1], np.int64), "two": np.array(2.0, np.float32), "three": np.array(3.0, np.float32)}
    path = build(tmp_path, nodes, inits, name="folding")
    graph = import_onnx(path)
    assert [n.op for n in graph.nodes] == ["transpose", "maxpool", "transpose", "reshape", "mul"]
    x = RNG.uniform(-2, 2, (4, C, 12, 12)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_graph(graph, {"x": x})["y"], want, atol=1e-5)
