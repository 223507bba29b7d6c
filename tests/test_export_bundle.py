"""App bundles: an 'app' that reads only the bundle gets the reference's top-1."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from edgekit.export.bundle import write_bundle
from edgekit.export.cli import export_model
from tests.export_helpers import reference_logits

# The app: no edgekit import, only metadata.json + model file + the runtime (run with -I, cwd=bundle).
APP = textwrap.dedent("""
    import json, sys
    import numpy as np
    meta = json.load(open("metadata.json"))
    pixels = np.load(sys.argv[1])  # uint8 [N, H, W, C]
    inp, out = meta["inputs"][0], meta["outputs"][0]
    pre = meta["preprocessing"]
    x = (pixels.astype(np.float32) - np.float32(pre["mean"])) / np.float32(pre["std"])
    r = x / np.float32(inp["scale"])
    q = np.sign(r) * np.floor(np.abs(r) + 0.5) + inp["zero_point"]
    q = np.clip(q, inp["qmin"], inp["qmax"]).astype(inp["dtype"])
    if meta["runtime"] == "litert":
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
        kind = "AUTO" if meta["runtime_options"]["xnnpack"] else "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
        it = Interpreter(model_path=meta["model_file"], experimental_op_resolver_type=OpResolverType[kind])
        run = it.get_signature_runner()
        y = np.concatenate([run(**{inp["name"]: q[i:i + 1]})[out["name"]] for i in range(len(q))])
    else:
        import onnxruntime as ort
        s = ort.InferenceSession(meta["model_file"], providers=["CPUExecutionProvider"])
        y = s.run([out["name"]], {inp["name"]: q})[0]
    logits = (y.astype(np.float32) - out["zero_point"]) * np.float32(out["scale"])
    top1 = logits.argmax(-1)
    assert "edgekit" not in sys.modules
    print(json.dumps({"top1": top1.tolist(), "labels": [meta["labels"][i] for i in top1[:3]]}))
""")


def _play(folder, pixels, tmp_path):
    np.save(tmp_path / "pixels.npy", pixels)
    (tmp_path / "app.py").write_text(APP)
    res = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "app.py"), str(tmp_path / "pixels.npy")],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_bundle_app_matches_reference_top1(resnet8_int8, cifar_test, tmp_path):
    qm = resnet8_int8
    x = cifar_test[0][:500]
    ref = reference_logits(qm, x).argmax(-1)
    res = write_bundle(qm, tmp_path / "b", labels="cifar10")
    for rt in ("litert", "onnxruntime"):
        folder = tmp_path / "b" / rt
        meta = json.loads((folder / "metadata.json").read_text())
        assert meta["labels"][0] == "airplane" and meta["preprocessing"]["layout"] == "NHWC"
        assert meta["inputs"][0]["shape"] == [1, 32, 32, 3]
        kt = (folder / "android" / "Classifier.kt").read_text()
        sw = (folder / "ios" / "Classifier.swift").read_text()
        assert meta["inputs"][0]["name"] in kt and meta["outputs"][0]["name"] in kt
        assert meta["inputs"][0]["name"] in sw or rt == "litert"
        assert res["bundles"][rt]["path"] == str(folder)
        app = _play(folder, x, tmp_path)
        agree = (np.array(app["top1"]) == ref).mean()
        if rt == "litert":
            assert agree == 1.0  # bit-exact export
        else:
            assert agree >= 0.9  # onnxruntime requantizes in float


def test_bundle_zip_and_mean_std(tmp_path):
    from tests.export_helpers import tiny_resnet

    qm = tiny_resnet()
    res = write_bundle(
        qm, tmp_path, runtimes=("litert",), labels=[str(i) for i in range(10)], mean=[127.5], std=[2.0], as_zip=True
    )
    z = zipfile.ZipFile(res["bundles"]["litert"]["path"])
    meta = json.loads(z.read("metadata.json"))
    assert meta["preprocessing"]["mean"] == [127.5] * 3 and meta["preprocessing"]["std"] == [2.0] * 3
    assert {"model.tflite", "android/Classifier.kt", "ios/Classifier.swift", "README.md"} <= set(z.namelist())


def test_export_model_dispatch(tmp_path):
    from tests.export_helpers import tiny_resnet

    qm = tiny_resnet()
    assert export_model(qm, "tflite", tmp_path / "m.tflite")["operators"]["CONV_2D"] == 6
    assert export_model(qm, "onnx", tmp_path / "m.onnx")["ir_version"] == 8
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match="unknown export format"):
        export_model(qm, "coreml", tmp_path / "m.x")


def test_cli_bundle_and_export_target(tmp_path, capsys):
    import shutil

    from edgekit.cli import main
    from tests.export_helpers import tiny_resnet

    qm = tiny_resnet()
    qm.save(tmp_path / "m.ekq")
    assert (
        main(
            [
                "bundle",
                str(tmp_path / "m.ekq"),
                "-o",
                str(tmp_path / "b"),
                "--labels",
                "cifar10",
                "--runtime",
                "litert",
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert (tmp_path / "b" / "litert" / "metadata.json").exists() and list(res["bundles"]) == ["litert"]
    assert main(["bundle", str(tmp_path / "m.ekq"), "-o", str(tmp_path / "c"), "--runtime", "coreml"]) == 2
    assert "unknown runtime" in capsys.readouterr().err
    if shutil.which("vela"):
        res = export_model(qm, "tflite", tmp_path / "m_vela.tflite", target="ethos-u55-64")
        assert res["vela"]["target"] == "ethos-u55-64" and (tmp_path / "m_vela.tflite").exists()
