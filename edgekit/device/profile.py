"""Profile an artifact on a device: load time, warm-up, latency distribution, peak memory, per-layer time.

All times are measured on the device with its monotonic clock; the host only collects them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.device.artifacts import example_inputs
from edgekit.device.deploy import deploy
from edgekit.device.session import Session


def latency_stats(latencies_ms: list[float]) -> dict[str, float]:
    a = np.asarray(latencies_ms, dtype=np.float64)
    return {
        "min_ms": float(a.min()),
        "median_ms": float(np.median(a)),
        "mean_ms": float(a.mean()),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
        "std_ms": float(a.std()),
    }


def load_inputs(manifest: dict[str, Any], data: str | Path | None) -> dict[str, np.ndarray]:
    """The first sample of ``data`` (.npz with ``x`` or one array per input), else random inputs."""
    if data is None:
        return example_inputs(manifest)
    with np.load(data) as npz:
        names = [s["name"] for s in manifest.get("inputs", [])]
        specs = {s["name"]: s for s in manifest.get("inputs", [])}
        if names and all(n in npz for n in names):
            arrays = {n: npz[n][:1] for n in names}
        else:
            key = "x" if "x" in npz else npz.files[0]
            arrays = {names[0] if names else "input": npz[key][:1]}
    return {k: v.astype(specs[k]["dtype"]) if k in specs and specs[k].get("dtype") else v for k, v in arrays.items()}


def profile(
    session: Session,
    artifact: str | Path,
    *,
    runs: int = 50,
    warmup: int = 3,
    threads: int = 0,
    data: str | Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Deploy if needed, load, warm up, time ``runs`` runs; returns the JSON report."""
    if runs < 1:
        raise ValueError("--runs must be at least 1")
    dep = deploy(session, artifact)
    from edgekit.artifact import read_manifest

    manifest = read_manifest(artifact)
    loaded = session.load(dep.sha256, threads=threads)
    inputs = load_inputs(manifest, data)
    raw = session.profile(inputs, runs=runs, warmup=warmup, timeout=timeout)
    report: dict[str, Any] = {
        "device": session.url,
        "artifact": str(artifact),
        "runtime": manifest["runtime"],
        "sha256": dep.sha256,
        "uploaded": dep.uploaded,
        "runs": runs,
        "warmup_runs": warmup,
        "threads": threads,
        "load_ms": loaded["load_ms"],
        "warmup_ms": raw["warmup_ms"],
        **latency_stats(raw["latencies_ms"]),
        "peak_memory_mib": raw["peak_rss_kib"] / 1024 if raw.get("peak_rss_kib") is not None else None,
        "model_memory_mib": max(0, loaded["rss_after_kib"] - loaded["rss_before_kib"]) / 1024,
        "layers": [{"name": k, "ms": v} for k, v in raw["layers_ms"].items()],
        "latencies_ms": raw["latencies_ms"],
        "window": raw["window"],
    }
    return report


def render_table(reports: list[dict[str, Any]]) -> str:
    """A terminal table, one column per report (side-by-side runtimes)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"on-device latency ({reports[0]['device'].split('?')[0]})")
    table.add_column("metric")
    for r in reports:
        table.add_column(f"{Path(r['artifact']).name} [{r['runtime']}]", justify="right")
    rows = [
        ("runs", "runs", "{:d}"),
        ("load", "load_ms", "{:.2f} ms"),
        ("warm-up", "warmup_ms", "{:.2f} ms"),
        ("min", "min_ms", "{:.3f} ms"),
        ("median", "median_ms", "{:.3f} ms"),
        ("p90", "p90_ms", "{:.3f} ms"),
        ("p99", "p99_ms", "{:.3f} ms"),
        ("max", "max_ms", "{:.3f} ms"),
        ("std", "std_ms", "{:.3f} ms"),
        ("peak memory", "peak_memory_mib", "{:.1f} MiB"),
    ]
    for label, key, fmt in rows:
        table.add_row(label, *("n/a" if r.get(key) is None else fmt.format(r[key]) for r in reports))
    console = Console(record=True, width=120)
    with console.capture() as cap:
        console.print(table)
        for r in reports:
            if r["layers"]:
                top = sorted(r["layers"], key=lambda x: -x["ms"])[:10]
                lt = Table(title=f"slowest layers: {Path(r['artifact']).name}")
                lt.add_column("layer")
                lt.add_column("ms", justify="right")
                for layer in top:
                    lt.add_row(short_name(layer["name"], 80), f"{layer['ms']:.3f}")
                console.print(lt)
    return cap.get()


def short_name(name: str, width: int = 40) -> str:
    """A layer name cut in the middle to ``width`` characters (ONNX-derived names can be huge)."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[-(width - 1 - head) :]


def render_png(reports: list[dict[str, Any]], path: str | Path) -> Path:
    """Latency histograms (overlaid) and per-layer bars of the first report that has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_layers = [r for r in reports if r["layers"]]
    fig, axes = plt.subplots(1, 2 if with_layers else 1, figsize=(12 if with_layers else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    for r in reports:
        ax.hist(
            r["latencies_ms"],
            bins=min(40, max(5, len(r["latencies_ms"]) // 3)),
            alpha=0.6,
            label=f"{Path(r['artifact']).name} [{r['runtime']}] median {r['median_ms']:.2f} ms",
        )
    ax.set_xlabel("latency (ms, on-device clock)")
    ax.set_ylabel("runs")
    ax.set_title("latency distribution")
    ax.legend(fontsize=8)
    if with_layers:
        layers = with_layers[0]["layers"]
        ax2 = axes[0][1]
        labels = [f"{i}: {short_name(x['name'])}" for i, x in enumerate(layers)]
        ax2.barh(labels[::-1], [x["ms"] for x in layers][::-1])
        ax2.set_xlabel("ms per run")
        ax2.set_title(f"per-layer time: {Path(with_layers[0]['artifact']).name}")
        ax2.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def to_json(reports: list[dict[str, Any]]) -> str:
    return json.dumps(reports[0] if len(reports) == 1 else {"reports": reports}, indent=1)
