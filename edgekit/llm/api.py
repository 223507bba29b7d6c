"""Entry points the CLI routes to: ``export_lm`` and ``eval_lm``; plus perplexity helpers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import CalibrationError, EdgekitError, ModelFormatError
from edgekit.llm.model import LlamaModel, float_forward, load_model
from edgekit.llm.qlm import QuantLM, int_forward, load_lm
from edgekit.llm.quantize import build_quantlm, calib_batches, calibrate
from edgekit.llm.sim import Scheme

SCHEMES = ("rtn", "smoothquant", "mobilequant")
DEFAULT_GROUP = 32  # group-wise int4 for 4-bit weights (BENCHMARK.md)


def tokenize(tokenizer: Any, text: str) -> np.ndarray:
    if tokenizer is None:
        raise ModelFormatError("this model carries no tokenizer: pass token ids instead of text")
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int64)


def nll_windows(logits_fn: Any, ids: np.ndarray, window: int) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over non-overlapping windows (each scored causally from its
    own start), and how many tokens were predicted."""
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        w = ids[s : s + window]
        if len(w) < 2:
            break
        lg = np.asarray(logits_fn(w), np.float64)[:-1]
        lg = lg - lg.max(-1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
        total += -float(lp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return total, count


def perplexity(
    model: LlamaModel | QuantLM, ids: np.ndarray, window: int = 512, *, integer_ops: bool = False
) -> dict[str, Any]:
    """Perplexity of a float or integer model on ``ids`` (windows of ``window`` tokens); ``integer_ops``: the
    integer model's RMSNorm, RoPE and softmax in integers too."""
    t0 = time.time()
    if isinstance(model, QuantLM):
        nll, n = nll_windows(lambda w: int_forward(model, w, integer_ops=integer_ops), ids, window)
    else:
        nll, n = nll_windows(lambda w: float_forward(model, w), ids, window)
    return {
        "perplexity": float(np.exp(nll / n)),
        "tokens": int(len(ids)),
        "predicted": n,
        "window": window,
        "seconds": time.time() - t0,
    }


def _read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"{p}: no such text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"{p} is empty: give a plain-text file for calibration/evaluation")
    return text


def quantize_lm(
    model: LlamaModel,
    scheme: str,
    calib_ids: np.ndarray,
    *,
    weight_bits: int = 8,
    act_bits: int = 8,
    act16: tuple[str, ...] | None = None,
    group_size: int | None = None,
    gptq: bool = False,
    seq_len: int = 128,
    n_seqs: int = 32,
    steps: int = 200,
    time_budget_s: float | None = 1380.0,
    lr: float = 2e-2,
    log: Any = None,
) -> tuple[QuantLM, dict]:
    """Quantize ``model`` with ``scheme`` (rtn | smoothquant | mobilequant); returns the integer model and a
    report (calibration tokens, seconds, learning history). ``group_size``: int4 weights in groups of that many
    input channels (progressive, integer group scales); default 32 for 4-bit weights, 0 (per channel) turns
    groups off. ``gptq``: round the group-wise int4 weights with GPTQ (Hessians of every linear's quantized
    input over the calibration windows) instead of to nearest."""
    if scheme not in SCHEMES:
        raise EdgekitError(f"unknown scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if weight_bits not in (4, 8) or act_bits not in (8, 16):
        raise EdgekitError("weight bits must be 8 or 4 and activation bits 8 or 16")
    gs = (DEFAULT_GROUP if weight_bits == 4 else 0) if group_size is None else int(group_size)
    sch = (
        Scheme(weight_bits=weight_bits, act_bits=act_bits, group_size=gs)
        if act16 is None
        else Scheme(weight_bits=weight_bits, act_bits=act_bits, act16=tuple(act16), group_size=gs)
    )
    batches = calib_batches(calib_ids, seq_len, n_seqs)
    t0 = time.time()
    ops = None
    try:
        from edgekit.llm.sim import TorchOps

        ops = TorchOps()
    except ImportError:
        if scheme == "mobilequant":
            raise EdgekitError(
                "the mobilequant scheme learns with torch: pip install 'edgekit[torch]' (torch==2.13.0)"
            ) from None
    cmodel = model
    if ops is not None:
        import torch

        from edgekit.llm.sim import torch_model

        cmodel = torch_model(model)  # converted once, not per calibration window
        with torch.no_grad():
            qp = calibrate(cmodel, scheme, sch, batches, ops=ops, log=log)
    else:
        qp = calibrate(model, scheme, sch, batches, log=log)
    report: dict[str, Any] = {"scheme": scheme, "calib_tokens": int(batches.size), "calib_seq_len": seq_len}
    if scheme == "mobilequant":
        import torch

        from edgekit.llm.learn import learn
        from edgekit.llm.quantize import observe

        with torch.no_grad():
            chmax = observe(cmodel, None, sch, batches, quant_weights=False, ops=ops)
        qp, hist = learn(
            cmodel, qp, sch, batches, steps=steps, lr=lr, time_budget_s=time_budget_s, chmax=chmax, log=log
        )
        report["learn"] = {
            "steps": hist["steps"],
            "seconds": hist["seconds"],
            "loss_first": hist["loss"][0],
            "loss_last": hist["loss"][-1],
        }
    hessians = None
    if gptq and sch.group_size and sch.weight_bits == 4:
        from edgekit.llm.quantize import observe

        t1 = time.time()
        if ops is not None:
            import torch

            with torch.no_grad():
                hessians = observe(cmodel, qp, sch, batches, quant_weights=True, ops=ops, hessians=True).hessians
        else:
            hessians = observe(model, qp, sch, batches, quant_weights=True, hessians=True).hessians
        report["gptq_hessian_seconds"] = time.time() - t1
    report["seconds"] = time.time() - t0
    qm = build_quantlm(
        model,
        qp,
        sch,
        meta={"scheme": scheme, "source": model.meta.get("source"), "calibration": report},
        hessians=hessians,
    )
    report["build_seconds"] = time.time() - t0 - report["seconds"]
    return qm, report


def export_lm(
    model_path: str | Path,
    scheme: str,
    weight_bits: int,
    act_bits: int,
    calib_text: str | Path,
    out: str | Path,
    **opts: Any,
) -> dict[str, Any]:
    """Quantize a GGUF / safetensors Llama and write it as ``.ekq`` (``format: "edgekit.lm"``).

    ``opts``: act16 (tensor names kept 16-bit), seq_len, n_seqs, steps, time_budget_s, lr, log (a callable),
    max_calib_tokens, onnx (also write an ONNX QDQ file there), onnx_max_len."""
    onnx_out = opts.pop("onnx", None)
    onnx_max_len = int(opts.pop("onnx_max_len", 512))
    model = load_model(model_path)
    ids = tokenize(model.tokenizer, _read_text(calib_text))
    if opts.get("max_calib_tokens"):
        ids = ids[: int(opts.pop("max_calib_tokens"))]
    opts.pop("max_calib_tokens", None)
    qm, report = quantize_lm(model, scheme, ids, weight_bits=weight_bits, act_bits=act_bits, **opts)
    path = qm.save(out)
    report.update({"out": str(path), "weight_bytes": qm.weight_bytes(), "format": "edgekit.lm"})
    if onnx_out:
        from edgekit.llm.onnx_export import export_onnx

        report["onnx"] = str(export_onnx(qm, onnx_out, max_len=onnx_max_len))
    return report


def eval_lm(
    model_path: str | Path, text_path: str | Path, tokens: int = 4096, window: int = 512, *, integer_ops: bool = False
) -> dict[str, Any]:
    """Perplexity of a float (.gguf / safetensors) or quantized (.ekq) model on the first ``tokens`` tokens
    (``integer_ops``: integer RMSNorm/RoPE/softmax in the quantized model)."""
    p = Path(model_path)
    model: LlamaModel | QuantLM = load_lm(p) if p.suffix == ".ekq" else load_model(p)
    ids = tokenize(model.tokenizer, _read_text(text_path))[:tokens]
    if len(ids) < 2:
        raise CalibrationError(f"{text_path} has fewer than 2 tokens")
    r = perplexity(model, ids, window, integer_ops=integer_ops)
    r["model"] = str(p)
    return r
