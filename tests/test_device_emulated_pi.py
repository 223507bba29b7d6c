"""The whole device flow against the emulated Raspberry Pi (tools/emulated-pi: aarch64 Debian under
qemu-user with QEMU_CPU=cortex-a72): real sshd + paramiko, a real pty serial line with the agent on
the device end, the real ``adb`` client against the rootfs's adbd. Nothing is mocked; timings under
emulation are only checked for sanity. Needs root and tools/setup.d/50-device.sh (CI has both)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit.device.artifacts import pack_reference_artifact, pack_runtime_artifact
from edgekit.device.deploy import deploy
from edgekit.device.errors import DeviceConnectionError, DeviceTimeout
from edgekit.device.profile import profile
from edgekit.device.transports import open_session
from edgekit.device.validate import validate
from tests.device_helpers import DATA, LITERT_INT8, RESNET8_ONNX, NoisyChannel, test_subset

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "emulated-pi"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        sys.platform != "linux" or os.geteuid() != 0 or shutil.which("qemu-aarch64-static") is None,
        reason="the emulated Pi needs Linux, root and qemu-user-static (run tools/setup.d/50-device.sh as root)",
    ),
]


@pytest.fixture(scope="session")
def pi():
    """Bring the emulated Pi up once for the session (rootfs cached under ~/.cache/edgekit)."""
    adb_server_was_running = _listening(5037)
    res = subprocess.run([str(TOOL), "up"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"emulated-pi up failed:\n{res.stderr[-3000:]}"
    urls = json.loads(res.stdout.strip().splitlines()[-1])
    yield urls
    rootfs = os.path.realpath(urls["rootfs"])
    down = subprocess.run([str(TOOL), "down"], capture_output=True, text=True, timeout=300)
    sys.stderr.write(down.stderr)
    assert down.returncode == 0, down.stderr
    with open("/proc/mounts") as f:
        assert not [line for line in f if rootfs in line], "mounts left behind by emulated-pi down"
    assert not os.path.exists(rootfs)
    if not adb_server_was_running and shutil.which("adb"):  # end the adb server the tests started
        subprocess.run(["adb", "kill-server"], capture_output=True, timeout=30, check=False)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def r8(tmp_path_factory, resnet8_int8) -> Path:
    return pack_reference_artifact(resnet8_int8, tmp_path_factory.mktemp("pi") / "resnet8.tar")


@pytest.fixture(scope="module")
def val16(tmp_path_factory) -> Path:
    return test_subset(tmp_path_factory.mktemp("pidata") / "val16.npz", 16)


def test_probe_sees_an_aarch64_pi_with_runtimes(pi):
    with open_session(pi["ssh"], timeout=60) as s:
        p = s.probe()
    assert p["arch"] == "aarch64"
    assert p["cpu"].get("CPU part") == "0xd08"  # Cortex-A72, as on a Pi 4
    assert p["runtimes"]["numpy"] and p["runtimes"]["litert"] and p["runtimes"]["onnxruntime"]
    assert p["agent_version"] and p["mem_available_kib"] > 0


def test_ssh_deploy_profile_validate_bit_exact(pi, r8, val16, capsys):
    from edgekit.device.cli import main

    assert main(["deploy", str(r8), "--device", pi["ssh"], "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["deploy", str(r8), "--device", pi["ssh"], "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["sha256"] == first["sha256"] and again["uploaded"] is False  # device-side cache

    assert main(["profile", str(r8), "--device", pi["ssh"], "--runs", "5", "--warmup", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert 0 < rep["min_ms"] <= rep["median_ms"] <= rep["p90_ms"] <= rep["p99_ms"] <= rep["max_ms"]
    assert rep["peak_memory_mib"] > 1 and len(rep["layers"]) == 16

    assert main(["validate", str(r8), "--device", pi["ssh"], "--data", str(val16), "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["n"] == 16 and v["bit_exact_fraction"] == 1.0 and v["max_lsb_diff"] == 0
    assert v["top1_agreement_float"] >= 0.6 and "top1" in v


def test_tvm_rpi4_flow_export_compile_deploy_profile_validate_over_ssh(pi, tmp_path, capsys):
    """The issue's CI flow with the CLI: export ResNet-8, compile for rpi4, deploy over SSH, profile,
    validate bit-exact on a strided (every class) CIFAR-10 subset. The device has the TVM runtime
    (ek_runner + libtvm_runtime.so under /opt/edgekit-tvm), not the tvm Python package."""
    from edgekit.cli import main

    rootfs = Path(pi["rootfs"])
    assert pi.get("tvm_runtime"), "emulated-pi up installed no TVM runtime (see its log: cross compiler? 40-tvm.sh?)"
    assert not list(rootfs.glob("opt/site/tvm")) and not list(rootfs.glob("usr/lib/python3*/**/tvm/__init__.py"))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.load(DATA / "cifar10_calib_train1000.npz")["x"][:200])
    test = np.load(DATA / "cifar10_test.npz")
    val = tmp_path / "val.npz"
    np.savez(val, x=test["x"][::100], y=test["y"][::100])  # sorted by class: stride, 10 of each class
    ekq, art = tmp_path / "r8.ekq", tmp_path / "r8.rpi4.tar"

    assert main(["export", str(RESNET8_ONNX), "--calib", str(calib), "-o", str(ekq)]) == 0
    capsys.readouterr()
    assert main(["compile", str(ekq), "--target", "rpi4", "-o", str(art), "--json"]) == 0
    capsys.readouterr()
    from edgekit.artifact import read_manifest

    m = read_manifest(art)
    assert m["runtime"] == "tvm" and m["extra"]["arch"] == "aarch64"
    assert m["extra"]["tvm_target"]["mcpu"] == "cortex-a72" and m["extra"]["verified"]["mismatches"] == 0

    with open_session(pi["ssh"], timeout=60) as s:
        assert s.probe()["runtimes"]["tvm_runner"]
    assert main(["deploy", str(art), "--device", pi["ssh"], "--json"]) == 0
    dep = json.loads(capsys.readouterr().out)
    assert dep["runtime"] == "tvm" and dep["uploaded"] is True

    png = tmp_path / "tvm.png"
    cmd = ["profile", str(art), "--device", pi["ssh"], "--runs", "10", "--warmup", "2", "--threads", "1"]
    assert main([*cmd, "--json", "--png", str(png)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["runtime"] == "tvm" and rep["uploaded"] is False and len(rep["latencies_ms"]) == 10
    assert 0 < rep["min_ms"] <= rep["median_ms"] <= rep["p90_ms"] <= rep["p99_ms"] <= rep["max_ms"]
    assert rep["load_ms"] > 0 and rep["peak_memory_mib"] > rep["model_memory_mib"] > 1  # the runner's memory counts
    kernels = {x["name"]: x["ms"] for x in rep["layers"]}  # per-kernel times from the Relax VM instrument hook
    assert sum(k.startswith("conv2d_") for k in kernels) == 9 and any(k.startswith("dense") for k in kernels)
    assert all(v >= 0 for v in kernels.values())
    assert 0.2 * rep["min_ms"] < sum(kernels.values()) < 5 * rep["max_ms"]
    assert png.stat().st_size > 10_000

    assert main(["validate", str(art), "--device", pi["ssh"], "--data", str(val), "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["runtime"] == "tvm" and v["n"] == 100
    assert v["bit_exact_fraction"] == 1.0 and v["max_lsb_diff"] == 0 and v["first_mismatch"] is None
    assert v["top1_agreement_float"] >= 0.85 and v["top1"] >= 0.6


def test_tvm_runner_reports_errors_and_survives_them(pi, tmp_path):
    """A wrong input shape is an error from the device's TVM runtime, and the runner keeps serving;
    a batch larger than the library's is split; kernel outputs come back for mismatch hunting."""
    from edgekit.compile import compile_model, synth
    from edgekit.device.errors import DeviceError

    qm = synth.resnet8(seed=1)
    res = compile_model(qm, "rpi4", tmp_path / "s.rpi4.tar", verify=False)
    name = res.manifest["inputs"][0]["name"]
    x = np.random.default_rng(0).integers(-128, 128, (3, *res.manifest["inputs"][0]["shape"][1:])).astype(np.int8)
    with open_session(pi["ssh"], timeout=60) as s:
        s.load(deploy(s, res.path).sha256, threads=1)
        with pytest.raises(DeviceError, match="ndim"):
            s.run({name: x[0]})
        got, ms = s.run({name: x})  # batch 3 on a batch-1 library: three runner calls
        assert ms > 0
        kernels = s.intermediates({name: x[:1]})  # every kernel's output, in call order
    np.testing.assert_array_equal(next(iter(got.values())), qm.run(x, integer=True)[qm.outputs[0].name])
    # 11 kernels: 3 of the 9 convs are fused with the residual add they feed (edgekit.compile.fusion)
    assert len(kernels) >= 11 and np.array_equal(list(kernels.values())[-1], next(iter(got.values()))[:1])


