"""Calibration: stream user data through the float graph and summarise every tensor.

Pass 1 records min/max and per-channel means (for bias correction); pass 2, only for
the percentile and MSE observers, fills a fixed-range histogram per tensor. Memory stays
O(bins x tensors) whatever the data size.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.data import read_npz
from edgekit.errors import CalibrationError
from edgekit.graph.float_exec import run_graph
from edgekit.graph.ir import Graph

BINS = 2048
OBSERVERS = ("minmax", "percentile", "mse")


@dataclass
class TensorStats:
    min: float = np.inf
    max: float = -np.inf
    channel_sum: np.ndarray | None = None
    count: int = 0
    samples: int = 0
    hist: np.ndarray | None = field(default=None, repr=False)

    @property
    def channel_mean(self) -> np.ndarray | None:
        return None if self.channel_sum is None else self.channel_sum / max(self.count, 1)


def batches(calib, input_names: list[str], batch_size: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Normalise calibration data: array, dict of arrays, .npz path, or iterable of either."""
    if isinstance(calib, str | Path):
        calib = read_npz(calib, CalibrationError)
        if "x" in calib and len(input_names) == 1 and input_names[0] not in calib:
            calib = {input_names[0]: calib["x"]}
    if isinstance(calib, np.ndarray):
        if len(input_names) != 1:
            raise CalibrationError(f"the model has inputs {input_names}: give a dict of arrays")
        calib = {input_names[0]: calib}
    if isinstance(calib, dict):
        missing = [n for n in input_names if n not in calib]
        if missing:
            raise CalibrationError(f"calibration data lack input(s) {missing}; have {sorted(calib)}")
        n = len(calib[input_names[0]])
        if n == 0:
            raise CalibrationError("calibration data are empty")
        for s in range(0, n, batch_size):
            yield {k: np.asarray(calib[k][s : s + batch_size], np.float32) for k in input_names}
        return
    if isinstance(calib, Iterable):
        empty = True
        for item in calib:
            empty = False
            yield from batches(item, input_names, batch_size)
        if empty:
            raise CalibrationError("calibration iterator yielded no batches")
        return
    raise CalibrationError(f"unsupported calibration data of type {type(calib).__name__}")


class _Progress:
    """A progress line on stderr: rich bar on a terminal, sparse plain lines otherwise."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.last = label, enabled, 0.0
        self.tty = enabled and sys.stderr.isatty()

    def update(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else 5.0) and done != total:
            return
        self.last = now
        tot = f"/{total}" if total else ""
        end = "\r" if self.tty and done != total else "\n"
        print(f"{self.label}: {done}{tot} samples", end=end, file=sys.stderr, flush=True)


def _check_shapes(graph: Graph, feed: dict[str, np.ndarray]) -> None:
    for name, arr in feed.items():
        want = graph.input_shapes.get(name)
        if want and (
            arr.ndim != len(want) or any(w is not None and w != a for w, a in zip(want, arr.shape, strict=False))
        ):
            raise CalibrationError(
                f"calibration input {name!r} has shape {list(arr.shape)}, the model expects {want} (None = batch)"
            )


def collect(
    graph: Graph, calib, observer: str = "minmax", progress: bool = True, max_samples: int | None = None
) -> dict[str, TensorStats]:
    """Statistics of every tensor of ``graph`` over the calibration data."""
    if observer not in OBSERVERS:
        raise CalibrationError(f"unknown observer {observer!r}; choose one of {OBSERVERS}")
    stats: dict[str, TensorStats] = {}
    cached = list(_limit(batches(calib, graph.inputs), max_samples))
    total = sum(len(next(iter(b.values()))) for b in cached)
    bar = _Progress("calibrating", progress)
    done = 0
    for feed in cached:
        _check_shapes(graph, feed)
        env = run_graph(graph, feed)
        for name, v in env.items():
            if name in graph.constants:
                continue
            s = stats.setdefault(name, TensorStats())
            s.min = min(s.min, float(v.min()))
            s.max = max(s.max, float(v.max()))
            per = v.reshape(-1, v.shape[-1]) if v.ndim >= 2 else v.reshape(-1, 1)
            s.channel_sum = per.sum(axis=0, dtype=np.float64) + (0 if s.channel_sum is None else s.channel_sum)
            s.count += per.shape[0]
            s.samples += len(v)
        done += len(next(iter(feed.values())))
        bar.update(done, total)
    if observer != "minmax":
        bar = _Progress("histograms", progress)
        done = 0
        for feed in cached:
            env = run_graph(graph, feed)
            for name, s in stats.items():
                lo, hi = s.min, s.max if s.max > s.min else s.min + 1e-6
                h, _ = np.histogram(env[name], bins=BINS, range=(lo, hi))
                s.hist = h if s.hist is None else s.hist + h
            done += len(next(iter(feed.values())))
            bar.update(done, total)
    return stats


def _limit(it: Iterator[dict[str, np.ndarray]], max_samples: int | None) -> Iterator[dict[str, np.ndarray]]:
    seen = 0
    for b in it:
        if max_samples is not None and seen >= max_samples:
            return
        yield b
        seen += len(next(iter(b.values())))


def activation_range(s: TensorStats, observer: str, percentile: float = 99.99) -> tuple[float, float]:
    """The (lo, hi) float range an activation is quantized to, always containing 0."""
    lo, hi = min(s.min, 0.0), max(s.max, 0.0)
    if observer == "minmax" or s.hist is None or s.hist.sum() == 0:
        return lo, hi
    edges = np.linspace(s.min, s.max if s.max > s.min else s.min + 1e-6, BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    cdf = np.cumsum(s.hist) / s.hist.sum()
    if observer == "percentile":
        q_hi = centers[min(np.searchsorted(cdf, percentile / 100), BINS - 1)]
        q_lo = centers[min(np.searchsorted(cdf, 1 - percentile / 100), BINS - 1)]
        return min(q_lo, 0.0) if s.min < 0 else lo, max(q_hi, 0.0)
    return _mse_range(s.hist.astype(np.float64), centers, lo, hi)


def _mse_range(hist: np.ndarray, centers: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The clipping range minimising expected squared error (clipping + rounding)."""
    best, best_err = (lo, hi), np.inf
    for r in np.linspace(0.3, 1.0, 71):
        a, b = lo * r, hi * r
        scale = (b - a) / 255 if b > a else 1.0
        clipped = np.clip(centers, a, b)
        err = np.sum(hist * ((centers - clipped) ** 2 + np.where(centers == clipped, scale**2 / 12, 0)))
        if err < best_err:
            best, best_err = (a, b), err
    return best
