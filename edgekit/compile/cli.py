"""``edgekit compile`` and ``edgekit targets``."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _progress(quiet: bool):
    t0 = time.time()

    def say(msg: str) -> None:
        if not quiet:
            print(f"[{time.time() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


def cmd_compile(args: argparse.Namespace) -> int:
    from . import compile_model

    rpc = None
    if args.rpc_tracker:
        rpc = {"tracker": args.rpc_tracker, "key": args.rpc_key, "timeout": args.rpc_timeout}
    verify: bool | str = "auto" if args.verify == "auto" else args.verify == "yes"
    res = compile_model(
        args.model,
        args.target,
        args.output,
        tune=args.tune,
        trials=args.trials,
        batch=args.batch,
        targets_dir=args.targets_dir,
        tuning_dir=args.tuning_dir,
        rpc=rpc,
        verify=verify,
        tune_options={"search": args.search},
        progress=_progress(args.json),
    )
    if args.json:
        print(json.dumps({"artifact": str(res.path), "seconds": round(res.seconds, 2), **res.manifest}, indent=1))
    else:
        ex = res.manifest["extra"]
        v = ex.get("verified")
        vs = "not checked here" if not v else f"{v['mismatches']} mismatches in {v['values']} values ({v['how']})"
        print(
            f"wrote {res.path}: target {res.manifest['target']}, tuned={ex['tuned']}, "
            f"weights {ex['weight_bytes']} B, bit-exact check: {vs}, {res.seconds:.1f}s"
        )
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from .targets import list_targets

    found = list_targets(args.targets_dir)
    if args.json:
        print(
            json.dumps(
                {
                    n: {
                        "description": t.description,
                        "arch": t.arch,
                        "tvm": t.tvm,
                        "toolchain": t.toolchain,
                        "runtime": t.runtime,
                        "device": t.device,
                        "source": t.source,
                    }
                    for n, t in sorted(found.items())
                },
                indent=1,
            )
        )
        return 0
    rows = [("name", "arch", "cpu / features", "threads", "qemu cpu", "compiler", "file")]
    for n, t in sorted(found.items()):
        feat = " ".join([t.tvm.get("mcpu", "")] + list(t.tvm.get("mattr", []))).strip()
        cc = ("NDK " if t.is_android else "") + str(t.toolchain.get("cc", ""))
        rows.append((n, t.arch, feat, str(t.threads), t.qemu_cpu or "-", cc, t.source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1])
    return 0


def register(subparsers) -> None:
    """Add the ``compile`` and ``targets`` subcommands."""
    c = subparsers.add_parser("compile", help="compile a quantized model (.ekq) with TVM into a deployable artifact")
    c.add_argument("model", help="the quantized model (.ekq)")
    c.add_argument("--target", "-t", default="host", help="target name (see `edgekit targets`) or a .toml file")
    c.add_argument("-o", "--output", default=None, help="artifact path (default MODEL.TARGET.tar)")
    c.add_argument("--tune", action="store_true", help="auto-tune with MetaSchedule (persistent database)")
    c.add_argument("--trials", type=int, default=64, help="total MetaSchedule trials (with --tune)")
    c.add_argument(
        "--search",
        choices=["evolutionary", "replay"],
        default="evolutionary",
        help="MetaSchedule search: evolutionary (cost model) or replay (random schedules, cheap)",
    )
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--targets-dir", default=None, help="extra directory of target TOML files")
    c.add_argument("--tuning-dir", default=None, help="tuning database (default ~/.cache/edgekit/tuning/TARGET)")
    c.add_argument("--rpc-tracker", default=None, help="HOST:PORT of a TVM RPC tracker: measure on the device")
    c.add_argument("--rpc-key", default=None, help="device key registered with the tracker")
    c.add_argument("--rpc-timeout", type=int, default=60, help="RPC session timeout in seconds")
    c.add_argument(
        "--verify",
        choices=["auto", "yes", "no"],
        default="auto",
        help="check bit-exactness against the reference (auto: when runnable here, natively or in qemu)",
    )
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compile)
    t = subparsers.add_parser("targets", help="list compile targets (built-in and your own TOML files)")
    t.add_argument("--targets-dir", default=None)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_targets)
