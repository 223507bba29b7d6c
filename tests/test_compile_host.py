"""``edgekit compile`` for the host: artifacts, manifests, targets, CLI, and the real ResNet-8
(int8 and int4) bit-exact against the reference executor on CIFAR-10 test images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from edgekit.artifact import read_manifest, unpack_artifact  # noqa: E402
from edgekit.compile import compile_model, synth  # noqa: E402
from edgekit.compile.build import quantize_input  # noqa: E402
from edgekit.compile.targets import TargetError, get_target, list_targets  # noqa: E402
from edgekit.errors import EdgekitError, UnsupportedOpsError  # noqa: E402
from edgekit.qmodel import QNode  # noqa: E402
from edgekit.qmodel import load as load_qm  # noqa: E402


def _load_vm(tar: Path, dest: Path):
    m = unpack_artifact(tar, dest)
    lib = tvm.runtime.load_module(str(dest / m["model_file"]))
    return m, relax.VirtualMachine(lib, tvm.cpu())


def _check_real(qm, images: np.ndarray, labels: np.ndarray, tmp_path: Path, name: str) -> float:
    res = compile_model(qm, "host", tmp_path / f"{name}.tar", verify=False)
    m, vm = _load_vm(res.path, tmp_path / name)
    xs = np.concatenate([quantize_input(qm, images[i : i + 1].astype(np.float32)) for i in range(len(images))])
    ref = qm.run(xs, integer=True)[qm.outputs[0].name]
    got = np.concatenate([vm["main"](tvm.runtime.tensor(xs[i : i + 1])).numpy() for i in range(len(xs))])
    np.testing.assert_array_equal(got, ref)
    assert m["model_hash"] == qm.content_hash()
    return float((got.argmax(1) == labels).mean())


def test_real_resnet8_int8_and_int4_bit_exact_on_cifar10(resnet8_int8, resnet8_int4, cifar_test, tmp_path):
    x, y = cifar_test
    n = 300
    acc8 = _check_real(resnet8_int8, x[:n], y[:n], tmp_path, "r8")
    acc4 = _check_real(resnet8_int4, x[:n], y[:n], tmp_path, "r8w4")
    assert acc8 > 0.6 and acc4 > 0.4


def test_artifact_manifest_and_int4_weight_bytes(tmp_path):
    r8 = compile_model(synth.resnet8(0, 8), "host", tmp_path / "a8.tar")
    r4 = compile_model(synth.resnet8(0, 4), "host", tmp_path / "a4.tar")
    m = read_manifest(r8.path)
    assert m["runtime"] == "tvm" and m["model_file"] == "model.so" and m["target"] == "host"
    assert set(m["files"]) == {"model.so", "reference.ekq"}
    assert m["inputs"][0]["dtype"] == "int8" and m["inputs"][0]["shape"] == [1, 32, 32, 3]
    assert m["inputs"][0]["scale"] == 1.0 and m["inputs"][0]["zero_point"] == -128
    assert m["outputs"][0]["shape"] == [1, 10]
    ex = m["extra"]
    assert ex["entry"] == "main" and ex["input_quantized"] is True and ex["tuned"] is False
    assert ex["threads"] == 2 and ex["tvm_version"].startswith("0.27")
    assert ex["verified"]["mismatches"] == 0 and ex["verified"]["how"] == "host"
    ratio = r4.manifest["extra"]["weight_bytes"] / ex["weight_bytes"]
    assert 0.45 < ratio < 0.55, ratio
    so8 = (unpack_artifact(r8.path, tmp_path / "u8") and (tmp_path / "u8" / "model.so")).stat().st_size
    so4 = (unpack_artifact(r4.path, tmp_path / "u4") and (tmp_path / "u4" / "model.so")).stat().st_size
    assert so8 - so4 > 0.3 * ex["weight_bytes"]  # packed constants shrink the library (unpack code grows a bit)
    qm = load_qm(tmp_path / "u8" / "reference.ekq")
    assert qm.content_hash() == m["model_hash"]
    _, vm = _load_vm(r4.path, tmp_path / "v4")
    x = np.random.default_rng(3).integers(-128, 128, size=(1, 32, 32, 3)).astype(np.int8)
    q4 = load_qm(tmp_path / "u4" / "reference.ekq")
    ref = q4.run(x, integer=True)[q4.outputs[0].name]
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), ref)


def test_runtime_default_threads_are_pinned(tmp_path, monkeypatch):
    """Run with the runtime default (threads 0), a TVM artifact gets TVM_NUM_THREADS set explicitly (the
    target's default, at most the online cores): left unset, TVM re-reads /sys/devices/system/cpu/online
    on every parallel kernel launch (+3 us per kernel here)."""
    import os

    from edgekit.device.runtimes import tvm_vm
    from edgekit.device.runtimes.base import default_threads

    cores = os.cpu_count() or 1
    assert default_threads({"extra": {"threads": 1}}) == 1
    assert default_threads({"extra": {"threads": 64}}) == min(64, cores)
    assert default_threads({"extra": {}}) == cores
    res = compile_model(synth.resnet8(0, 8), "host", tmp_path / "a.tar", verify=False)
    unpack_artifact(res.path, tmp_path / "u")
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    tvm_vm.TVMModel(tmp_path / "u" / "model.so", res.manifest, 0)
    assert os.environ["TVM_NUM_THREADS"] == str(min(2, cores))


def test_builtin_targets_and_user_targets_dir(tmp_path, monkeypatch):
    found = list_targets()
    assert {"host", "rpi3", "rpi4", "rpi5", "android-arm64", "android-arm64-i8mm"} <= set(found)
    assert found["rpi5"].tvm["mcpu"] == "cortex-a76" and "+dotprod" in found["rpi5"].tvm["mattr"]
    assert found["rpi4"].qemu_cpu == "cortex-a72" and found["rpi4"].toolchain["cc"] == "aarch64-linux-gnu-g++"
    for t in found.values():
        t.tvm_target()  # every dict is a valid TVM target
    mine = tmp_path / "targets"
    mine.mkdir()
    (mine / "jetson.toml").write_text(
        'name = "my-board"\ndescription = "a user board"\narch = "aarch64"\n'
        '[tvm]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a57"\nnum-cores = 4\n'
        '[toolchain]\ncc = "aarch64-linux-gnu-g++"\ncross = true\n'
        '[runtime]\nkind = "tvm"\n[device]\nthreads = 4\nqemu_cpu = "cortex-a57"\n'
    )
    assert get_target("my-board", mine).tvm["mcpu"] == "cortex-a57"
    monkeypatch.setenv("EDGEKIT_TARGETS_DIR", str(mine))
    assert "my-board" in list_targets()
    with pytest.raises(TargetError, match="unknown target 'nope'.*--targets-dir"):
        get_target("nope")
    (mine / "bad.toml").write_text("[tvm]\nkind = 'llvm'\n")
    with pytest.raises(TargetError, match=r"missing the \[toolchain\] table"):
        list_targets(mine)


def test_cli_targets_and_compile(tmp_path, capsys):
    from edgekit.cli import main

    assert main(["targets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "rpi4" in listed and listed["rpi5"]["device"]["qemu_cpu"] == "cortex-a76"
    src = synth.resnet8(1, 8).save(tmp_path / "m.ekq")
    out = tmp_path / "m.host.tar"
    assert main(["compile", str(src), "--target", "host", "-o", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["artifact"] == str(out) and info["extra"]["verified"]["mismatches"] == 0
    assert read_manifest(out)["target"] == "host"


def test_android_without_ndk_says_what_to_do(tmp_path, monkeypatch, capsys):
    from edgekit.cli import main

    for k in ("ANDROID_NDK_HOME", "ANDROID_NDK_ROOT", "ANDROID_NDK", "NDK_ROOT", "ANDROID_HOME", "ANDROID_SDK_ROOT"):
        monkeypatch.delenv(k, raising=False)
    src = synth.resnet8(1, 8).save(tmp_path / "m.ekq")
    assert main(["compile", str(src), "--target", "android-arm64", "-o", str(tmp_path / "a.tar")]) == 2
    err = capsys.readouterr().err
    assert "Android NDK" in err and "ANDROID_NDK_HOME" in err
    assert not (tmp_path / "a.tar").exists()


def test_unsupported_ops_are_all_listed():
    qm = synth.resnet8(0, 8)
    qm.nodes.insert(3, QNode("hard_swish", "hs1", [qm.nodes[2].outputs[0]], ["hs_out"]))
    qm.nodes.insert(4, QNode("gelu", "g1", ["hs_out"], ["g_out"]))
    with pytest.raises(UnsupportedOpsError) as ei:
        compile_model(qm, "host", None)
    msg = str(ei.value)
    assert "hard_swish" in msg and "gelu" in msg
    assert isinstance(ei.value, EdgekitError)
