"""Per-layer latency tables for the ILP: every conv/dense layer alone, at each weight width,
compiled by ``edgekit.compile`` (TVM) and timed on the target.

* no device: the host target, timed in-process with TVM's ``time_evaluator`` (the host's
  compiled kernels; only meaningful for the host itself);
* with a device URL: the single-layer artifact is compiled for ``target`` and profiled on the
  device by ``edgekit.device.profile`` (median of on-device runs).

Entries are cached per target (and device) in ``~/.cache/edgekit/latency/<key>.json``
(``$EDGEKIT_CACHE`` moves the root), keyed by the layer's shape signature and width, so the same
layer shape is measured once. A whole-model overhead (everything but conv/dense, plus the call)
is the all-int8 model's time minus its layers' sum.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.graph.float_exec import infer_shapes
from edgekit.graph.ir import Graph, Node
from edgekit.mixed.torch_graph import weighted_layers
from edgekit.qmodel import QuantModel
from edgekit.quant.calibrate import TensorStats
from edgekit.quant.dyadic import quantize_graph


class LatencyError(EdgekitError):
    """Latency could not be measured on the requested target or device."""


def cache_dir() -> Path:
    root = Path(os.environ.get("EDGEKIT_CACHE", str(Path.home() / ".cache" / "edgekit")))
    return root / "latency"


def _key(target: str, device: str | None) -> str:
    base = target if device is None else f"{target}@{device}"
    slug = re.sub(r"[^0-9A-Za-z_.-]", "_", base)[:60]
    return f"{slug}-{hashlib.sha256(base.encode()).hexdigest()[:10]}"


def layer_signature(node: Node, in_shape: tuple[int, ...], bits: int) -> str:
    """What determines a layer's kernel time: op, shapes, conv geometry, width (not the values)."""
    a = node.attrs
    geo = [a.get(k) for k in ("strides", "dilations", "pads", "groups")]
    act = a.get("activation")
    return json.dumps(
        [
            node.op,
            list(np.asarray(a["weight"]).shape),
            list(in_shape[1:]),
            geo,
            None if act is None else [float(act[0]), float(act[1])],
            bits,
        ]
    )


def single_layer_graph(graph: Graph, node: Node, shapes: dict[str, tuple[int, ...]]) -> Graph:
    """A graph of just ``node``, reading its (intermediate) input as a graph input."""
    src = node.inputs[0]
    return Graph(
        name=f"layer_{len(node.name)}",
        inputs=[src],
        outputs=[node.outputs[0]],
        nodes=[Node(node.op, node.name, [src], list(node.outputs), dict(node.attrs))],
        input_shapes={src: [None, *shapes[src][1:]]},
        source=dict(graph.source),
    )


def _time_host(qm: QuantModel, target: str, number: int, repeat: int) -> float:
    """Median ms of the compiled model on this host (TVM time_evaluator, one thread)."""
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    import tvm
    from tvm import relax

    from edgekit.compile.build import build_library, sample_inputs
    from edgekit.compile.lower import lower
    from edgekit.compile.targets import get_target

    spec = get_target(target)
    if spec.arch != os.uname().machine:
        raise LatencyError(
            f"target {target!r} ({spec.arch}) cannot be timed on this {os.uname().machine} host: "
            "give --device URL to measure on the device"
        )
    lowered = lower(qm, 1)
    with tempfile.TemporaryDirectory(prefix="edgekit-latency-") as td:
        so = Path(td) / "layer.so"
        build_library(lowered, spec, so)
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())
        x = tvm.runtime.tensor(sample_inputs(lowered, 1)[0])
        timer = vm.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)
        res = timer(x)
        return float(np.median(np.asarray(res.results)) * 1e3)


def _time_device(qm: QuantModel, target: str, device: str, runs: int) -> float:
    from edgekit.compile import compile_model
    from edgekit.device.profile import profile
    from edgekit.device.transports import open_session

    with tempfile.TemporaryDirectory(prefix="edgekit-latency-") as td:
        art = compile_model(qm, target, Path(td) / "layer.tar", verify=False).path
        with open_session(device) as s:
            rep = profile(s, art, runs=runs, warmup=3)
    return float(rep["median_ms"])


def measure(
    qm: QuantModel, target: str = "host", device: str | None = None, *, number: int = 20, repeat: int = 5
) -> float:
    """Median latency (ms) of a QuantModel on ``target`` (this host) or on ``device``."""
    if device is None:
        return _time_host(qm, target, number, repeat)
    return _time_device(qm, target, device, number * repeat)


def latency_table(
    graph: Graph,
    stats: dict[str, TensorStats],
    *,
    target: str = "host",
    device: str | None = None,
    bits: tuple[int, ...] = (4, 8),
    use_cache: bool = True,
    progress: Any = None,
) -> tuple[dict[str, dict[int, float]], dict[str, Any]]:
    """{layer: {bits: ms}} for every conv/dense layer of ``graph``, plus facts about the run."""
    path = cache_dir() / f"{_key(target, device)}.json"
    cache: dict[str, float] = {}
    if use_cache and path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    shapes = infer_shapes(graph)
    table: dict[str, dict[int, float]] = {}
    measured = hits = 0
    t0 = time.perf_counter()
    for node in weighted_layers(graph):
        sub = single_layer_graph(graph, node, shapes)
        table[node.name] = {}
        for b in bits:
            sig = layer_signature(node, shapes[node.inputs[0]], b)
            if sig in cache:
                hits += 1
            else:
                qm = quantize_graph(sub, None, weight_bits=b, stats=stats, progress=False, bias_correction=False)
                try:
                    cache[sig] = measure(qm, target, device)
                except LatencyError:
                    raise
                except EdgekitError as exc:
                    raise LatencyError(
                        f"could not time layer {node.name!r} at {b} bits on {target}"
                        f"{'' if device is None else ' / ' + device}: {exc}"
                    ) from exc
                measured += 1
                if progress:
                    progress(f"latency {node.name[-40:]} @{b}b: {cache[sig]:.4f} ms")
            table[node.name][b] = cache[sig]
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        tmp.replace(path)
    info = {
        "target": target,
        "device": device,
        "cache": str(path),
        "measured": measured,
        "cache_hits": hits,
        "how": "device profile (median)" if device else "host TVM time_evaluator (median, 1 thread)",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return table, info


def model_latency(qm: QuantModel, target: str = "host", device: str | None = None) -> float:
    """Whole-model median latency (ms), measured the same way as the table."""
    return measure(qm, target, device)


def _cached(key: str, target: str, device: str | None, fn: Any) -> float:
    path = cache_dir() / f"{_key(target, device)}.json"
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key not in cache:
        cache[key] = fn()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        tmp.replace(path)
    return float(cache[key])


def cached_model_latency(qm: QuantModel, target: str = "host", device: str | None = None) -> float:
    """Whole-model latency, cached by the model's content hash."""
    return _cached(f"model:{qm.content_hash()}", target, device, lambda: model_latency(qm, target, device))


def model_overhead(
    graph: Graph,
    stats: dict[str, TensorStats],
    table: dict[str, dict[int, float]],
    *,
    target: str = "host",
    device: str | None = None,
) -> float:
    """Time of everything but the conv/dense layers: all-int8 model minus its layers' sum (>= 0)."""
    qm8 = quantize_graph(graph, None, weight_bits=8, stats=stats, progress=False)
    total = cached_model_latency(qm8, target, device)
    return max(0.0, total - sum(t[8] for t in table.values()))
