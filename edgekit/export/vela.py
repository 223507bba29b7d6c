"""Compile an exported int8 TFLite model for Arm Ethos-U NPUs with Vela, and parse its estimate.

Vela (``ethos-u-vela``) rewrites the supported part of the graph into one ``ethos-u`` custom
operator per NPU subgraph and leaves the rest for the CPU (TFLite Micro kernels). Its
performance estimate (cycles, inference time at the configured clock, SRAM and flash use
and traffic) comes from the summary CSV it writes; which operators run where comes from its
console report (``--show-cpu-operations``), with the reason Vela gives for each fallback.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

TARGETS = [
    "ethos-u55-32",
    "ethos-u55-64",
    "ethos-u55-128",
    "ethos-u55-256",
    "ethos-u65-256",
    "ethos-u65-512",
    "ethos-u85-128",
    "ethos-u85-256",
    "ethos-u85-512",
    "ethos-u85-1024",
    "ethos-u85-2048",
]
# (system config, memory mode) from Vela's Arm/vela.ini that fit each NPU family
DEFAULT_SYSTEM = {
    "ethos-u55": ("Ethos_U55_High_End_Embedded", "Shared_Sram"),
    "ethos-u65": ("Ethos_U65_High_End", "Dedicated_Sram"),
    "ethos-u85": ("Ethos_U85_SYS_DRAM_High", "Dedicated_Sram"),
}


class VelaError(EdgekitError):
    """Vela is missing, rejected the target or failed on the model."""


@dataclass
class OpPlacement:
    """One operator of the compiled graph and where it runs."""

    name: str
    op_type: str
    target: str  # "NPU" or "CPU"
    reason: str | None = None


@dataclass
class VelaEstimate:
    """Vela's performance estimate for one model on one NPU configuration."""

    target: str
    system_config: str
    memory_mode: str
    core_clock_hz: float
    cycles_total: int
    cycles_npu: int
    inference_time_s: float
    inferences_per_second: float
    macs: int
    sram_used_bytes: int
    dram_used_bytes: int
    on_chip_flash_used_bytes: int
    off_chip_flash_used_bytes: int
    sram_traffic_bytes: int
    dram_traffic_bytes: int
    on_chip_flash_traffic_bytes: int
    off_chip_flash_traffic_bytes: int
    original_weight_bytes: int
    npu_encoded_weight_bytes: int
    npu_ops: list[OpPlacement] = field(default_factory=list)
    cpu_ops: list[OpPlacement] = field(default_factory=list)
    compiled_model: str | None = None
    vela_version: str = ""
    summary_csv: dict[str, str] = field(default_factory=dict)

    @property
    def all_on_cpu(self) -> bool:
        return not self.npu_ops

    @property
    def inference_time_ms(self) -> float:
        return self.inference_time_s * 1e3

    def verdict(self) -> str:
        """One line a person can act on."""
        if self.all_on_cpu:
            return (
                f"NOTHING runs on the {self.target} NPU: all {len(self.cpu_ops)} operators fall back to the CPU "
                f"({', '.join(sorted({o.op_type for o in self.cpu_ops}))})"
            )
        cpu = (
            f"; {len(self.cpu_ops)} op(s) fall back to the CPU: "
            + ", ".join(f"{o.op_type} {o.name!r}" for o in self.cpu_ops)
            if self.cpu_ops
            else "; every operator runs on the NPU"
        )
        return (
            f"{self.target} @ {self.core_clock_hz / 1e6:.0f} MHz: {self.cycles_total} cycles, "
            f"{self.inference_time_ms:.3f} ms/inference, SRAM {self.sram_used_bytes / 1024:.1f} KiB, "
            f"DRAM {self.dram_used_bytes / 1024:.1f} KiB, "
            f"flash {(self.off_chip_flash_used_bytes + self.on_chip_flash_used_bytes) / 1024:.1f} KiB{cpu}"
        )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["all_on_cpu"] = self.all_on_cpu
        d["inference_time_ms"] = self.inference_time_ms
        d["verdict"] = self.verdict()
        d.pop("summary_csv")
        return d


def _vela_cmd() -> list[str]:
    exe = shutil.which("vela")
    if exe:
        return [exe]
    try:
        import ethosu.vela  # noqa: F401
    except ImportError as exc:
        raise VelaError(
            "Vela is not installed: `pip install ethos-u-vela==5.2.0` (or `pip install edgekit[vela]`)"
        ) from exc
    return [sys.executable, "-m", "ethosu.vela.vela"]


