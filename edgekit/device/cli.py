"""``edgekit devices | deploy | profile | validate``: the device runner's subcommands.

``register(subparsers)`` adds them to the main CLI's argparse subparsers; each handler takes the
parsed ``args`` and returns an exit code. Errors are ``EdgekitError`` subclasses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgekit.device.errors import DeviceError

DEVICE_HELP = (
    "device URL: local://, ssh://user@host:port, adb://SERIAL, serial:///dev/ttyUSB0?baud=921600, "
    "rpc://tracker:port/key"
)


def _progress(label: str):
    def show(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            end = "\n" if done == total else "\r"
            print(f"{label}: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return show


def _open(args: argparse.Namespace):
    from edgekit.device.transports import open_session

    return open_session(args.device, timeout=args.timeout)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", "-d", required=True, help=DEVICE_HELP)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the device per request")
    p.add_argument("--json", action="store_true", help="print a JSON report instead of a table")


def cmd_devices(args: argparse.Namespace) -> int:
    """List adb devices and serial ports; probe --device URLs."""
    from edgekit.device.transports.adb import list_devices

    found: dict[str, Any] = {"adb": [], "serial": [], "probed": []}
    try:
        found["adb"] = list_devices()
    except DeviceError as exc:
        found["adb_error"] = str(exc)
    try:
        from serial.tools import list_ports

        found["serial"] = [{"port": p.device, "description": p.description} for p in list_ports.comports()]
    except ImportError:
        found["serial_error"] = "pyserial is not installed"
    for url in args.device or []:
        from edgekit.device.transports import open_session

        with open_session(url, timeout=args.timeout) as s:
            found["probed"].append({"url": url, **s.probe()})
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    print("adb devices:" + ("" if found["adb"] else " none"))
    for d in found["adb"]:
        print(f"  adb://{d['serial']}  {d['state']}  {d.get('model', '')}")
    print("serial ports:" + ("" if found["serial"] else " none"))
    for p in found["serial"]:
        print(f"  serial://{p['port']}  {p['description']}")
    for p in found["probed"]:
        rts = ", ".join(k for k, v in p.get("runtimes", {}).items() if v)
        cpu = p.get("cpu", {})
        cpu_text = cpu.get("Model") or cpu.get("model name") or cpu.get("CPU part", "?")
        mem = (p.get("mem_available_kib") or 0) / 1024
        print(
            f"{p['url'].split('?')[0]}: {p['arch']}, {cpu_text}, {mem:.0f} MiB free, runtimes: {rts}, "
            f"agent {p.get('agent_version')}"
        )
    return 0


def _artifact(path: str, data: str | None = None) -> tuple[str, str | Path | None]:
    """What the device commands accept: an artifact ``.tar``; an ``edgekit.lm`` ``.ekq`` (packed as an
    ``lm`` artifact, with its example prompt as data); a bare ``.tflite`` / ``.onnx`` / CNN ``.ekq``
    (packed for LiteRT / onnxruntime / the reference executor)."""
    from edgekit.device.artifacts import model_file_artifact
    from edgekit.llm.artifact import device_artifact

    art, data = device_artifact(path, data)
    if art == str(path):
        art = str(model_file_artifact(path) or path)
    return art, data


def cmd_deploy(args: argparse.Namespace) -> int:
    from edgekit.device.deploy import deploy

    with _open(args) as s:
        res = deploy(s, _artifact(args.artifact)[0], progress=_progress("upload"), force=args.force)
    if args.json:
        print(json.dumps(res.to_json(), indent=1))
    else:
        what = f"uploaded {res.bytes} bytes" if res.uploaded else "already on the device (cache hit)"
        print(f"deployed {Path(args.artifact).name} [{res.runtime}] {res.sha256[:12]}: {what} in {res.seconds:.1f} s")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from edgekit.device import profile as prof
    from edgekit.llm.artifact import add_token_rates  # LMs: tokens/s reported

    reports = []
    with _open(args) as s:
        for given in args.artifact:
            artifact, data = _artifact(given, args.input)
            report = prof.profile(
                s, artifact, runs=args.runs, warmup=args.warmup, threads=args.threads, data=data, timeout=args.timeout
            )
            report = add_token_rates(report)
            report["artifact"] = given  # the file the user named, not the packed copy in the cache
            reports.append(report)
    if args.png:
        prof.render_png(reports, args.png)
    if args.json:
        print(prof.to_json(reports))
    else:
        print(prof.render_table(reports), end="")
        if args.png:
            print(f"plot: {args.png}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from edgekit.device.validate import validate

    with _open(args) as s:
        report = validate(
            s,
            _artifact(args.artifact)[0],
            args.data,
            reference=args.reference,
            float_model=args.float_model,
            batch=args.batch,
            limit=args.limit,
            progress=_progress("validate"),
        )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['n']} samples on {report['device'].split('?')[0]} [{report['runtime']}]")
        print(
            f"  bit-exact vs host reference: {report['bit_exact_fraction']:.2%} (max diff {report['max_lsb_diff']} LSB)"
        )
        if report.get("top1_agreement_float") is not None:
            print(
                f"  vs float model: top-1 agreement {report['top1_agreement_float']:.2%}, "
                f"SQNR {report['sqnr_db']:.1f} dB, cosine {report['cosine']:.4f}"
            )
        if "top1" in report:
            print(f"  top-1 accuracy: {report['top1']:.2%}")
        mm = report.get("first_mismatch")
        if mm:
            where = mm.get("note")
            if mm.get("layer"):
                where = f"layer {mm['layer']!r} ({mm['op']}), max diff {mm['max_lsb_diff']} LSB"
            print(f"  first mismatch: sample {mm['index']}: {where}")
    return 0 if report["bit_exact_fraction"] == 1.0 or args.allow_mismatch else 1


def register(subparsers: Any) -> None:
    """Add ``devices``, ``deploy``, ``profile``, ``validate`` to the main CLI."""
    p = subparsers.add_parser("devices", help="list adb devices and serial ports; probe devices")
    p.add_argument("--device", "-d", action="append", help="probe this device (repeatable): " + DEVICE_HELP)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a device")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_devices)

    p = subparsers.add_parser("deploy", help="upload an artifact to a device (atomic, cached)")
    p.add_argument("artifact")
    _add_common(p)
    p.add_argument("--force", action="store_true", help="upload even if the device has it cached")
    p.set_defaults(func=cmd_deploy)

    p = subparsers.add_parser("profile", help="time an artifact on a device (several side by side)")
    p.add_argument("artifact", nargs="+", help="one or more artifacts (e.g. the LiteRT and onnxruntime exports)")
    _add_common(p)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="runtime threads (0: runtime default)")
    p.add_argument("--input", help=".npz whose first sample is the input (default: random)")
    p.add_argument("--png", help="write a latency histogram and per-layer plot here")
    p.set_defaults(func=cmd_profile)

    p = subparsers.add_parser("validate", help="compare device outputs with the host reference, float model, labels")
    p.add_argument("artifact")
    _add_common(p)
    p.add_argument("--data", required=True, help=".npz with x (and y labels)")
    p.add_argument("--reference", help="the .ekq the artifact was built from (default: reference.ekq inside it)")
    p.add_argument("--float", dest="float_model", help="float ONNX model (default: the quantized model's source)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--limit", type=int, help="validate only the first N samples")
    p.add_argument("--allow-mismatch", action="store_true", help="exit 0 even if not bit-exact")
    p.set_defaults(func=cmd_validate)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (the main CLI wires ``register`` itself)."""
    from edgekit.errors import EdgekitError

    parser = argparse.ArgumentParser(prog="edgekit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EdgekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
