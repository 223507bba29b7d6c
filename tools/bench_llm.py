#!/usr/bin/env python3
"""Benchmark (not a test): SmolLM2-135M on WikiText-2 test, float vs RTN W8A8 vs SmoothQuant W8A8 vs
MobileQuant-style W8A8 and W4A8, every quantized model run by the integer reference executor; and
all-MiniLM-L6-v2 W8A8 sentence-embedding cosine to float.

Data split (disjoint, stated in the table): evaluation = the first ``--eval-tokens`` tokens of
``wikitext2_test.txt``; calibration = tokens of its last ``--calib-chars`` characters (the file is 1.26M
characters, evaluation uses its first ~20k). Perplexity: non-overlapping windows of ``--window`` tokens,
each scored from its own start; every model sees exactly the same tokens.

    python tools/bench_llm.py --out /tmp/bench_llm.md            # full run (~1 h on 2 busy cores)
    python tools/bench_llm.py --eval-tokens 512 --steps 5 --quick  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_test.txt"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(DATA))
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-chars", type=int, default=120_000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--time-budget", type=float, default=1380.0, help="seconds of learning per learned model")
    ap.add_argument("--configs", default="float,rtn-w8a8,smoothquant-w8a8,mobilequant-w8a8,mobilequant-w4a8")
    ap.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="int4 weight group size (default 32 for 4-bit weights; 0 = per channel)",
    )
    ap.add_argument("--gptq", action="store_true", help="round group-wise int4 weights with GPTQ")
    ap.add_argument(
        "--integer-ops",
        action="store_true",
        help="also evaluate each quantized model with integer RMSNorm/RoPE/softmax",
    )
    ap.add_argument("--act16-extra", default="", help="comma list of tensors added to the 16-bit list")
    ap.add_argument("--minilm", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--save-dir", default=None)
    ap.add_argument("--out", default="/tmp/bench_llm.md")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from edgekit.llm.api import perplexity, quantize_lm, tokenize
    from edgekit.llm.model import load_gguf, smollm2_gguf_path
    from edgekit.llm.qlm import DEFAULT_ACT16

    t0 = time.time()
    model = load_gguf(smollm2_gguf_path())
    text = Path(args.text).read_text(encoding="utf-8")
    eval_ids = tokenize(model.tokenizer, text[: args.eval_tokens * 8])[: args.eval_tokens]
    calib_ids = tokenize(model.tokenizer, text[-args.calib_chars :])
    eval_chars = len(model.tokenizer.decode(eval_ids.tolist()))
    split = (
        f"eval: first {len(eval_ids)} tokens (~{eval_chars} chars) of {Path(args.text).name}; calibration: "
        f"{min(len(calib_ids), args.seq_len * args.calib_seqs)} tokens from its last {args.calib_chars} chars "
        f"(chars {len(text) - args.calib_chars}..{len(text)})"
    )
    print(split, flush=True)
    act16 = tuple(DEFAULT_ACT16) + tuple(a for a in args.act16_extra.split(",") if a)
    rows = []
    log = print
    for cfg in args.configs.split(","):
        t1 = time.time()
        if cfg == "float":
            r = perplexity(model, eval_ids, args.window)
            rows.append({"config": cfg, **r, "quant_seconds": 0.0, "peak_mb": peak_mb()})
        else:
            scheme, bits = cfg.rsplit("-", 1)
            wb = int(bits[1])
            qm, rep = quantize_lm(
                model,
                scheme,
                calib_ids,
                weight_bits=wb,
                act_bits=8,
                act16=act16,
                group_size=args.group_size,
                gptq=args.gptq,
                seq_len=args.seq_len,
                n_seqs=args.calib_seqs,
                steps=args.steps,
                lr=args.lr,
                time_budget_s=args.time_budget,
                log=log,
            )
            qsec = time.time() - t1
            if args.save_dir:
                Path(args.save_dir).mkdir(parents=True, exist_ok=True)
                qm.save(Path(args.save_dir) / f"smollm2-{cfg}.ekq")
            r = perplexity(qm, eval_ids, args.window)
            rows.append(
                {
                    "config": cfg,
                    **r,
                    "quant_seconds": qsec,
                    "peak_mb": peak_mb(),
                    "report": rep,
                    "weight_mb": qm.weight_bytes() / 1e6,
                    "group_size": qm.meta.get("group_size", 0),
                    "gptq": bool(qm.meta.get("gptq")),
                }
            )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "report"}), flush=True)
        if args.integer_ops and cfg != "float":
            r = perplexity(qm, eval_ids, args.window, integer_ops=True)
            rows.append(
                {
                    **rows[-1],
                    **r,
                    "config": cfg + " (integer norm/RoPE/softmax)",
                    "quant_seconds": 0.0,
                    "peak_mb": peak_mb(),
                }
            )
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "report"}), flush=True)
    fppl = next((r["perplexity"] for r in rows if r["config"] == "float"), None)
    lines = [
        "# edgekit.llm benchmark: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized) on WikiText-2 test",
        "",
        f"- {split}",
        f"- perplexity windows: {args.window} tokens, non-overlapping; integer reference executor "
        f"for every quantized model; 16-bit tensors: {', '.join(act16)}; everything else int8",
        f"- learning: seq {args.seq_len} x {args.calib_seqs} windows, lr {args.lr}, <= {args.steps} steps, "
        f"budget {args.time_budget:.0f} s per model, torch threads {args.threads}",
        "",
        "| config | group | tokens | predicted | perplexity | vs float | weight MB | quantize s | eval s "
        "| peak RSS MB | learn steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = "" if fppl is None else f"{100 * (r['perplexity'] / fppl - 1):+.2f}%"
        steps = r.get("report", {}).get("learn", {}).get("steps", "")
        wmb = f"{r['weight_mb']:.2f}" if "weight_mb" in r else ""
        name = r["config"] + (" +GPTQ" if r.get("gptq") else "")
        lines.append(
            f"| {name} | {r.get('group_size') or ''} | {r['tokens']} | {r['predicted']} | "
            f"{r['perplexity']:.3f} | {rel} | {wmb} | {r['quant_seconds']:.0f} | {r['seconds']:.0f} | "
            f"{r['peak_mb']:.0f} | {steps} |"
        )
    if args.minilm:
        from edgekit.llm.bert import minilm_cosine

        t1 = time.time()
        res = minilm_cosine(text, log=log)
        lines += [
            "",
            "## all-MiniLM-L6-v2 W8A8 (integer executor) vs float sentence embeddings",
            "",
            f"- {res['split']}",
            f"- mean cosine {res['mean_cosine']:.5f}, min {res['min_cosine']:.5f} over "
            f"{res['sentences']} sentences ({time.time() - t1:.0f} s)",
        ]
    lines += ["", f"total {time.time() - t0:.0f} s, peak RSS {peak_mb():.0f} MB"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
