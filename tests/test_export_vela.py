"""Vela export: estimate parsed, NPU/CPU placement by name, full fallback said clearly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgekit.export.vela import VelaError, compile_for_ethos_u, export_vela
from tests.export_helpers import Builder, tiny_resnet

pytestmark = pytest.mark.skipif(shutil.which("vela") is None, reason="ethos-u-vela is not installed")


def test_tiny_resnet_runs_on_npu(tmp_path):
    res = export_vela(tiny_resnet(), tmp_path / "tiny_vela.tflite", target="ethos-u55-128")
    v = res["vela"]
    assert (tmp_path / "tiny_vela.tflite").exists() and res["path"] == str(tmp_path / "tiny_vela.tflite")
    assert v["cycles_total"] > 0 and v["inference_time_s"] > 0 and v["core_clock_hz"] == 500e6
    assert v["sram_used_bytes"] > 0 and v["macs"] > 0
    assert v["cpu_ops"] == [] and not v["all_on_cpu"]
    assert any(o["op_type"] == "Conv2D" for o in v["npu_ops"])
    assert "every operator runs on the NPU" in v["verdict"]


@pytest.mark.parametrize("target", ["ethos-u65-256", "ethos-u85-256"])
def test_other_targets(tmp_path, target):
    res = export_vela(tiny_resnet(), tmp_path / "m.tflite", target=target)
    assert res["vela"]["cycles_total"] > 0 and res["vela"]["target"] == target


def test_partial_and_full_cpu_fallback(tmp_path):
    from edgekit.export.tflite import to_tflite_bytes

    b = Builder((None, 8, 8, 4), seed=5)
    y = b.conv(b.lut(b.conv(b.x, 8)), 8)
    est = compile_for_ethos_u(to_tflite_bytes(b.build(y), batch=1)[0], "ethos-u55-128", out_dir=tmp_path / "a")
    cpu = {o.op_type: o for o in est.cpu_ops}
    assert "GATHER" in cpu and cpu["GATHER"].name.startswith("lut_") and "Unsupported" in cpu["GATHER"].reason
    assert est.npu_ops and not est.all_on_cpu

    # a graph of one CAST (int8 -> int32): nothing for the NPU
    from edgekit.export.tflite import CAST, _Graph, _Op, _serialize

    g = _Graph()
    i = g.add("x", [1, 8, 8, 4], np.int8, scale=0.5, zero_point=0)
    o = g.add("y", [1, 8, 8, 4], np.int32)
    g.ops.append(_Op(CAST, 1, [i], [o]))
    data = _serialize(g, [i], [o], {}, "cast only")
    est = compile_for_ethos_u(data, "ethos-u55-128", out_dir=tmp_path / "b")
    assert est.all_on_cpu and est.verdict().startswith("NOTHING runs on the ethos-u55-128 NPU")


def test_bad_target():
    with pytest.raises(VelaError, match="ethos-u55-128"):
        compile_for_ethos_u(b"", "ethos-u99")


def test_resnet8_fully_on_ethos_u55(resnet8_int8, tmp_path):
    # Measured: 200,810 cycles = 0.402 ms at 500 MHz, SRAM 50.6 KiB, flash 76.3 KiB (the
    # official MLPerf int8 model: 201,747 cycles); every operator on the NPU.
    v = export_vela(resnet8_int8, tmp_path / "r8_vela.tflite", target="ethos-u55-128")["vela"]
    assert v["cpu_ops"] == [] and not v["all_on_cpu"]
    assert {o["op_type"] for o in v["npu_ops"]} >= {"Conv2D", "Add", "AvgPool", "FullyConnected"}
    assert 150_000 < v["cycles_total"] < 260_000 and v["core_clock_hz"] == 500e6
    assert 40 * 1024 < v["sram_used_bytes"] < 80 * 1024 and v["off_chip_flash_used_bytes"] > 70_000
