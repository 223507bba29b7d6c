"""What every device runtime implements, and the error the agent reports back to the host."""

from __future__ import annotations

import os
from typing import Any


class AgentError(Exception):
    """An error reported back to the host as ``{"ok": false, "error": ...}``."""


class LoadedModel:
    """A model loaded by one runtime: ``run(inputs) -> outputs`` on numpy arrays."""

    per_layer = False
    layer_calls = 5  # how many run_timed_layers calls profiling averages over

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def run_timed_layers(self, inputs: dict[str, Any]) -> dict[str, float]:
        raise AgentError("this runtime gives no per-layer times")

    def intermediates(self, inputs: dict[str, Any]) -> dict[str, Any]:
        raise AgentError("this runtime cannot return intermediate tensors; use a 'reference' artifact")

    def timed_runs(self, inputs: dict[str, Any], runs: int, warmup: int) -> tuple[float, list[float]] | None:
        """(warm-up ms, per-run ms) timed by the runtime itself (e.g. in a runner process), or None to
        let the agent time ``run`` calls."""
        return None

    def extra_rss_kib(self, peak: bool) -> int:
        """Resident memory outside the agent's process (a runner child), peak or current."""
        return 0

    def close(self) -> None:
        """Release what the model holds (child processes); called before another model is loaded."""


def run_in_batches(run_once, inputs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Run a library compiled for a static batch over a larger one, ``batch`` samples at a time."""
    import numpy as np

    n = next(iter(inputs.values())).shape[0]
    if not batch or n == batch:
        return run_once(inputs)
    if n % batch:
        raise AgentError(f"the library was compiled for batch {batch}; {n} samples do not divide into it")
    parts = [run_once({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, n, batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def default_threads(manifest: dict[str, Any]) -> int:
    """Threads for a TVM artifact run with the runtime default (0): the target's default thread count,
    at most this device's online cores. Always passed explicitly as TVM_NUM_THREADS: unset, the TVM
    runtime asks hardware_concurrency() on every parallel kernel launch, which glibc answers by reading
    /sys/devices/system/cpu/online (measured: +3 us per kernel, 5.6 -> 8.6 us for a ResNet-8 conv)."""
    want = int((manifest.get("extra") or {}).get("threads", 0) or 0)
    cores = os.cpu_count() or 1
    return max(1, min(want, cores) if want else cores)
