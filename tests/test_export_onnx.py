"""ONNX (QDQ) export: onnxruntime runs it with integer kernels, close to the reference."""

from __future__ import annotations

import pytest

from edgekit.errors import UnsupportedOpsError
from edgekit.export.onnx_qdq import compare, export_onnx, integer_kernels, run_onnxruntime, to_onnx
from edgekit.export.tflite import quantize_input
from edgekit.qmodel import QNode
from tests.export_helpers import every_op_model, random_input, reference_logits, tiny_resnet

FLOAT_COMPUTE = {"Conv", "FusedConv", "MatMul", "Gemm", "AveragePool", "Add", "Mul"}


def _gap(qm, n=32, activations="uint8"):
    x = random_input(qm, n)
    ref = qm.run(x, integer=True)[qm.outputs[0].name]
    data = to_onnx(qm, activations).SerializeToString()
    return compare(run_onnxruntime(data, quantize_input(qm, x)), ref), data


def test_tiny_resnet_integer_kernels_and_small_gap(tmp_path):
    qm = tiny_resnet(seed=1)
    res = export_onnx(qm, tmp_path / "m.onnx")
    assert res["ir_version"] <= 8
    kernels = res["integer_kernels"]
    assert kernels.get("QLinearConv") == 6 and "QLinearAdd" in kernels and "QLinearAveragePool" in kernels
    assert not FLOAT_COMPUTE & set(kernels), kernels
    gap, _ = _gap(qm, 64)
    assert gap["max_lsb"] <= 2 and gap["top1_agreement"] >= 0.95


def test_every_op_runs_in_onnxruntime():
    qm = every_op_model(with_depthwise=True)
    for act in ("uint8", "int8"):
        gap, _ = _gap(qm, 16, act)
        # float requantization differs by a few LSB before the (steep) tanh table, which can
        # turn one LSB into many: bound the share, not the largest gap
        assert gap["equal_share"] >= 0.9, gap


def test_unsupported_op_named():
    qm = tiny_resnet()
    qm.nodes.insert(3, QNode("gelu_int", "g1", [qm.nodes[2].outputs[0]], ["z"]))
    with pytest.raises(UnsupportedOpsError, match="ONNX export.*\\n.*gelu_int.*'g1'"):
        to_onnx(qm)


def test_resnet8_onnxruntime_gap(resnet8_int8, cifar_test):
    # Measured on all 10,000 test images: 24.5% of logits equal the reference, largest gap
    # 9 LSB, mean 1.31 LSB, top-1 agreement 96.84% (onnxruntime requantizes in float).
    qm = resnet8_int8
    x = cifar_test[0][:500]
    ref = reference_logits(qm, x)
    data = to_onnx(qm).SerializeToString()
    kernels = integer_kernels(data)
    assert kernels.get("QLinearConv") == 9 and not FLOAT_COMPUTE & set(kernels), kernels
    gap = compare(run_onnxruntime(data, quantize_input(qm, x)), ref)
    assert gap["max_lsb"] <= 16 and gap["top1_agreement"] >= 0.93 and gap["equal_share"] >= 0.1, gap


def test_nchw_born_model_exports_and_runs_in_onnxruntime(tmp_path):
    """A PyTorch-style NCHW model keeps an input transpose in the integer graph; conv and pooling
    after it must get NCHW tensors in the ONNX export (regression: they were fed NHWC)."""
    import edgekit
    from edgekit import zoo
    from edgekit.export.onnx_qdq import compare, export_onnx, run_onnxruntime
    from edgekit.export.tflite import quantize_input

    qm = edgekit.quantize(zoo.tiny_cnn(tmp_path / "tiny.onnx"), zoo.synthetic_images(128, seed=5), progress=False)
    assert qm.nodes[1].op == "transpose"
    export_onnx(qm, tmp_path / "tiny_qdq.onnx")
    x = zoo.synthetic_images(64)
    got = compare(
        run_onnxruntime(tmp_path / "tiny_qdq.onnx", quantize_input(qm, x)), qm.run(x, integer=True)[qm.outputs[0].name]
    )
    assert got["max_lsb"] <= 6 and got["equal_share"] > 0.3
