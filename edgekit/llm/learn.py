"""MobileQuant-style learning (torch): smoothing scales and shifts, weight clipping and activation ranges,
learned jointly over all layers with the MSE of the final hidden states against the float model.

Parametrization (all start at the SmoothQuant / min-max point):
- smoothing scale ``s = s0 * exp(a)``; shift ``d = t * max|x|`` per channel (t from 0);
- clipping ratio ``sigmoid(c)`` per output channel, c from 4 (0.982);
- activation range ``lo = lo0 * exp(u)``, ``hi = hi0 * exp(w)`` (softmax output fixed to [0, 1]).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgekit.llm.model import LlamaModel
from edgekit.llm.qlm import GLOBAL_ACTS, LAYER_ACTS
from edgekit.llm.sim import Observer, QParams, Scheme, TorchOps, sim_forward, torch_model

LINS = ("q", "k", "v", "o", "gate", "up", "down")
CLIP_INIT = 4.0


def learn(
    model: LlamaModel,
    init: QParams,
    scheme: Scheme,
    batches: np.ndarray,
    *,
    steps: int = 100,
    lr: float = 2e-2,
    batch_size: int = 1,
    time_budget_s: float | None = None,
    seed: int = 0,
    chmax: Observer | None = None,
    log: Any = None,
    learn_shifts: bool = True,
) -> tuple[QParams, dict]:
    """Learn ``QParams`` end to end; returns them (numpy) and a history dict (loss per step, seconds)."""
    import torch

    torch.manual_seed(seed)
    ops = TorchOps()
    T = torch.as_tensor
    lmodel = torch_model(model)

    params: list[torch.Tensor] = []
    clip_params: list[torch.Tensor] = []

    def P(shape: Any, val: float, group: list[torch.Tensor]) -> torch.Tensor:
        t = torch.full(shape, val, dtype=torch.float32, requires_grad=True)
        group.append(t)
        return t

    raw: list[dict[str, Any]] = []
    for i, p0 in enumerate(init.layers):
        r: dict[str, Any] = {}
        for pair in ("attn", "mlp", "v", "h"):
            s0 = T(np.asarray(p0["s_" + pair], np.float32))
            r["a_" + pair] = P(s0.shape, 0.0, params)
            r["s0_" + pair] = s0
            r["d0_" + pair] = T(np.asarray(p0["d_" + pair], np.float32))
            if learn_shifts and pair in ("attn", "mlp", "v") and chmax is not None:
                key = {"attn": "attn_x", "mlp": "mlp_x", "v": None}[pair]
                if key is not None:
                    r["amax_" + pair] = T(chmax.chmax[f"{i}.{key}"].astype(np.float32))
                    r["t_" + pair] = P(s0.shape, 0.0, params)
        for k in LINS:
            r["c_" + k] = P((model.layers[i][k].shape[0],), CLIP_INIT, clip_params)
        r["ranges"] = {}
        for n in LAYER_ACTS:
            lo0, hi0 = init.ranges[i][n]
            if n == "probs":
                r["ranges"][n] = (T(0.0), T(1.0))
            else:
                r["ranges"][n] = (
                    T(min(float(lo0), -1e-6)),
                    T(max(float(hi0), 1e-6)),
                    P((), 0.0, params),
                    P((), 0.0, params),
                )
        raw.append(r)
    graw = {
        n: (
            T(min(float(init.granges[n][0]), -1e-6)),
            T(max(float(init.granges[n][1]), 1e-6)),
            P((), 0.0, params),
            P((), 0.0, params),
        )
        for n in GLOBAL_ACTS
    }

    def current() -> QParams:
        layers, ranges = [], []
        for r in raw:
            p: dict[str, Any] = {}
            for pair in ("attn", "mlp", "v", "h"):
                p["s_" + pair] = r["s0_" + pair] * torch.exp(r["a_" + pair])
                p["d_" + pair] = r["d0_" + pair] + (r["t_" + pair] * r["amax_" + pair] if "t_" + pair in r else 0.0)
            for k in LINS:
                p["clip_" + k] = torch.sigmoid(r["c_" + k])
            layers.append(p)
            rg = {}
            for n, v in r["ranges"].items():
                rg[n] = (v[0], v[1]) if len(v) == 2 else (v[0] * torch.exp(v[2]), v[1] * torch.exp(v[3]))
            ranges.append(rg)
        gr = {n: (v[0] * torch.exp(v[2]), v[1] * torch.exp(v[3])) for n, v in graw.items()}
        return QParams(layers, ranges, gr)

    opt = torch.optim.Adam([{"params": params, "lr": lr}, {"params": clip_params, "lr": lr * 2}])
    # cosine decay to 10% over the planned steps (or over the time budget, whichever ends first)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1 + 0.45 * (1 + np.cos(np.pi * min(k / steps, 1.0))))
    with torch.no_grad():
        targets = [sim_forward(lmodel, None, scheme, T(row[None]), ops=ops, quant=False) for row in batches]
    rng = np.random.default_rng(seed)
    hist: dict[str, Any] = {"loss": [], "steps": 0}
    t0 = time.time()
    for step in range(steps):
        sel = rng.choice(len(batches), size=min(batch_size, len(batches)), replace=False)
        qp = current()
        out = sim_forward(lmodel, qp, scheme, T(batches[sel]), ops=ops, quant=True)
        tgt = torch.cat([targets[j] for j in sel], 0)
        loss = ((out - tgt) ** 2).mean() / (tgt**2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        hist["loss"].append(float(loss.detach()))
        hist["steps"] = step + 1
        if log and (step % 10 == 0 or step == steps - 1):
            log(f"learn step {step}: relative mse {hist['loss'][-1]:.5f} ({time.time() - t0:.0f}s)")
        if time_budget_s is not None and time.time() - t0 > time_budget_s:
            break
    hist["seconds"] = time.time() - t0
    with torch.no_grad():
        qp = current()
        out = QParams(
            [{k: ops.np(v).astype(np.float32) for k, v in p.items()} for p in qp.layers],
            [{n: (float(a), float(b)) for n, (a, b) in r.items()} for r in qp.ranges],
            {n: (float(a), float(b)) for n, (a, b) in qp.granges.items()},
        )
    return out, hist
