"""Torch converter vs the numpy float executor; Hutchinson traces vs the exact Hessian;
measured sensitivities on a small synthetic model."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.graph.float_exec import run_graph
from edgekit.graph.ir import Graph, Node

torch = pytest.importorskip("torch", reason="Hessian sensitivities need the torch extra (edgekit[torch])")

from edgekit.mixed.sensitivity import (  # noqa: E402
    hessian_sensitivity,
    hessian_traces,
    measured_sensitivity,
    weight_perturbation,
)
from edgekit.mixed.torch_graph import to_torch  # noqa: E402


def _conv(name, src, dst, o, i, k, rng, *, stride=1, pads=(1, 1, 1, 1), groups=1, act=None):
    attrs = {
        "weight": rng.normal(0, 0.4, (o, k, k, i // groups)).astype(np.float32),
        "bias": rng.normal(0, 0.1, o).astype(np.float32),
        "strides": [stride, stride],
        "dilations": [1, 1],
        "pads": list(pads),
        "groups": groups,
    }
    if act is not None:
        attrs["activation"] = act
    return Node("conv2d", name, [src], [dst], attrs)


def every_op_graph(seed: int = 0) -> Graph:
    rng = np.random.default_rng(seed)
    nodes = [
        _conv("c0", "x", "a", 8, 3, 3, rng, stride=2, pads=(0, 0, 1, 1), act=(0.0, np.inf)),
        _conv("dw", "a", "b", 8, 8, 3, rng, groups=8, act=(0.0, 6.0)),
        _conv("g2", "b", "c", 8, 8, 1, rng, pads=(0, 0, 0, 0), groups=2),
        Node("add", "add", ["a", "c"], ["d"], {"activation": (0.0, np.inf)}),
        Node("maxpool", "mp", ["d"], ["e"], {"kernel": [3, 3], "strides": [2, 2], "pads": [1, 1, 0, 0]}),
        Node("hardswish", "hs", ["e"], ["f"]),
        Node("mul", "mul", ["f", "k"], ["g"]),
        Node("sigmoid", "sg", ["g"], ["h"]),
        Node("concat", "cat", ["h", "e"], ["i"], {"axis": 3}),
        Node("pad", "pad", ["i"], ["j"], {"pads": [[0, 0], [1, 0], [0, 1], [0, 0]], "value": 0.0}),
        Node("avgpool", "ap", ["j"], ["l"], {"kernel": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]}),
        Node("clip", "clip", ["l"], ["m"], {"min": -1.0, "max": 0.8}),
        Node("relu", "relu", ["m"], ["m2"]),
        Node("transpose", "tr", ["m2"], ["n"], {"perm": [0, 3, 1, 2]}),
        Node("reshape", "flat", ["n"], ["o"], {"shape": [None, 16 * 2 * 2]}),
        Node(
            "dense",
            "fc",
            ["o"],
            ["p"],
            {
                "weight": rng.normal(0, 0.3, (5, 64)).astype(np.float32),
                "bias": rng.normal(0, 0.1, 5).astype(np.float32),
            },
        ),
        Node("softmax", "sm", ["p"], ["y"], {"axis": 1}),
    ]
    return Graph(
        "every",
        ["x"],
        ["y"],
        nodes,
        constants={"k": rng.uniform(0.5, 1.5, (1, 1, 1, 8)).astype(np.float32)},
        input_shapes={"x": [None, 11, 11, 3]},
    )


def test_torch_module_matches_the_float_executor():
    g = every_op_graph()
    x = np.random.default_rng(1).normal(0, 1, (4, 11, 11, 3)).astype(np.float32)
    ref = run_graph(g, {"x": x})["y"]
    with torch.no_grad():
        got = to_torch(g, logits=False)(torch.tensor(x)).numpy()
        logits = to_torch(g, logits=True)(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(torch.softmax(torch.tensor(logits), 1).numpy(), ref, atol=1e-5)


def tiny_mlp(seed: int = 0) -> Graph:
    rng = np.random.default_rng(seed)

    def dense(name, src, dst, o, i, act=None):
        attrs = {
            "weight": rng.normal(0, 0.6, (o, i)).astype(np.float32),
            "bias": rng.normal(0, 0.1, o).astype(np.float32),
        }
        if act:
            attrs["activation"] = act
        return Node("dense", name, [src], [dst], attrs)

    return Graph(
        "mlp",
        ["x"],
        ["y"],
        [
            dense("d0", "x", "h", 6, 5, (0.0, np.inf)),
            dense("d1", "h", "z", 4, 6),
            Node("softmax", "sm", ["z"], ["y"], {"axis": 1}),
        ],
        input_shapes={"x": [None, 5]},
    )


def test_hutchinson_traces_match_the_exact_hessian_blocks():
    g = tiny_mlp()
    x = np.random.default_rng(2).normal(0, 1, (64, 5)).astype(np.float32)
    est, info = hessian_traces(g, x, iters=400, min_iters=400, batch_size=64)
    assert info["hutchinson_probes"] == 400
    model = to_torch(g, logits=True)
    xt = torch.tensor(x)
    ref_logp = torch.log_softmax(model(xt), -1).detach()
    for i, name in enumerate(model.layer_names):
        w0 = model.weights[i].detach().clone()

        def kl(w, i=i):
            ws = [p.detach() for p in model.weights]
            ws[i] = w
            h = torch.relu(xt @ ws[0].t() + model.bias0)
            z = h @ ws[1].t() + model.bias1
            return torch.nn.functional.kl_div(
                torch.log_softmax(z, -1), ref_logp, log_target=True, reduction="batchmean"
            )

        hess = torch.autograd.functional.hessian(kl, w0)
        exact = float(hess.reshape(w0.numel(), w0.numel()).diagonal().sum()) / w0.numel()
        assert exact > 0
        assert est[name] == pytest.approx(exact, rel=0.15), name


def test_perturbation_shrinks_with_bits_and_sensitivity_is_non_negative():
    g = tiny_mlp(1)
    w = g.nodes[0].attrs["weight"]
    assert weight_perturbation(w, 4) > 20 * weight_perturbation(w, 8) > 0
    x = np.random.default_rng(3).normal(0, 1, (96, 5)).astype(np.float32)
    s = hessian_sensitivity(g, x, iters=6, batch_size=32)
    assert set(s.values) == {"d0", "d1"}
    for v in s.values.values():
        assert v[4] > v[8] >= 0
    assert s.to_json()["method"] == "hessian"


def test_measured_sensitivity_ranks_a_damaged_layer_first():
    from edgekit.quant.calibrate import collect

    g = every_op_graph(3)
    x = np.random.default_rng(4).normal(0, 1, (64, 11, 11, 3)).astype(np.float32)
    stats = collect(g, x, progress=False)
    s = measured_sensitivity(g, x, stats, max_samples=64)
    assert set(s.values) == {"c0", "dw", "g2", "fc"}
    base = s.details["int8_kl"]
    assert all(v[8] == base for v in s.values.values())
    assert all(np.isfinite(v[4]) for v in s.values.values())
