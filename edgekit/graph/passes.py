"""Canonicalisation passes on the float IR, each a small function that rewrites in place."""

from __future__ import annotations

import numpy as np

from edgekit.graph.float_exec import infer_shapes
from edgekit.graph.ir import Graph, Node

UNARY = {"relu", "clip", "sigmoid", "hardswish"}
MAX_ROUNDS = 10_000


def canonicalize(graph: Graph) -> Graph:
    graph.toposort()
    graph.remove_dead()
    optimize_layout(graph)
    fold_affine(graph)
    fuse_activations(graph)
    graph.remove_dead()
    return graph


def _bypass(graph: Graph, node: Node, src: str) -> None:
    """Remove ``node`` (an identity), making its readers read ``src``. A graph output keeps
    its name: the producer of ``src`` is renamed instead when it has no other reader."""
    out = node.outputs[0]
    graph.nodes.remove(node)
    if out in graph.outputs and src not in graph.inputs and src not in graph.outputs:
        readers = [n for n in graph.nodes if src in n.inputs]
        if not readers:
            for n in graph.nodes:
                n.outputs = [out if o == src else o for o in n.outputs]
            return
    if out in graph.outputs:
        graph.nodes.append(Node("reshape", node.name, [src], [out], {"shape": None}))
        graph.toposort()
        return
    graph.rename_input(out, src)


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _pull_constant(graph: Graph, name: str, rank: int, perm: list[int], base: str) -> str:
    """The constant c' with transpose(c', perm) == broadcast-to-rank(c)."""
    c = graph.constants[name]
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    new = graph.fresh(base)
    graph.constants[new] = np.ascontiguousarray(np.transpose(c, _inverse(perm)))
    return new


def _push_once(graph: Graph) -> bool:
    prod = graph.producer()
    cons = graph.consumers()
    shapes: dict[str, tuple[int, ...]] | None = None
    for n in graph.nodes:
        if n.op == "reshape":
            src = prod.get(n.inputs[0])
            if src is not None and src.op == "reshape" and len(cons.get(src.outputs[0], [])) == 1:
                n.inputs = [src.inputs[0]]
                if n.attrs["shape"] is None:
                    n.attrs["shape"] = src.attrs["shape"]
                return True
            shapes = shapes or infer_shapes(graph)
            if shapes[n.inputs[0]] == shapes[n.outputs[0]]:
                _bypass(graph, n, n.inputs[0])
                return True
            continue
        if n.op != "transpose":
            continue
        out = n.outputs[0]
        perm = n.attrs["perm"]
        src = prod.get(n.inputs[0])
        if src is not None and src.op == "transpose":
            composed = [src.attrs["perm"][q] for q in perm]
            if composed == list(range(len(composed))):
                _bypass(graph, n, src.inputs[0])
            else:
                n.inputs = [src.inputs[0]]
                n.attrs["perm"] = composed
            return True
        shapes = shapes or infer_shapes(graph)
        in_shape = shapes[n.inputs[0]]
        if [d for d in perm if in_shape[d] != 1] == sorted(d for d in perm if in_shape[d] != 1):
            n.op, n.attrs = "reshape", {"shape": [None] + list(shapes[out][1:])}
            return True
        readers = cons.get(out, [])
        if len(readers) != 1 or out in graph.outputs:
            continue
        c = readers[0]
        if c.op in UNARY or c.op == "softmax":
            if c.op == "softmax":
                c.attrs["axis"] = perm[c.attrs["axis"]]
            _swap(graph, n, c, [n.inputs[0]])
            return True
        if c.op in ("add", "mul", "concat", "pad"):
            new_inputs = []
            for i in c.inputs:
                p = prod.get(i)
                if i in graph.constants:
                    new_inputs.append(_pull_constant(graph, i, len(perm), perm, i))
                elif p is not None and p.op == "transpose" and p.attrs["perm"] == perm:
                    new_inputs.append(p.inputs[0])
                else:
                    break
            else:
                if c.op == "concat":
                    c.attrs["axis"] = perm[c.attrs["axis"]]
                if c.op == "pad":
                    pads = [None] * len(perm)
                    for i, p in enumerate(perm):
                        pads[p] = c.attrs["pads"][i]
                    c.attrs["pads"] = pads
                _swap(graph, n, c, new_inputs)
                return True
    return False


