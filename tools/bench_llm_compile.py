#!/usr/bin/env python3
"""A real QuantLM's linear layers compiled through TVM for the host and the Raspberry Pi targets,
bit-exact against ``qlm`` on the real activations of a prompt, and timed (one decode step).

    python tools/bench_llm_compile.py --model LM.ekq [--targets host,rpi5,rpi4] [--layers 0] [--head] [--json]

Host timings are native; Raspberry Pi timings run under qemu-user (only "it runs, correctly":
emulated timings say nothing about a real Pi). The numpy column is ``qlm.int_linear`` (+ ``rescale_to``)
for the same linears on this host, the integer executor's cost for them.

Measured (2026-11-22, shared loaded 2-core Zen 5 host), SmolLM2-135M MobileQuant W8A8, the first prompt token's
real activations, every output bit-exact with qlm:

| linears of one decode step        | qlm numpy (host) | host VNNI | rpi5 sdot (qemu a76) | rpi4 NEON (qemu a72) |
|-----------------------------------|------------------|-----------|----------------------|----------------------|
| layer 0 + lm_head                 | 154 ms           | 1.0 ms    | 82 ms                | 113 ms               |
| all 30 layers + lm_head (211)     | 514 ms           | 9.6 ms    | 140 ms               |                      |
| same, one-row GEMM tile 1 x 8 (later run) | 179 ms  | 6.0 ms    |                      |                      |
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekit.llm.compile import compile_linears, trace_inputs, verify_linears  # noqa: E402
from edgekit.llm.qlm import load_lm  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--targets", default="host,rpi5,rpi4")
    p.add_argument("--layers", default="0", help="comma-separated decoder layers, or 'all'")
    p.add_argument("--head", action="store_true", help="also the lm_head (16-bit input)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    qm = load_lm(args.model)
    layers = list(range(qm.config.layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    ids = qm.tokenizer.encode("The capital of France is").ids if qm.tokenizer is not None else list(range(1, 9))
    rows = []
    for target in args.targets.split(","):
        c = compile_linears(qm, target, layers=layers, head=args.head, tokens=1)
        acts = trace_inputs(qm, np.asarray(ids[:1]), c.lowered.layout)  # the first token's real activations
        ver = verify_linears(c, [acts])
        _, median_us = c.run([acts], repeats=args.repeats)
        rows.append(
            {
                "target": target,
                "intrin": c.lowered.intrin,
                "build_s": round(c.seconds, 1),
                "weight_mb": c.lowered.weight_bytes / 1e6,
                "bit_exact": ver["mismatches"] == 0,
                "values": ver["values"],
                "how": ver["how"],
                "median_us": median_us,
            }
        )
    # numpy (qlm) for the same linears on this host
    t0 = time.perf_counter()
    n = 5
    for _ in range(n):
        for s in c.lowered.specs:
            s.reference(acts[s.input])
    numpy_us = (time.perf_counter() - t0) / n * 1e6
    report = {"model": args.model, "layers": layers, "head": args.head, "numpy_host_us": numpy_us, "targets": rows}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{args.model}: linears of layers {layers}{' + lm_head' if args.head else ''}, one decode step")
        print(f"  qlm numpy on this host: {numpy_us / 1e3:.2f} ms")
        for r in rows:
            print(
                f"  {r['target']:6s} {r['intrin'] or 'plain':28s} build {r['build_s']:6.1f} s  "
                f"bit-exact {r['bit_exact']} ({r['values']} values, {r['how']})  "
                f"{(r['median_us'] or 0) / 1e3:.2f} ms"
            )
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
