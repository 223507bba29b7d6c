"""The device runner against the real agent on this host (``local://``): deploy, profile, validate,
the CLI, faults (agent killed, link dropped mid-upload), the device lock and hostile file names."""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgekit.device.artifacts import pack_reference_artifact
from edgekit.device.deploy import deploy
from edgekit.device.errors import DeviceConnectionError, DeviceError, ValidationError
from edgekit.device.profile import profile, render_png
from edgekit.device.transports import open_session
from edgekit.device.validate import validate
from tests.device_helpers import CutAfter, kill_later, tampered_artifact, test_subset


@pytest.fixture(scope="module")
def r8_artifact(tmp_path_factory, resnet8_int8) -> Path:
    return pack_reference_artifact(resnet8_int8, tmp_path_factory.mktemp("art") / "resnet8.tar")


@pytest.fixture(scope="module")
def val_data(tmp_path_factory) -> Path:
    return test_subset(tmp_path_factory.mktemp("data") / "val.npz", 24)


def url(root: Path) -> str:
    return f"local://?root={root}"


def test_deploy_is_content_addressed_and_cached(tmp_path, r8_artifact):
    with open_session(url(tmp_path), timeout=30) as s:
        first = deploy(s, r8_artifact)
        second = deploy(s, r8_artifact)
        probe = s.probe()
    assert first.uploaded and not second.uploaded
    assert probe["current"] == first.sha256
    entry = tmp_path / "cache" / first.sha256
    assert (entry / "manifest.json").is_file() and (entry / "files" / "model.ekq").is_file()
    assert not list((tmp_path / "cache").glob(".incoming-*"))


