"""Which residual adds the TVM lowering fuses into the epilogue of the conv2d producing one operand.

Pure graph logic (no TVM import): the lowering (``lower.py``) decides with it, and so does the mapping
of a compiled model's kernel outputs back to graph tensors (``edgekit.device.validate``), where a fused
conv has no kernel output of its own.
"""

from __future__ import annotations

from edgekit.qmodel import QuantModel

FUSED_SUFFIX = "_add"  # a fused kernel's family is the conv's family + this, named after the add node


def residual_fusions(qm: QuantModel) -> dict[str, tuple[str, int]]:
    """add node name -> (conv2d node name, operand index of the conv output in the add) for every add
    whose operand is produced by a groups == 1 conv2d that nothing else reads (not a graph output, no
    other consumer) and whose other operand has the same shape (no broadcasting). The first such
    operand wins; the fused kernel then replaces both the conv's and the add's kernels."""
    producer = {o: n for n in qm.nodes for o in n.outputs}
    uses: dict[str, int] = {}
    for n in qm.nodes:
        for i in n.inputs:
            uses[i] = uses.get(i, 0) + 1
    outputs = {o.name for o in qm.outputs}
    plan: dict[str, tuple[str, int]] = {}
    for n in qm.nodes:
        if n.op != "add" or len(n.inputs) != 2 or n.inputs[0] == n.inputs[1]:
            continue
        shapes = [tuple(qm.tensors[t].shape) if t in qm.tensors else None for t in n.inputs]
        if shapes[0] is None or shapes[0] != shapes[1]:
            continue
        for k, t in enumerate(n.inputs):
            p = producer.get(t)
            if (
                p is not None
                and p.op == "conv2d"
                and int(p.attrs.get("groups", 1)) == 1
                and uses.get(t, 0) == 1
                and t not in outputs
            ):
                plan[n.name] = (p.name, k)
                break
    return plan
