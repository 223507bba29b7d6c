"""The float graph IR: what importers produce and the quantizer consumes.

Operators are canonical and channels-last (NHWC) like the integer graph, so that layout is
settled once, at import. Weights live in ``attrs`` as numpy arrays; other constant operands
live in ``Graph.constants`` and are named in ``inputs``.

Ops: conv2d (weight [O,KH,KW,I/g], bias, strides, dilations, pads [t,l,b,r], groups),
dense (weight [O,K], bias; acts on the last axis), add, mul, relu, clip (min, max), sigmoid,
hardswish, maxpool / avgpool (kernel, strides, pads; avgpool never counts padding),
concat (axis), reshape (shape), transpose (perm), pad (pads [[b, a]...], value),
softmax (axis). conv2d, dense and add may carry ``activation`` = (lo, hi) after fusion.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """A float model: nodes in topological order over named tensors."""

    name: str
    inputs: list[str]
    outputs: list[str]
    nodes: list[Node]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    input_shapes: dict[str, list[int | None]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    _counter: itertools.count = field(default_factory=lambda: itertools.count(), repr=False)

    def fresh(self, base: str) -> str:
        """A tensor or node name not used yet."""
        return f"{base}__ek{next(self._counter)}"

    def producer(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out

    def rename_input(self, old: str, new: str) -> None:
        """Make every reader of tensor ``old`` (nodes and graph outputs) read ``new``."""
        for n in self.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
        self.outputs = [new if o == old else o for o in self.outputs]

    def toposort(self) -> None:
        ready = set(self.inputs) | set(self.constants)
        pending = list(self.nodes)
        ordered: list[Node] = []
        while pending:
            progressed = False
            for n in list(pending):
                if all(i in ready for i in n.inputs):
                    ordered.append(n)
                    ready.update(n.outputs)
                    pending.remove(n)
                    progressed = True
            if not progressed:
                names = ", ".join(n.name for n in pending[:5])
                raise ValueError(f"graph has a cycle or a missing input near: {names}")
        self.nodes = ordered

    def remove_dead(self) -> None:
        """Drop nodes whose outputs nobody reads, and unread constants."""
        live = set(self.outputs)
        kept: list[Node] = []
        for n in reversed(self.nodes):
            if any(o in live for o in n.outputs):
                kept.append(n)
                live.update(n.inputs)
        self.nodes = list(reversed(kept))
        self.constants = {k: v for k, v in self.constants.items() if k in live}
