"""The dyadic quantizer on the real ResNet-8 and CIFAR-10; file format; CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import edgekit
from edgekit.cli import inspect_model, integer_only
from edgekit.errors import CalibrationError, ModelFormatError, QuantizationError
from edgekit.qmodel import FORMAT_VERSION

from .conftest import DATA, RESNET8


def test_int8_top1_on_all_10000_test_images_within_0p3_points_of_float(resnet8_int8, cifar_test, float_logits):
    x, y = cifar_test
    logits = resnet8_int8.run(x)["Identity"]
    top1 = (logits.argmax(1) == y).mean()
    top1_float = (float_logits.argmax(1) == y).mean()
    assert abs(top1_float - 0.7548) < 1e-4  # the published float figure
    assert top1 >= top1_float - 0.003, f"int8 {top1:.4f} vs float {top1_float:.4f}"
    assert (logits.argmax(1) == float_logits.argmax(1)).mean() > 0.94


def test_int4_weights_stay_usable(resnet8_int4, resnet8_int8, cifar_test, float_logits):
    x, y = cifar_test[0][::5], cifar_test[1][::5]  # the set is sorted by class: stride
    top1 = (resnet8_int4.run(x)["Identity"].argmax(1) == y).mean()
    assert top1 > 0.68, f"int4 top-1 {top1:.4f}"
    assert resnet8_int4.weight_bytes() == pytest.approx(resnet8_int8.weight_bytes() / 2)
    for n in resnet8_int4.nodes:
        if "weight" in n.params:
            w = resnet8_int4.constants[n.params["weight"]]
            assert w.min() >= -8 and w.max() <= 7 and n.attrs["weight_bits"] == 4


def test_int4_bias_correction_helps(calib_x, cifar_test, float_logits):
    x = cifar_test[0][::10]  # the set is sorted by class: stride, do not slice
    ref = float_logits[::10]
    corrected = edgekit.quantize(RESNET8, calib_x, weight_bits=4, bias_correction=True, progress=False)
    plain = edgekit.quantize(RESNET8, calib_x, weight_bits=4, bias_correction=False, progress=False)

    def sqnr(qm):
        z = qm.run(x)["Identity"]
        return 10 * np.log10((ref**2).sum() / ((z - ref) ** 2).sum())

    assert sqnr(corrected) > sqnr(plain)


def test_model_is_integer_only_with_dyadic_rescales(resnet8_int8):
    qm = resnet8_int8
    assert integer_only(qm)
    assert [n.op for n in qm.nodes][0] == "quantize"
    assert qm.outputs[0].epilogue == ["dequantize", "softmax"]
    for n in qm.nodes:
        if "weight" in n.params:
            m = qm.constants[n.params["multiplier"]]
            s = qm.constants[n.params["shift"]]
            assert m.dtype == np.int32 and s.dtype == np.int32
            assert ((m >= 2**30) & (m < 2**31)).all()
            assert qm.constants[n.params["bias"]].dtype == np.int32
            assert 0 < n.attrs["acc_bound"] < 2**31


def test_input_of_raw_pixels_quantizes_exactly(resnet8_int8):
    info = resnet8_int8.tensors["input_1_int8"]
    assert info.scale == 1.0 and info.zero_point == -128  # 0..255 pixels map to int8 with no rounding


def test_accumulator_overflow_is_refused(tmp_path):
    k = 140_000  # 140k products of up to 128 * 127 (inputs in [-1, 1] get zero point ~0) exceed 2^31
    w = np.ones((k, 2), np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="huge_dense")],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(w, "w")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "big.onnx"))
    calib = np.random.default_rng(0).uniform(-1, 1, (4, k)).astype(np.float32)
    with pytest.raises(QuantizationError, match="huge_dense.*overflow"):
        edgekit.quantize(tmp_path / "big.onnx", calib, progress=False)


def test_save_load_round_trips_exactly(resnet8_int4, tmp_path, cifar_test):
    p = resnet8_int4.save(tmp_path / "m.ekq")
    back = edgekit.load(p)
    assert back.content_hash() == resnet8_int4.content_hash()
    assert set(back.constants) == set(resnet8_int4.constants)
    for k, v in resnet8_int4.constants.items():
        assert back.constants[k].dtype == v.dtype and np.array_equal(back.constants[k], v)
    x = cifar_test[0][:64]
    assert np.array_equal(back.run(x, integer=True)["Identity"], resnet8_int4.run(x, integer=True)["Identity"])
    with zipfile.ZipFile(p) as z:
        manifest = json.loads(z.read("model.json"))
        assert manifest["format"] == "edgekit.qmodel" and manifest["version"] == FORMAT_VERSION
        assert any(a.get("packed_int4") for a in manifest["arrays"])
        assert not any(n.endswith(".pkl") for n in z.namelist())
    assert p.read_bytes() == back.save(tmp_path / "again.ekq").read_bytes()  # deterministic bytes


def test_corrupt_ekq_files_fail_clearly(resnet8_int8, tmp_path):
    good = resnet8_int8.save(tmp_path / "good.ekq")
    bad = tmp_path / "bad.ekq"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ModelFormatError, match="bad.ekq"):
        edgekit.load(bad)
    other = tmp_path / "other.ekq"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("model.json", json.dumps({"format": "edgekit.qmodel", "version": 999}))
    with pytest.raises(ModelFormatError, match="version 999"):
        edgekit.load(other)


def test_calibration_sources_agree(calib_x, tmp_path):
    part = calib_x[:200]
    np.savez(tmp_path / "c.npz", x=part)
    a = edgekit.quantize(RESNET8, part, progress=False)
    b = edgekit.quantize(RESNET8, tmp_path / "c.npz", progress=False)
    c = edgekit.quantize(RESNET8, {"input_1": part}, progress=False)
    d = edgekit.quantize(RESNET8, (part[i : i + 64] for i in range(0, 200, 64)), progress=False)  # same batches
    assert a.content_hash() == b.content_hash() == c.content_hash() == d.content_hash()


def test_calibration_errors_are_clear(tmp_path):
    with pytest.raises(CalibrationError, match="no such data file"):
        edgekit.quantize(RESNET8, tmp_path / "missing.npz", progress=False)
    with pytest.raises(CalibrationError, match="shape"):
        edgekit.quantize(RESNET8, np.zeros((4, 3, 32, 32), np.float32), progress=False)
    with pytest.raises(CalibrationError, match="empty"):
        edgekit.quantize(RESNET8, np.zeros((0, 32, 32, 3), np.float32), progress=False)


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_other_observers(observer, calib_x, cifar_test):
    qm = edgekit.quantize(RESNET8, calib_x[:300], observer=observer, progress=False)
    x, y = cifar_test[0][::10], cifar_test[1][::10]
    assert (qm.run(x)["Identity"].argmax(1) == y).mean() > 0.72


def test_inspect_reports_layers_bits_dyadic_and_totals(resnet8_int4):
    info = inspect_model(resnet8_int4)
    assert info["integer_only"] is True
    convs = [layer for layer in info["layers"] if layer["op"] in ("conv2d", "dense")]
    assert len(convs) == 10
    assert all(layer["weight_bits"] == 4 and layer["dyadic"] for layer in convs)
    b, c = convs[0]["dyadic"][0]
    assert 2**30 <= b < 2**31 and 0 < c < 63
    assert info["weight_bytes"] == resnet8_int4.weight_bytes()
    assert info["bops"] == sum(layer["macs"] * 4 * 8 for layer in convs)


def _cli(*args, timeout=600):
    r = subprocess.run(
        [sys.executable, "-m", "edgekit.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_cli_export_eval_run_inspect(tmp_path, cifar_test):
    out = tmp_path / "r8.ekq"
    summary = json.loads(
        _cli(
            "export",
            RESNET8,
            "--calib",
            DATA / "cifar10_calib_train1000.npz",
            "--scheme",
            "dyadic",
            "--weight-bits",
            "8",
            "-o",
            out,
            "--json",
        )
    )
    assert out.exists() and summary["weight_bytes"] > 0
    x, y = cifar_test
    np.savez(tmp_path / "d.npz", x=x[::33][:300], y=y[::33][:300])
    ev = json.loads(_cli("eval", out, "--data", tmp_path / "d.npz", "--json"))
    assert ev["n"] == 300 and 0.6 < ev["top1"] <= 1.0 and ev["agreement_with_float"] > 0.9
    assert ev["integer_only"] is True
    evf = json.loads(_cli("eval", RESNET8, "--data", tmp_path / "d.npz", "--json"))
    assert evf["n"] == 300 and "top1" in evf
    _cli("run", out, "--data", tmp_path / "d.npz", "-o", tmp_path / "o.npz")
    with np.load(tmp_path / "o.npz") as z:
        assert z["Identity"].dtype == np.int8 and z["Identity"].shape == (300, 10)
        assert np.array_equal(z["Identity"], edgekit.load(out).run(x[::33][:300], integer=True)["Identity"])
    info = json.loads(_cli("inspect", out, "--json"))
    assert info["integer_only"] and info["weight_bytes"] > 0 and info["bops"] > 0
    assert "dyadic" in info["layers"][1]
    table = _cli("inspect", out)
    assert "conv2d" in table and "dense" in table


def test_cli_eval_of_the_tflite_export_matches_the_ekq(tmp_path, resnet8_int8, cifar_test):
    from edgekit.export.cli import export_model

    export_model(resnet8_int8, "tflite", tmp_path / "r8.tflite")
    resnet8_int8.save(tmp_path / "r8.ekq")
    x, y = cifar_test
    np.savez(tmp_path / "d.npz", x=x[::50], y=y[::50])
    ev_tfl = json.loads(_cli("eval", tmp_path / "r8.tflite", "--data", tmp_path / "d.npz", "--json"))
    ev_ekq = json.loads(_cli("eval", tmp_path / "r8.ekq", "--data", tmp_path / "d.npz", "--json"))
    assert ev_tfl["n"] == ev_ekq["n"] == 200
    assert ev_tfl["top1"] == ev_ekq["top1"]  # bit-exact export: identical predictions