def _swap(graph: Graph, t: Node, c: Node, new_inputs: list[str]) -> None:
    """Turn x -T-> y -c-> z into x -c-> z' -T-> z."""
    z = c.outputs[0]
    mid = graph.fresh(z + ":pre")
    c.inputs = new_inputs
    c.outputs = [mid]
    graph.nodes.append(Node("transpose", graph.fresh(t.name), [mid], [z], dict(t.attrs)))
    graph.toposort()
    graph.remove_dead()


def optimize_layout(graph: Graph) -> None:
    """Push transposes down through layout-agnostic ops and cancel inverse pairs."""
    for _ in range(MAX_ROUNDS):
        if not _push_once(graph):
            break
        graph.remove_dead()


def _channel_vector(graph: Graph, name: str, rank: int, channels: int) -> np.ndarray | None:
    """The per-output-channel vector a constant stands for, or None if it is not one."""
    c = graph.constants.get(name)
    if c is None:
        return None
    c = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if any(d != 1 for d in c.shape[:-1]) or c.shape[-1] not in (1, channels):
        return None
    return np.broadcast_to(c.reshape(-1), (channels,)).astype(np.float32)


def fold_affine(graph: Graph) -> None:
    """Fold per-channel Mul/Add constants (BatchNorm, MatMul+Add) into conv2d/dense."""
    changed = True
    while changed:
        changed = False
        cons = graph.consumers()
        shapes = None
        for p in graph.nodes:
            if p.op not in ("conv2d", "dense") or "activation" in p.attrs:
                continue
            readers = cons.get(p.outputs[0], [])
            if len(readers) != 1 or p.outputs[0] in graph.outputs:
                continue
            c = readers[0]
            if c.op not in ("mul", "add") or c.inputs[0] != p.outputs[0]:
                continue
            shapes = shapes or infer_shapes(graph)
            o = p.attrs["weight"].shape[0]
            v = _channel_vector(graph, c.inputs[1], len(shapes[p.outputs[0]]), o)
            if v is None:
                continue
            if c.op == "mul":
                p.attrs["weight"] = p.attrs["weight"] * v.reshape((-1,) + (1,) * (p.attrs["weight"].ndim - 1))
                p.attrs["bias"] = p.attrs["bias"] * v
            else:
                p.attrs["bias"] = p.attrs["bias"] + v
            p.attrs["weight"] = p.attrs["weight"].astype(np.float32)
            p.attrs["bias"] = p.attrs["bias"].astype(np.float32)
            _bypass(graph, c, p.outputs[0])
            graph.remove_dead()
            changed = True
            break


def fuse_activations(graph: Graph) -> None:
    """Fold Relu / Clip into the conv2d, dense or add that produces their input."""
    changed = True
    while changed:
        changed = False
        cons = graph.consumers()
        for p in graph.nodes:
            if p.op not in ("conv2d", "dense", "add"):
                continue
            readers = cons.get(p.outputs[0], [])
            if len(readers) != 1 or p.outputs[0] in graph.outputs or readers[0].op not in ("relu", "clip"):
                continue
            r = readers[0]
            lo, hi = (0.0, np.inf) if r.op == "relu" else (r.attrs["min"], r.attrs["max"])
            old = p.attrs.get("activation", (-np.inf, np.inf))
            p.attrs["activation"] = (max(lo, old[0]), min(hi, old[1]))
            _bypass(graph, r, p.outputs[0])
            changed = True
            break