def test_tvm_mismatch_on_the_pi_names_the_first_divergent_layer(pi, resnet8_int8, tmp_path):
    """A miscompiled conv (the 5th) in an rpi4 library: validate over SSH reports the samples that
    differ and, from every kernel's output captured by ek_runner, names that conv as the first layer."""
    from tests.device_helpers import tampered_tvm_artifact

    art, layer = tampered_tvm_artifact(resnet8_int8, 4, "rpi4", tmp_path / "bad.rpi4.tar")
    data = test_subset(tmp_path / "v.npz", 8)
    with open_session(pi["ssh"], timeout=60) as s:
        rep = validate(s, art, data, batch=8)
    assert rep["bit_exact_fraction"] < 1.0 and rep["max_lsb_diff"] > 0
    mm = rep["first_mismatch"]
    assert mm["layer"] == layer and mm["op"] == "conv2d" and mm["max_lsb_diff"] > 0, mm
    assert mm["compared_tensors"] >= 11  # every kernel (6 convs, 3 conv+add, pool, dense) mapped to its tensor


def test_litert_and_onnxruntime_side_by_side_on_the_pi(pi, tmp_path, capsys):
    from edgekit.device.cli import main

    lite = pack_runtime_artifact(
        LITERT_INT8,
        "tflite",
        tmp_path / "r8_litert.tar",
        inputs=[{"name": "input_1", "shape": [1, 32, 32, 3], "dtype": "int8"}],
    )
    ort = pack_runtime_artifact(
        RESNET8_ONNX,
        "onnxruntime",
        tmp_path / "r8_ort.tar",
        inputs=[{"name": "input_1", "shape": [1, 32, 32, 3], "dtype": "float32"}],
    )
    png = tmp_path / "side.png"
    assert (
        main(
            [
                "profile",
                str(lite),
                str(ort),
                "--device",
                pi["ssh"],
                "--runs",
                "5",
                "--threads",
                "1",
                "--json",
                "--png",
                str(png),
            ]
        )
        == 0
    )
    reports = json.loads(capsys.readouterr().out)["reports"]
    assert [r["runtime"] for r in reports] == ["tflite", "onnxruntime"]
    for r in reports:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["load_ms"] > 0
    assert reports[0]["layers"] == []  # LiteRT's Python API gives no per-op times
    ort_layers = reports[1]["layers"]  # onnxruntime's profiler does
    assert len(ort_layers) >= 8 and all(x["ms"] >= 0 for x in ort_layers)
    assert sum(x["ms"] for x in ort_layers) <= 5 * reports[1]["max_ms"]
    assert png.stat().st_size > 10_000

    # the device's LiteRT answers like the host's (top-1; LiteRT's own int8 kernels differ by a few
    # LSB between XNNPACK on x86, XNNPACK on Arm and its reference kernels, so not bit for bit)
    from ai_edge_litert.interpreter import Interpreter

    x = (np.load(DATA / "cifar10_test.npz")["x"][:3].astype(np.int16) - 128).astype(np.int8)
    interp = Interpreter(model_path=str(LITERT_INT8))
    interp.allocate_tensors()
    want = []
    for i in range(3):
        interp.set_tensor(interp.get_input_details()[0]["index"], x[i : i + 1])
        interp.invoke()
        want.append(interp.get_tensor(interp.get_output_details()[0]["index"]))
    with open_session(pi["ssh"], timeout=120) as s:
        s.load(deploy(s, lite).sha256, threads=1)
        got, _ = s.run({"input_1": x})
    out = next(iter(got.values()))
    assert out.shape == (3, 10) and out.dtype == np.int8
    np.testing.assert_array_equal(out.argmax(1), np.concatenate(want).argmax(1))
    assert np.abs(out.astype(int) - np.concatenate(want).astype(int)).max() <= 16


