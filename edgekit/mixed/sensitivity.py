"""Per-layer sensitivity to weight quantization, two ways.

* ``hessian``: HAWQ-V2/V3. The average Hessian trace of the loss with respect to the layer's
  weights (Hutchinson's estimator, Rademacher probes, Hessian-vector products by double
  backprop through ``torch_graph``) times the squared perturbation ``||Q_b(W) - W||^2`` of
  quantizing the weights to ``b`` bits with the dyadic quantizer's own rounding and clipping.
  The loss is KL(float model || model(W)) on the calibration data (which carry no labels in
  general): at the float weights its gradient is zero and its Hessian is the Gauss-Newton
  matrix, positive semi-definite, so traces are non-negative and ``1/2 dW^T H dW`` is the
  second-order change of exactly what ``measured`` computes. ``loss="ce"`` uses cross-entropy
  against the float model's predicted labels instead (HAWQ's loss, but not at a minimum here).
* ``measured``: the mean KL divergence between the float model's output distribution and the
  integer model's (reference executor) when only that layer is quantized to ``b`` bits and all
  the others stay at 8 bits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.graph.float_exec import run_graph
from edgekit.graph.ir import Graph
from edgekit.mixed.torch_graph import require_torch, to_torch, weighted_layers
from edgekit.quant.dyadic import quantize_graph, quantize_weights

BITS = (4, 8)


@dataclass
class Sensitivity:
    """``values[layer][bits]``: the cost of quantizing ``layer`` to ``bits`` (lower is better)."""

    method: str
    values: dict[str, dict[int, float]]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seconds": round(self.seconds, 3),
            "values": {k: {str(b): float(v) for b, v in d.items()} for k, d in self.values.items()},
            **self.details,
        }


def weight_perturbation(w: np.ndarray, bits: int) -> float:
    """``||Q_b(W) - W||^2`` with the dyadic per-channel quantizer."""
    q, s = quantize_weights(w, bits)
    deq = q.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1)).astype(np.float64)
    return float(((deq - w.astype(np.float64)) ** 2).sum())


def _inputs(graph: Graph, calib_x: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(calib_x, dict):
        return {k: np.asarray(calib_x[k], np.float32) for k in graph.inputs}
    return {graph.inputs[0]: np.asarray(calib_x, np.float32)}


def hessian_traces(
    graph: Graph,
    calib_x: np.ndarray | dict[str, np.ndarray],
    *,
    iters: int = 16,
    min_iters: int = 4,
    batch_size: int = 128,
    max_samples: int = 512,
    seed: int = 0,
    tol: float = 0.02,
    loss: str = "kl",
) -> tuple[dict[str, float], dict[str, Any]]:
    """Average Hessian trace per weighted layer (trace / number of weights), Hutchinson's estimator.

    Each round uses one batch of the calibration data (cycling) and one Rademacher probe per layer
    (``v_l^T H_ll v_l``: an unbiased estimate of the block's trace); stops early when every layer's
    running mean moved by less than ``tol`` (relative) in the last round, after ``min_iters``.
    """
    torch = require_torch()
    from torch.nn import functional as F  # noqa: N812

    feeds = _inputs(graph, calib_x)
    n = min(len(next(iter(feeds.values()))), max_samples)
    model = to_torch(graph, logits=True)
    model.eval()
    params = list(model.weights)
    xs = {k: torch.tensor(v[:n]) for k, v in feeds.items()}
    if loss not in ("kl", "ce"):
        raise ValueError(f"loss must be 'kl' or 'ce', got {loss!r}")
    with torch.no_grad():
        ref_logits = torch.cat([model(*[x[s : s + batch_size] for x in xs.values()]) for s in range(0, n, batch_size)])
    ref_logp = F.log_softmax(ref_logits, dim=-1)
    gen = torch.Generator().manual_seed(seed)
    sums = np.zeros(len(params))
    prev = np.zeros(len(params))
    starts = list(range(0, n, batch_size))
    done = 0
    for it in range(iters):
        s = starts[it % len(starts)]
        batch = [x[s : s + batch_size] for x in xs.values()]
        logp = F.log_softmax(model(*batch), dim=-1)
        target = ref_logp[s : s + batch_size]
        if loss == "kl":
            value = F.kl_div(logp, target, log_target=True, reduction="batchmean")
        else:
            value = F.nll_loss(logp, target.argmax(-1))
        grads = torch.autograd.grad(value, params, create_graph=True)
        # One probe per layer block: v_l^T H_ll v_l (>= 0 for a PSD H) has no cross-layer
        # terms, whose variance swamps small traces when all layers share one probe.
        for i, (g, p) in enumerate(zip(grads, params, strict=True)):
            v = torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1
            (hv,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=i < len(params) - 1)
            sums[i] += float((hv * v).sum())
        done = it + 1
        mean = sums / done
        if done >= min_iters and np.all(np.abs(mean - prev) <= tol * np.abs(mean) + 1e-12):
            break
        prev = mean
    traces = sums / done
    out = {name: float(traces[i] / params[i].numel()) for i, name in enumerate(model.layer_names)}
    return out, {"hutchinson_probes": done, "samples": n, "batch_size": batch_size, "loss": loss}


def hessian_sensitivity(
    graph: Graph, calib_x: np.ndarray | dict[str, np.ndarray], bits: tuple[int, ...] = BITS, **kw: Any
) -> Sensitivity:
    """HAWQ-V3 sensitivity: average Hessian trace x ||Q_b(W) - W||^2 per layer and bit width."""
    t0 = time.perf_counter()
    traces, info = hessian_traces(graph, calib_x, **kw)
    values: dict[str, dict[int, float]] = {}
    for node in weighted_layers(graph):
        w = np.asarray(node.attrs["weight"])
        values[node.name] = {b: traces[node.name] * weight_perturbation(w, b) for b in bits}
    return Sensitivity("hessian", values, time.perf_counter() - t0, {"avg_hessian_trace": traces, **info})


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = np.clip(p.astype(np.float64), 1e-12, 1.0)
    q = np.clip(q.astype(np.float64), 1e-12, 1.0)
    return float((p * (np.log(p) - np.log(q))).sum(-1).mean())


def _probs(y: np.ndarray) -> np.ndarray:
    """Treat outputs as probabilities when they already are (softmax epilogue), else softmax them."""
    y = y.astype(np.float64)
    if y.min() >= 0 and np.allclose(y.sum(-1), 1.0, atol=1e-3):
        return y
    e = np.exp(y - y.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def measured_sensitivity(
    graph: Graph,
    calib_x: np.ndarray | dict[str, np.ndarray],
    stats: dict,
    bits: tuple[int, ...] = BITS,
    max_samples: int = 500,
    observer: str = "minmax",
    layers: list[str] | None = None,
) -> Sensitivity:
    """KL(float || integer model with only ``layer`` at ``b`` bits, the rest at 8) on calibration data.

    The 8-bit entry of every layer is the KL of the all-int8 model (the common baseline).
    """
    t0 = time.perf_counter()
    feeds = {k: v[:max_samples] for k, v in _inputs(graph, calib_x).items()}
    out = graph.outputs[0]
    ref = _probs(run_graph(graph, feeds, keep=set())[out])
    x = feeds if len(feeds) > 1 else next(iter(feeds.values()))

    def kl_for(weight_bits: dict[str, int]) -> float:
        qm = quantize_graph(graph, feeds, weight_bits=weight_bits, observer=observer, stats=stats, progress=False)
        return _kl(ref, _probs(qm.run(x)[out]))

    base = kl_for({"*": 8})
    values: dict[str, dict[int, float]] = {}
    for node in weighted_layers(graph):
        if layers is not None and node.name not in layers:
            continue
        values[node.name] = {b: (base if b == 8 else kl_for({"*": 8, node.name: b})) for b in bits}
    return Sensitivity(
        "measured", values, time.perf_counter() - t0, {"samples": int(len(next(iter(feeds.values())))), "int8_kl": base}
    )