def test_profile_reports_sane_numbers_and_a_png(tmp_path, r8_artifact):
    with open_session(url(tmp_path), timeout=60) as s:
        r = profile(s, r8_artifact, runs=12, warmup=2)
    assert len(r["latencies_ms"]) == 12
    assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["std_ms"] >= 0 and r["load_ms"] > 0 and r["warmup_ms"] > 0
    assert 1 < r["peak_memory_mib"] < 4096
    names = [layer["name"] for layer in r["layers"]]
    assert len(names) == 16 and all(layer["ms"] >= 0 for layer in r["layers"])
    png = render_png([r], tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_validate_is_bit_exact_with_float_and_label_metrics(tmp_path, r8_artifact, val_data):
    with open_session(url(tmp_path), timeout=60) as s:
        r = validate(s, r8_artifact, val_data, batch=10)
    assert r["n"] == 24
    assert r["bit_exact_fraction"] == 1.0 and r["max_lsb_diff"] == 0
    assert r["first_mismatch"] is None
    assert 0.6 <= r["top1_agreement_float"] <= 1.0  # the float model found through provenance
    assert r["sqnr_db"] > 10 and r["cosine"] > 0.95
    assert 0.3 <= r["top1"] <= 1.0


def test_validate_names_the_first_divergent_layer(tmp_path, resnet8_int8, val_data):
    bad, layer = tampered_artifact(resnet8_int8, 2, tmp_path / "bad.tar")
    ref = resnet8_int8.save(tmp_path / "ref.ekq")
    with open_session(url(tmp_path / "dev"), timeout=60) as s:
        r = validate(s, bad, val_data, reference=ref, limit=8)
    assert r["bit_exact_fraction"] < 1.0 and r["max_lsb_diff"] > 0
    mm = r["first_mismatch"]
    assert mm["layer"] == layer and mm["op"] == "conv2d" and mm["max_lsb_diff"] > 0
    assert 0 <= mm["index"] < 8 and mm["differing_elements"] > 0


def test_validate_rejects_a_reference_of_another_model(tmp_path, r8_artifact, val_data):
    from edgekit.compile import synth

    other = synth.resnet8(seed=5).save(tmp_path / "other.ekq")
    with open_session(url(tmp_path), timeout=30) as s, pytest.raises(ValidationError, match="does not match"):
        validate(s, r8_artifact, val_data, reference=other)


def test_cli_register_and_json_reports(tmp_path, r8_artifact, val_data, capsys):
    from edgekit.device.cli import register

    parser = argparse.ArgumentParser(prog="edgekit")
    register(parser.add_subparsers(dest="command", required=True))
    dev = url(tmp_path)

    args = parser.parse_args(["deploy", str(r8_artifact), "--device", dev, "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["uploaded"] is True

    png = tmp_path / "prof.png"
    args = parser.parse_args(["profile", str(r8_artifact), "--device", dev, "--runs", "5", "--json", "--png", str(png)])
    assert args.func(args) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("median_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "std_ms", "load_ms", "peak_memory_mib"):
        assert rep[key] > 0 or key == "std_ms"
    assert png.is_file()

    args = parser.parse_args(
        ["validate", str(r8_artifact), "--device", dev, "--data", str(val_data), "--json", "--limit", "8"]
    )
    assert args.func(args) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("n", "bit_exact_fraction", "max_lsb_diff", "top1_agreement_float", "top1"):
        assert key in rep
    assert rep["n"] == 8 and rep["bit_exact_fraction"] == 1.0

    args = parser.parse_args(["devices", "--device", dev, "--json"])
    assert args.func(args) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["probed"][0]["runtimes"]["reference"] is True

    args = parser.parse_args(["profile", str(r8_artifact), "--device", dev, "--runs", "3"])
    assert args.func(args) == 0
    assert "median" in capsys.readouterr().out


def test_cli_takes_bare_model_files(tmp_path, resnet8_int8, monkeypatch, capsys):
    """A .tflite, an .onnx and a CNN .ekq are profiled as they are (packed for LiteRT, onnxruntime and
    the reference executor, inputs read from the files, cached on content)."""
    from edgekit.artifact import read_manifest
    from edgekit.device import artifacts
    from edgekit.device.cli import main
    from tests.device_helpers import LITERT_INT8, RESNET8_ONNX

    monkeypatch.setattr(artifacts, "MODEL_FILE_CACHE", tmp_path / "cache")
    ekq = resnet8_int8.save(tmp_path / "r8.ekq")
    files = [str(LITERT_INT8), str(RESNET8_ONNX), str(ekq)]
    assert main(["profile", *files, "--device", url(tmp_path), "--runs", "3", "--threads", "1", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)["reports"]
    assert [r["runtime"] for r in reports] == ["tflite", "onnxruntime", "reference"]
    assert [r["artifact"] for r in reports] == files
    assert all(r["median_ms"] > 0 for r in reports)
    tfl = read_manifest(artifacts.model_file_artifact(LITERT_INT8))
    assert tfl["inputs"][0]["dtype"] == "int8" and tfl["inputs"][0]["shape"] == [1, 32, 32, 3]
    assert "scale" in tfl["inputs"][0] and len(list((tmp_path / "cache").glob("*.tar"))) == 3
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["profile", str(tmp_path / "notes.txt"), "--device", url(tmp_path)]) == 2
    assert "not a readable edgekit artifact" in capsys.readouterr().err


def test_cli_errors_say_what_to_do(tmp_path, capsys):
    from edgekit.device.cli import main

    assert main(["deploy", str(tmp_path / "missing.tar"), "--device", url(tmp_path)]) == 2
    assert "no such artifact" in capsys.readouterr().err
    assert main(["deploy", str(tmp_path / "x.tar"), "--device", "ftp://nowhere"]) == 2
    assert "use one of local://" in capsys.readouterr().err


def test_agent_killed_mid_run_is_a_clear_error_and_a_retry_works(tmp_path, r8_artifact):
    s = open_session(url(tmp_path), timeout=60)
    sha = deploy(s, r8_artifact).sha256
    s.load(sha)
    x = {"input_1": np.zeros((1, 32, 32, 3), np.float32)}
    kill_later(s.info["pid"], 0.5)
    t0 = time.monotonic()
    with pytest.raises(DeviceConnectionError, match="agent died or the link dropped"):
        s.profile(x, runs=100_000, warmup=0)
    assert time.monotonic() - t0 < 10
    s.close()
    with open_session(url(tmp_path), timeout=60) as s2:
        r = profile(s2, r8_artifact, runs=3)
        assert r["uploaded"] is False and r["median_ms"] > 0


def test_link_dropped_mid_upload_leaves_the_previous_version(tmp_path, resnet8_int8, r8_artifact):
    from edgekit.compile import synth

    v2 = pack_reference_artifact(synth.resnet8(seed=1), tmp_path / "v2.tar")
    with open_session(url(tmp_path / "dev"), timeout=30) as s:
        v1 = deploy(s, r8_artifact).sha256
    s = open_session(url(tmp_path / "dev"), timeout=30)
    s.channel = CutAfter(s.channel, limit=v2.stat().st_size // 2)
    s.reader._read = s.channel.read
    s.chunk_size = 16 << 10
    with pytest.raises(DeviceConnectionError):
        deploy(s, v2)
    s.close()
    cache = tmp_path / "dev" / "cache"
    complete = sorted(p.name for p in cache.iterdir() if (p / "manifest.json").exists())
    assert complete == [v1]  # nothing half-written where the agent would load it
    with open_session(url(tmp_path / "dev"), timeout=30) as s:
        assert s.probe()["current"] == v1
        s.load(v1)  # the previous version is still usable
        s.call("clean_incoming", age_s=0)
        res = deploy(s, v2)  # and a retry succeeds
        assert res.uploaded and s.probe()["current"] == res.sha256
    assert not list(cache.glob(".incoming-*"))


def test_corrupt_upload_is_refused_by_the_device_checksum(tmp_path, r8_artifact):
    data = bytearray(r8_artifact.read_bytes())
    from edgekit.artifact import sha256_file

    sha = sha256_file(r8_artifact)
    data[len(data) // 2] ^= 0xFF
    with open_session(url(tmp_path), timeout=30) as s:
        with pytest.raises(DeviceError, match="checksum mismatch"):
            s.upload(bytes(data), sha)
        assert not s.has(sha)


def test_concurrent_runs_on_one_device_are_serialised(tmp_path, r8_artifact):
    with open_session(url(tmp_path), timeout=60) as s:
        sha = deploy(s, r8_artifact).sha256
    x = {"input_1": np.zeros((1, 32, 32, 3), np.float32)}
    windows: list[list[float]] = []
    errors: list[Exception] = []

    def worker() -> None:
        try:
            with open_session(url(tmp_path), timeout=120) as s:
                s.load(sha)
                windows.append(s.profile(x, runs=6, warmup=0)["window"])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(windows) == 3
    windows.sort()
    for (_, end), (start, _) in zip(windows, windows[1:], strict=False):
        assert end <= start, f"runs overlapped: {windows}"


def test_hostile_artifact_names_never_reach_a_shell(tmp_path, r8_artifact, val_data):
    name = "x'; touch PWNED_EK; echo '$(touch PWNED_EK)`touch PWNED_EK`.tar"
    hostile = tmp_path / name
    hostile.write_bytes(r8_artifact.read_bytes())
    with open_session(url(tmp_path / "dev"), timeout=60) as s:
        res = deploy(s, hostile)
        r = validate(s, hostile, val_data, limit=4)
    assert res.sha256 and r["bit_exact_fraction"] == 1.0
    for where in (Path.cwd(), tmp_path, tmp_path / "dev", Path.home()):
        assert not (where / "PWNED_EK").exists()


def test_agent_runs_no_commands_from_the_host(tmp_path):
    with open_session(url(tmp_path), timeout=30) as s:
        for op in ("exec", "shell", "__init__", "_entry", "handle"):
            with pytest.raises(DeviceError, match="unknown operation"):
                s.call(op, cmd=f"touch {tmp_path / 'PWNED_EK'}")
        assert s.probe()["arch"]  # the agent keeps serving
    assert not (tmp_path / "PWNED_EK").exists()