def test_serial_line_runs_the_model_exactly(pi, r8, resnet8_int8):
    x = np.load(DATA / "cifar10_test.npz")["x"][:2].astype(np.float32)
    with open_session(pi["serial"], timeout=120) as s:
        assert s.probe()["arch"] == "aarch64"
        s.load(deploy(s, r8).sha256)
        out, ms = s.run({"input_1": x})
    np.testing.assert_array_equal(out["Identity"], resnet8_int8.run(x, integer=True)["Identity"])
    assert ms > 0


def test_serial_line_with_bit_flips_never_reports_a_wrong_result(pi, r8, resnet8_int8):
    from urllib.parse import urlsplit

    from edgekit.device.transports.serial_line import open_serial

    x = np.load(DATA / "cifar10_test.npz")["x"][2:3].astype(np.float32)
    want = resnet8_int8.run(x, integer=True)["Identity"]
    holder: dict[str, NoisyChannel] = {}

    def wrap(channel):
        holder["noisy"] = NoisyChannel(channel, flip=1e-4, drop=5e-6, seed=11)
        return holder["noisy"]

    parts = urlsplit(pi["serial"])
    s = open_serial(pi["serial"], parts, {"baud": "921600"}, 30, wrap=wrap)
    s.max_retries = 200
    s.reader.gap_timeout = 0.3
    try:
        s.load(deploy(s, r8).sha256)  # cached on the device by the clean serial test
        for _ in range(8):
            out, _ = s.run({"input_1": x})
            np.testing.assert_array_equal(out["Identity"], want)
    finally:
        s.close()
    assert holder["noisy"].flipped > 0 and s.retransmissions > 0


