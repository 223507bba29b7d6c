"""Shared fixtures: the real models and data in ../shared/data, quantized once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESNET8 = DATA / "resnet8_cifar10_fp32.onnx"


def pytest_configure(config):
    if not RESNET8.exists():
        raise pytest.UsageError(f"the shared evaluation data are missing: expected {DATA} beside the project")


@pytest.fixture(scope="session")
def calib_x() -> np.ndarray:
    return np.load(DATA / "cifar10_calib_train1000.npz")["x"]


@pytest.fixture(scope="session")
def cifar_test() -> tuple[np.ndarray, np.ndarray]:
    d = np.load(DATA / "cifar10_test.npz")
    return d["x"], d["y"]


@pytest.fixture(scope="session")
def resnet8_int8(calib_x):
    import edgekit

    return edgekit.quantize(RESNET8, calib_x, weight_bits=8, progress=False)


@pytest.fixture(scope="session")
def resnet8_int4(calib_x):
    import edgekit

    return edgekit.quantize(RESNET8, calib_x, weight_bits=4, progress=False)


@pytest.fixture(scope="session")
def float_logits(cifar_test) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(RESNET8), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_1": cifar_test[0].astype(np.float32)})[0]
