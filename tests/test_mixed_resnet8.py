"""Mixed precision on the real ResNet-8: the CLI export at 65% of the int8 weight bytes, the bits
in ``edgekit inspect``, a BOPs budget, and accuracy on a test subset against int8, uniform int4
and a random allocation of the same size (the full 10,000-image table is tools/bench_mixed.py).
Calibration uses 256 calibration images to keep the suite short."""

from __future__ import annotations

import contextlib
import io
import json
import time

import numpy as np
import pytest

from tests.conftest import DATA, RESNET8

pytest.importorskip("torch", reason="the default (Hessian) sensitivity needs the torch extra (edgekit[torch])")

SUBSET = 2000
CALIB = 256


@pytest.fixture(scope="module")
def small_calib(tmp_path_factory) -> tuple[str, np.ndarray]:
    x = np.load(DATA / "cifar10_calib_train1000.npz")["x"][:CALIB]
    path = tmp_path_factory.mktemp("calib") / "calib256.npz"
    np.savez(path, x=x)
    return str(path), x.astype(np.float32)


@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory, small_calib):
    from edgekit.cli import main

    out = tmp_path_factory.mktemp("mixed") / "resnet8_mixed.ekq"
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = main(
            [
                "export",
                str(RESNET8),
                "--calib",
                small_calib[0],
                "--weight-bits",
                "mixed",
                "--max-size",
                "0.65",
                "-o",
                str(out),
                "--json",
            ]
        )
    seconds = time.perf_counter() - t0
    assert rc == 0
    return out, json.loads(buf.getvalue()), seconds


def test_cli_export_meets_the_size_budget_and_inspect_shows_the_bits(mixed_export, capsys):
    from edgekit.cli import main
    from edgekit.qmodel import load

    out, summary, seconds = mixed_export
    # ~1 min on an idle 2-core machine (tools/bench_mixed.py reports it); this only guards against
    # a blow-up, since CI shares the cores with other jobs.
    assert seconds < 600, f"mixed export took {seconds:.0f} s"
    qm = load(out)
    int8_bytes = sum(qm.constants[n.params["weight"]].size for n in qm.nodes if "weight" in n.params)
    assert qm.weight_bytes() <= 0.65 * int8_bytes
    m = summary["mixed"]
    assert m["budget"]["max_size_fraction"] == 0.65 and m["budget"]["int8_size_bytes"] == int8_bytes
    assert m["achieved"]["size_bytes"] == qm.weight_bytes()
    assert m["sensitivity"]["method"] == "hessian" and set(m["sensitivity"]["values"]) == set(m["bits"])
    for group in m["ilp"]["tied_groups"]:
        assert len({m["bits"][name] for name in group}) == 1
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    bits = {layer["name"]: layer["weight_bits"] for layer in info["layers"] if "weight_bits" in layer}
    assert bits == m["bits"] and set(bits.values()) == {4, 8}
    assert qm.provenance["options"]["mixed"]["budget"]["max_size_fraction"] == 0.65


def test_bops_budget_reuses_the_sensitivities(mixed_export, small_calib):
    from edgekit.graph.onnx_import import import_onnx
    from edgekit.mixed.plan import plan_mixed
    from edgekit.mixed.sensitivity import Sensitivity
    from edgekit.quant.calibrate import collect

    stored = mixed_export[1]["mixed"]["sensitivity"]["values"]
    values = {k: {int(b): v for b, v in d.items()} for k, d in stored.items()}
    graph = import_onnx(RESNET8)
    stats = collect(graph, small_calib[1], progress=False)
    qm, report = plan_mixed(graph, small_calib[1], max_bops=0.7, stats=stats, sens=Sensitivity("hessian", values, 0.0))
    m = report["mixed"]
    assert m["achieved"]["bops_fraction"] <= 0.7 and m["budget"]["max_bops_fraction"] == 0.7
    assert {n.name: n.attrs["weight_bits"] for n in qm.nodes if "weight" in n.params} == m["bits"]


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = np.clip(p, 1e-12, 1), np.clip(q, 1e-12, 1)
    return float((p * np.log(p / q)).sum(-1).mean())


def test_mixed_beats_int4_and_random_and_stays_near_int8(
    mixed_export, resnet8_int8, resnet8_int4, small_calib, cifar_test
):
    from edgekit.graph.float_exec import run_graph
    from edgekit.graph.onnx_import import import_onnx
    from edgekit.mixed.ilp import residual_ties
    from edgekit.mixed.plan import quantize_with_bits, random_allocation
    from edgekit.qmodel import load
    from edgekit.quant.calibrate import collect

    qm = load(mixed_export[0])
    x, y = cifar_test[0][:SUBSET].astype(np.float32), cifar_test[1][:SUBSET]
    graph = import_onnx(RESNET8)
    ref = run_graph(graph, {graph.inputs[0]: x}, keep=set())[graph.outputs[0]]
    stats = collect(graph, small_calib[1], progress=False)
    params = {n.name: n.attrs["weight"].size for n in graph.nodes if n.op in ("conv2d", "dense")}
    rand_bits = random_allocation(
        params,
        residual_ties(graph),
        max_bytes=qm.weight_bytes(),
        min_bytes=qm.weight_bytes() - 0.05 * sum(params.values()),
        seed=0,
    )
    models = {
        "int8": resnet8_int8,
        "mixed": qm,
        "int4": resnet8_int4,
        "random": quantize_with_bits(graph, rand_bits, stats, calib=small_calib[1]),
    }
    top1, kl = {}, {}
    for name, m in models.items():
        p = m.run(x)["Identity"]
        top1[name] = float((p.argmax(1) == y).mean())
        kl[name] = _kl(ref, p)
    print({"top1": top1, "kl_to_float": kl})
    # On 2000 images top-1 carries ~1 point of sampling noise (the full-set claims -- <= 1.0 point
    # from int8, above int4 and random -- are tools/bench_mixed.py's); KL to the float model's output
    # distribution is the steady signal here.
    assert top1["mixed"] >= top1["int8"] - 0.015, top1
    assert kl["mixed"] < 0.5 * kl["random"] and kl["mixed"] < 0.25 * kl["int4"], kl