def vela_version() -> str:
    try:
        from importlib.metadata import version

        return version("ethos-u-vela")
    except Exception:  # noqa: BLE001
        return "unknown"


_LIST_RE = re.compile(r"^\s*(CPU|NPU): (\S+) = (.*?) \(outputs \[")
_WARN_RE = re.compile(r"operator: (\S+), ofm: '(.*)'")


def parse_console(text: str) -> tuple[list[OpPlacement], list[OpPlacement]]:
    """NPU and CPU operator lists (and fallback reasons) from Vela's console output."""
    reasons: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _WARN_RE.search(line)
        if m and "Warning" in line:
            reason = []
            for nxt in lines[i + 1 : i + 4]:
                if nxt.startswith(" ") or nxt.startswith("Reason") or nxt.startswith("-"):
                    reason.append(nxt.strip())
                else:
                    break
            reasons[m.group(2)] = f"{m.group(1)}: " + " ".join(r for r in reason if r)
    npu: list[OpPlacement] = []
    cpu: list[OpPlacement] = []
    seen: set[tuple[str, str, str]] = set()
    for line in lines:
        m = _LIST_RE.match(line)
        if not m:
            continue
        where, op_type, name = m.groups()
        key = (where, op_type, name)
        if key in seen:
            continue
        seen.add(key)
        reason = reasons.get(name) if where == "CPU" else None
        place = OpPlacement(name=name, op_type=op_type, target=where, reason=reason)
        (npu if where == "NPU" else cpu).append(place)
    return npu, cpu


def _cpu_ops_of_compiled(data: bytes, console_cpu: list[OpPlacement], text: str) -> list[OpPlacement]:
    """The operators left outside the ``ethos-u`` custom ops of the compiled model, by output name."""
    import tflite
    from tflite.BuiltinOperator import BuiltinOperator

    names = {v: k for k, v in BuiltinOperator.__dict__.items() if not k.startswith("_")}
    by_name = {o.name: o for o in console_cpu}
    reasons = {o.name: o.reason for o in console_cpu if o.reason}
    for m in _WARN_RE.finditer(text):
        reasons.setdefault(m.group(2), f"{m.group(1)}: unsupported by the NPU")
    model = tflite.Model.GetRootAsModel(data, 0)
    out: list[OpPlacement] = []
    sg = model.Subgraphs(0)
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        oc = model.OperatorCodes(op.OpcodeIndex())
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        if names.get(code) == "CUSTOM" and (oc.CustomCode() or b"").decode() == "ethos-u":
            continue
        tname = sg.Tensors(op.Outputs(0)).Name().decode() if op.OutputsLength() else f"op{i}"
        reason = reasons.get(tname) or (by_name[tname].reason if tname in by_name else None)
        out.append(OpPlacement(name=tname, op_type=names.get(code, str(code)), target="CPU", reason=reason))
    return out  # the compiled graph is the ground truth (U85's console may list ops it still maps to the NPU)


def _int(d: dict[str, str], k: str) -> int:
    try:
        return int(round(float(d.get(k, 0) or 0)))
    except ValueError:
        return 0