def test_adb_transport_with_the_real_client(pi, r8, val16):
    from edgekit.device.transports.adb import list_devices

    with open_session(pi["adb"], timeout=120) as s:
        assert s.probe()["arch"] == "aarch64"
        report = validate(s, r8, val16, limit=4, batch=4)
    assert report["bit_exact_fraction"] == 1.0
    serial = pi["adb"].removeprefix("adb://")
    listed = {d["serial"]: d for d in list_devices()}
    assert listed[serial]["state"] == "device" and "Raspberry" in listed[serial].get("model", "")


def test_adb_shell_exit_codes_with_shell_v2_and_on_a_legacy_shell(pi):
    from edgekit.device.transports import adb

    serial = pi["adb"].removeprefix("adb://")
    adb.ensure_connected(serial)
    assert "shell_v2" in adb.features(serial)
    assert adb.shell(serial, "echo out; echo err >&2; exit 3", check=False) == (3, "out\n")
    assert adb.shell(serial, "test -d /opt/edgekit-agent")[0] == 0
    with pytest.raises(DeviceConnectionError, match="exited with 1"):
        adb.shell(serial, "test -f /no/such/file")
    assert adb._run(serial, ("shell", "-x", "exit 5"), 30).returncode == 0  # the legacy protocol loses it
    adb._FEATURES[serial] = frozenset()  # as for a device without shell_v2: legacy protocol, status line
    try:
        assert adb.shell(serial, "echo out; exit 5", check=False) == (5, "out\n")
        assert adb.shell(serial, "true") == (0, "")
    finally:
        del adb._FEATURES[serial]


