"""rpi4 / rpi5 artifacts (cross-compiled with aarch64-linux-gnu-g++) run under qemu-user with the
aarch64 TVM runtime and an explicit QEMU_CPU, bit-exact with the reference executor."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("tvm")
from edgekit.artifact import read_manifest  # noqa: E402
from edgekit.compile import compile_model, emulate  # noqa: E402
from edgekit.compile.build import quantize_input, run_library  # noqa: E402
from edgekit.compile.targets import get_target  # noqa: E402

pytestmark = pytest.mark.skipif(
    not emulate.available(),
    reason="needs qemu-user, aarch64-linux-gnu-g++ and the cached aarch64 TVM runtime (tools/setup.d/40-tvm.sh)",
)


@pytest.mark.parametrize("target", ["rpi4", "rpi5"])
def test_real_resnet8_bit_exact_under_qemu(target, resnet8_int8, resnet8_int4, cifar_test, tmp_path):
    x, y = cifar_test
    n = 100
    spec = get_target(target)
    for bits, qm in ((8, resnet8_int8), (4, resnet8_int4)):
        res = compile_model(qm, target, tmp_path / f"r8w{bits}.{target}.tar", verify=False)
        m = read_manifest(res.path)
        assert m["extra"]["arch"] == "aarch64" and m["extra"]["qemu_cpu"] == spec.qemu_cpu
        d = tmp_path / f"u{bits}{target}"
        with tarfile.open(res.path) as tar:
            tar.extractall(d, filter="data")
        head = (d / "model.so").read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and head[18] == 183  # EM_AARCH64
        xs = [quantize_input(qm, x[i : i + 1].astype(np.float32)) for i in range(n)]
        got = np.concatenate([o[0] for o in run_library(d / "model.so", spec, xs, [m["outputs"][0]["shape"]])])
        ref = qm.run(np.concatenate(xs), integer=True)[qm.outputs[0].name]
        np.testing.assert_array_equal(got, ref)
        assert (got.argmax(1) == y[:n]).mean() > (0.6 if bits == 8 else 0.4)


def test_compile_verifies_under_qemu_by_default(tmp_path):
    from edgekit.compile import synth

    res = compile_model(synth.all_ops(2), "rpi5", tmp_path / "ops.rpi5.tar", batch=2)
    v = res.manifest["extra"]["verified"]
    assert v["mismatches"] == 0 and v["how"] == "qemu-user QEMU_CPU=cortex-a76"