def compile_for_ethos_u(
    model: str | Path | bytes,
    target: str = "ethos-u55-128",
    *,
    out_dir: str | Path | None = None,
    system_config: str | None = None,
    memory_mode: str | None = None,
    config: str | None = None,
    optimise: str = "Performance",
    timeout: float = 600,
) -> VelaEstimate:
    """Run Vela on a .tflite (path or bytes) and return its parsed estimate.

    The compiled model (``*_vela.tflite``) is written to ``out_dir`` (a temporary folder if
    None, whose file is then gone: pass ``out_dir`` to keep it).
    """
    if target not in TARGETS:
        raise VelaError(f"unknown Ethos-U target {target!r}; choose one of: {', '.join(TARGETS)}")
    family = target.rsplit("-", 1)[0]
    sc_default, mm_default = DEFAULT_SYSTEM[family]
    system_config = system_config or sc_default
    memory_mode = memory_mode or mm_default
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgekit-vela-")
        out_dir = tmp.name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if isinstance(model, (bytes, bytearray)):
            src = out_dir / "model.tflite"
            src.write_bytes(bytes(model))
        else:
            src = Path(model)
            if not src.exists():
                raise VelaError(f"{src}: no such model file")
        cmd = _vela_cmd() + [
            str(src),
            "--accelerator-config",
            target,
            "--config",
            config or "Arm/vela.ini",
            "--system-config",
            system_config,
            "--memory-mode",
            memory_mode,
            "--optimise",
            optimise,
            "--output-dir",
            str(out_dir),
            "--show-cpu-operations",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise VelaError(f"Vela did not finish within {timeout:.0f} s on {src.name}") from exc
        text = proc.stdout + "\n" + proc.stderr
        if proc.returncode != 0:
            tail = "\n".join(text.strip().splitlines()[-15:])
            raise VelaError(f"Vela failed on {src.name} for {target} (exit {proc.returncode}):\n{tail}")
        summaries = sorted(out_dir.glob(f"{src.stem}_summary_*.csv"))
        if not summaries:
            raise VelaError(f"Vela wrote no performance summary for {src.name} in {out_dir}")
        with open(summaries[0], newline="") as f:
            row = next(csv.DictReader(f))
        npu, cpu = parse_console(text)
        compiled = out_dir / f"{src.stem}_vela.tflite"
        if compiled.exists():
            cpu = _cpu_ops_of_compiled(compiled.read_bytes(), cpu, text)
        est = VelaEstimate(
            target=target,
            system_config=row.get("system_config", system_config),
            memory_mode=row.get("memory_mode", memory_mode),
            core_clock_hz=float(row.get("core_clock", 0) or 0),
            cycles_total=_int(row, "cycles_total"),
            cycles_npu=_int(row, "cycles_npu"),
            inference_time_s=float(row.get("inference_time", 0) or 0),
            inferences_per_second=float(row.get("inferences_per_second", 0) or 0),
            macs=_int(row, "nn_macs"),
            sram_used_bytes=int(round(float(row.get("sram_memory_used", 0) or 0) * 1024)),
            dram_used_bytes=int(round(float(row.get("dram_memory_used", 0) or 0) * 1024)),
            on_chip_flash_used_bytes=int(round(float(row.get("on_chip_flash_memory_used", 0) or 0) * 1024)),
            off_chip_flash_used_bytes=int(round(float(row.get("off_chip_flash_memory_used", 0) or 0) * 1024)),
            sram_traffic_bytes=_int(row, "sram_total_bytes"),
            dram_traffic_bytes=_int(row, "dram_total_bytes"),
            on_chip_flash_traffic_bytes=_int(row, "on_chip_flash_total_bytes"),
            off_chip_flash_traffic_bytes=_int(row, "off_chip_flash_total_bytes"),
            original_weight_bytes=_int(row, "total_original_weights"),
            npu_encoded_weight_bytes=_int(row, "total_npu_encoded_weights"),
            npu_ops=npu,
            cpu_ops=cpu,
            compiled_model=str(compiled) if (compiled.exists() and tmp is None) else None,
            vela_version=vela_version(),
            summary_csv=dict(row),
        )
        return est
    finally:
        if tmp is not None:
            tmp.cleanup()


def export_vela(qm: Any, out: str | Path, target: str = "ethos-u55-128", **options: Any) -> dict[str, Any]:
    """Export ``qm`` to int8 TFLite (batch 1), compile it with Vela into ``out``'s folder, return the summary.

    ``out`` names the compiled model (``model_vela.tflite``); the plain .tflite and Vela's
    CSV sit beside it.
    """
    from edgekit.export.tflite import export_tflite

    out = Path(out)
    if out.suffix and out.suffix != ".tflite":  # e.g. model.ekq given with --target: write model_vela.tflite
        out = out.with_name(f"{out.stem}_vela.tflite")
    folder = out.parent if out.suffix == ".tflite" else out
    folder.mkdir(parents=True, exist_ok=True)
    stem = out.stem.removesuffix("_vela") if out.suffix == ".tflite" else qm.name
    plain = folder / f"{stem}.tflite"
    summary = export_tflite(qm, plain, batch=1)
    est = compile_for_ethos_u(plain, target, out_dir=folder, **options)
    if est.compiled_model and out.suffix == ".tflite" and Path(est.compiled_model) != out:
        Path(est.compiled_model).replace(out)
        est.compiled_model = str(out)
    return {
        "format": "tflite+vela",
        "path": est.compiled_model,
        "tflite": summary["path"],
        "target": target,
        "vela": est.to_json(),
    }