def test_agent_killed_mid_run_over_ssh(pi, r8):
    s = open_session(pi["ssh"], timeout=60)
    s.load(deploy(s, r8).sha256)
    pid = s.info["pid"]  # qemu-user runs the agent as a host process with this pid
    threading.Timer(1.0, lambda: os.kill(pid, 9)).start()
    t0 = time.monotonic()
    with pytest.raises(DeviceConnectionError, match="agent died or the link dropped"):
        s.profile({"input_1": np.zeros((1, 32, 32, 3), np.float32)}, runs=10_000, warmup=0)
    assert time.monotonic() - t0 < 20
    s.close()
    with open_session(pi["ssh"], timeout=60) as s2:
        assert profile(s2, r8, runs=2, warmup=0)["median_ms"] > 0


def test_ssh_link_dropped_mid_upload_keeps_the_previous_version(pi, r8):
    from edgekit.compile import synth

    v2 = pack_reference_artifact(synth.resnet8(seed=3), r8.with_name("v2.tar"))
    with open_session(pi["ssh"], timeout=60) as s:
        v1 = deploy(s, r8).sha256
    s = open_session(pi["ssh"], timeout=60)
    s.chunk_size = 16 << 10

    def drop_link(done: int, total: int) -> None:
        if done >= 32 << 10:
            s.channel.client.get_transport().close()  # the network goes away mid-upload

    with pytest.raises(DeviceConnectionError):
        deploy(s, v2, progress=drop_link)
    s.close()
    with open_session(pi["ssh"], timeout=60) as s:
        p = s.probe()
        assert p["current"] == v1
        s.load(v1)
        out, _ = s.run({"input_1": np.zeros((1, 32, 32, 3), np.float32)})
        assert out["Identity"].shape == (1, 10)
        res = deploy(s, v2)
        assert res.uploaded and s.probe()["current"] == res.sha256
    cache = Path(pi["rootfs"]) / "root/.edgekit/cache"
    assert all((p / "manifest.json").exists() for p in cache.iterdir() if not p.name.startswith("."))


def test_hostile_file_names_over_ssh(pi, r8, tmp_path, val16):
    name = "x'; touch PWNED_EK; echo '$(touch PWNED_EK)`touch PWNED_EK`.tar"
    hostile = tmp_path / name
    hostile.write_bytes(r8.read_bytes())
    url = pi["ssh"] + "&root=" + "edgekit%20dir%3B%20touch%20PWNED_EK"
    with open_session(url, timeout=120) as s:
        deploy(s, hostile)
        assert validate(s, hostile, val16, limit=2)["bit_exact_fraction"] == 1.0
    rootfs = Path(pi["rootfs"])
    assert (rootfs / "root/edgekit dir; touch PWNED_EK/cache").is_dir()
    for where in (rootfs / "root", rootfs, Path.cwd(), tmp_path):
        assert not (where / "PWNED_EK").exists()


def test_unknown_host_key_is_refused_by_default(pi, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/known_hosts that could know it
    url = pi["ssh"].split("&known_hosts=")[0]
    with pytest.raises(DeviceConnectionError, match="unknown host key"):
        open_session(url, timeout=30)


def test_device_that_never_answers_times_out(tmp_path):
    """An SSH port that accepts and stays silent, and a serial line with no agent: clear errors, no hang."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout, match="no SSH answer"):
        open_session(f"ssh://root@127.0.0.1:{port}?insecure=1", timeout=3)
    assert time.monotonic() - t0 < 15
    srv.close()

    relay = subprocess.Popen(
        [sys.executable, str(ROOT / "tools/emulated_pi/ptyrelay.py"), str(tmp_path / "a"), str(tmp_path / "b")],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "a").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="no agent answered"):
            open_session(f"serial://{tmp_path / 'a'}?baud=115200", timeout=4)
        assert time.monotonic() - t0 < 10
    finally:
        relay.kill()
        relay.wait()


def test_missing_python_on_the_device_is_explained(pi):
    with pytest.raises(DeviceConnectionError, match="agent did not start on the device"):
        open_session(pi["ssh"] + "&python=/opt/no-such-python3", timeout=30)
