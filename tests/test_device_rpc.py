"""``rpc://``: a real TVM RPC server (and tracker) on 127.0.0.1 runs a ``tvm`` artifact compiled by
``edgekit compile`` for the host: deploy, profile with the server's time_evaluator, validate bit-exact."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("tvm")
pytest.importorskip("tornado")

from edgekit.device.errors import DeviceConnectionError, DeviceError  # noqa: E402
from edgekit.device.profile import profile  # noqa: E402
from edgekit.device.transports import open_session  # noqa: E402
from edgekit.device.validate import validate  # noqa: E402
from tests.device_helpers import free_port, start_module, stop_group, test_subset, wait_port  # noqa: E402


@pytest.fixture(scope="module")
def tvm_artifact(tmp_path_factory, resnet8_int8) -> Path:
    from edgekit.compile.build import compile_model

    return compile_model(resnet8_int8, "host", tmp_path_factory.mktemp("tvm") / "r8.host.tar").path


@pytest.fixture(scope="module")
def rpc_server():
    port = free_port()
    proc = start_module(
        ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]
    )
    try:
        wait_port(port)
        yield f"rpc://127.0.0.1:{port}"
    finally:
        stop_group(proc)


def test_rpc_profile_and_validate_bit_exact(rpc_server, tvm_artifact, tmp_path):
    data = test_subset(tmp_path / "v.npz", 12)
    with open_session(rpc_server, timeout=60) as s:
        assert s.probe()["runtimes"]["tvm"] is True
        rep = profile(s, tvm_artifact, runs=20, warmup=2)
        val = validate(s, tvm_artifact, data, batch=6)
    assert rep["runtime"] == "tvm" and len(rep["latencies_ms"]) == 20
    assert 0 < rep["min_ms"] <= rep["median_ms"] <= rep["p99_ms"] <= rep["max_ms"]
    assert rep["peak_memory_mib"] is None  # not observable through TVM RPC
    assert val["n"] == 12 and val["bit_exact_fraction"] == 1.0 and val["max_lsb_diff"] == 0


def test_rpc_through_a_tracker(tvm_artifact, tmp_path):
    tport, sport = free_port(), free_port()
    tracker = start_module(
        ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport), "--port-end", str(tport + 1)]
    )
    server = None
    try:
        wait_port(tport)
        server = start_module(
            [
                "tvm.exec.rpc_server",
                "--host",
                "127.0.0.1",
                "--port",
                str(sport),
                "--port-end",
                str(sport + 1),
                "--tracker",
                f"127.0.0.1:{tport}",
                "--key",
                "pi4",
            ]
        )
        wait_port(sport)
        deadline = time.monotonic() + 30
        while True:
            try:
                s = open_session(f"rpc://127.0.0.1:{tport}/pi4", timeout=30)
                break
            except DeviceError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        with s:
            out = validate(s, tvm_artifact, test_subset(tmp_path / "v.npz", 4), batch=4)
        assert out["bit_exact_fraction"] == 1.0
    finally:
        if server is not None:
            stop_group(server)
        stop_group(tracker)


def test_rpc_refuses_non_tvm_artifacts_and_unreachable_servers(rpc_server, tmp_path, resnet8_int8):
    from edgekit.device.artifacts import pack_reference_artifact
    from edgekit.device.deploy import deploy

    ref = pack_reference_artifact(resnet8_int8, tmp_path / "ref.tar")
    with open_session(rpc_server, timeout=30) as s, pytest.raises(DeviceError, match="only 'tvm' artifacts"):
        deploy(s, ref)
    with pytest.raises(DeviceConnectionError, match="cannot reach the TVM RPC server"):
        open_session(f"rpc://127.0.0.1:{free_port()}", timeout=5)
