#!/usr/bin/env python3
"""A real quantized language model (e.g. SmolLM2-135M W8A8) generating on a device through the
device runner, its tokens checked against the host integer executor.

    python tools/bench_llm_device.py --model LM.ekq [--device URL] [--tokens 4] [--prompt TEXT] [--json]

Without ``--device`` it brings up the emulated Raspberry Pi (``tools/emulated-pi up``, root, qemu-user
with QEMU_CPU=cortex-a72) and takes it down afterwards unless it was already up. Reports upload, load,
prefill and per-token decode times on the device clock (under emulation: only "it runs, correctly";
emulated timings say nothing about a real Pi) and whether the device's tokens equal the host's.
Not a CI test: a 135M model takes minutes under qemu.

Measured (2026-11-22, shared 2-core x86 host under load, emulated Pi 4: qemu-user cortex-a72), SmolLM2-135M
MobileQuant W8A8 (h 16-bit), prompt "The capital of France is" (5 tokens), 4 new tokens, device text " Paris.\n\n",
tokens identical to the host executor in both runs:

| linears                         | artifact | upload | load  | prefill (5 tok) | decode      | 4 tokens |
|---------------------------------|----------|--------|-------|-----------------|-------------|----------|
| numpy (qlm)                     | 119 MB   | 7-9 s  | 5 s   | 27-30 s         | 7.2-7.4 s/t | 49-53 s  |
| TVM rpi4 kernels (NEON, ctypes) | 256 MB   | 29 s   | 6.8 s | 4.0 s           | 0.79 s/t    | 6.4 s    |

(--compile-target rpi4 adds ~4 min of packing here: importing TVM's tensor intrinsics and building 211 kernels.)
Emulated timings say nothing about a real Pi; the ratio says the linears were most of the numpy time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekit.device.deploy import deploy  # noqa: E402
from edgekit.device.transports import open_session  # noqa: E402
from edgekit.llm.artifact import pack_lm_artifact, validate_lm  # noqa: E402
from edgekit.llm.qlm import load_lm  # noqa: E402

TOOL = ROOT / "tools" / "emulated-pi"
# an emulated Pi of its own (others' test sessions bring the default one up and down)
os.environ.setdefault("EDGEKIT_PI_DIR", str(Path.home() / ".cache" / "edgekit" / "emulated-pi-llm"))


def pi_up() -> tuple[dict, bool]:
    st = subprocess.run([str(TOOL), "status"], capture_output=True, text=True, timeout=60)
    state = json.loads(st.stdout or "{}") if st.returncode == 0 else {}

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False

    was_up = bool(state.get("urls")) and all(alive(p) for p in state.get("pids", {}).values())
    r = subprocess.run([str(TOOL), "up"], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"emulated-pi up failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]), was_up


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="an edgekit.lm .ekq (edgekit export MODEL.gguf ... -o LM.ekq)")
    p.add_argument("--device", help="device URL (default: the emulated Pi over SSH)")
    p.add_argument("--tokens", type=int, default=4, help="new tokens to generate (greedy)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--compile-target", help="also run the linears as TVM kernels compiled for this target (rpi4...)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    t0 = time.monotonic()
    qm = load_lm(args.model)
    ids = qm.tokenizer.encode(args.prompt).ids if qm.tokenizer is not None else list(range(1, 9))
    url, was_up = (args.device, True) if args.device else (None, True)
    if url is None:
        urls, was_up = pi_up()
        url = urls["ssh"]
    report: dict = {"model": str(args.model), "prompt": args.prompt, "prompt_ids": ids, "new_tokens": args.tokens}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t1 = time.monotonic()
            art = pack_lm_artifact(
                qm, Path(tmp) / "lm.tar", max_new_tokens=args.tokens, prompt_ids=ids, compile_target=args.compile_target
            )
            report["pack_s"] = time.monotonic() - t1
            report["linears"] = f"TVM ({args.compile_target})" if args.compile_target else "numpy (qlm)"
            report["artifact_mb"] = art.stat().st_size / 1e6
            with open_session(url, timeout=args.timeout) as s:
                probe = s.probe()
                report["device"] = {"url": url.split("?")[0], "arch": probe["arch"], "cpu": probe.get("cpu")}
                dep = deploy(s, art)
                report["upload_s"] = dep.seconds
                t1 = time.monotonic()
                loaded = s.load(dep.sha256)
                report["load_ms"] = loaded["load_ms"]
                report["load_wall_s"] = time.monotonic() - t1
                rep = validate_lm(s, art, [ids], reference=qm, timeout=args.timeout)
    finally:
        if not args.device and not was_up:
            subprocess.run([str(TOOL), "down"], capture_output=True, text=True, timeout=300)
    res = rep["results"][0]
    steps = res["step_ms"]
    report.update(
        tokens_identical=rep["tokens_identical"],
        tvm_kernel_calls=res["tvm_kernel_calls"],
        device_tokens=res["device"],
        host_tokens=res["host"],
        text=qm.tokenizer.decode(res["device"]) if qm.tokenizer is not None else None,
        prefill_ms=steps[0] if steps else None,
        decode_ms_per_token=(sum(steps[1:]) / len(steps[1:])) if len(steps) > 1 else None,
        generation_ms=rep["device_ms"][0],
        tokens_per_s=args.tokens / (rep["device_ms"][0] / 1e3),
        first_mismatch=rep["first_mismatch"],
        total_s=time.monotonic() - t0,
    )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['device']['url']} ({report['device']['arch']}): {args.model}")
        print(
            f"  upload {report['artifact_mb']:.0f} MB in {report['upload_s']:.1f} s, "
            f"load {report['load_ms'] / 1e3:.1f} s"
        )
        print(
            f"  prompt {len(ids)} tokens: prefill {report['prefill_ms'] / 1e3:.1f} s; decode "
            f"{(report['decode_ms_per_token'] or 0) / 1e3:.1f} s/token; {report['tokens_per_s']:.3f} tokens/s"
        )
        print(f"  linears: {report['linears']}; device text: {report['text']!r}")
        print(f"  tokens identical to the host integer executor: {report['tokens_identical']}")
        print(f"  total {report['total_s']:.0f} s")
    return 0 if report["tokens_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
