"""Language models on a device: the ``lm`` artifact, and profile / validate for it.

``pack_lm_artifact`` writes an ``edgekit.artifact`` tar (``runtime: "lm"``) holding the ``.ekq``
without its tokenizer (tokenization stays on the host; the device needs only numpy). The agent's
``lm`` runtime (``edgekit/device/runtimes/lm.py``) generates greedily with the integer KV cache.

``profile_lm`` reports on-device tokens/s (whole generation, and decode steps alone);
``validate_lm`` checks that the device's tokens equal the host integer executor's
(``edgekit.llm.qlm.generate``) and, on a mismatch, names the first activation of the prompt pass
that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.artifact import pack_artifact, read_manifest, sha256_file
from edgekit.llm.qlm import QuantLM, generate, int_forward, load_lm

RUNTIME = "lm"
PACKER_VERSION = 1
DEFAULT_NEW_TOKENS = 16
CACHE = Path.home() / ".cache" / "edgekit" / "lm-artifacts"


def _lm(model: QuantLM | str | Path) -> QuantLM:
    return model if isinstance(model, QuantLM) else load_lm(model)


def example_prompt(qm: QuantLM, length: int = 8) -> list[int]:
    """A fixed prompt: the tokenizer's encoding of a short sentence, else ids 1..length."""
    if qm.tokenizer is not None:
        ids = qm.tokenizer.encode("The capital of France is").ids
        if ids:
            return [int(i) for i in ids]
    return [int(i % qm.config.vocab_size) for i in range(1, length + 1)]


def pack_lm_artifact(
    model: QuantLM | str | Path,
    out: str | Path,
    *,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    prompt_ids: list[int] | None = None,
    compile_target: str | None = None,
) -> Path:
    """An artifact the device agent's ``lm`` runtime runs (manifest, checksums, the model).

    ``compile_target`` (a ``targets/*.toml`` name: ``rpi4``, ``rpi5``, ``host``...): also every linear
    layer compiled through TVM for that device (``edgekit.llm.compile.build_device_linears``), which the
    runtime then calls instead of numpy; needs ``libtvm_runtime.so``/``libtvm_ffi.so`` on the device."""
    qm = _lm(model)
    cfg = qm.config
    prompt = list(prompt_ids) if prompt_ids is not None else example_prompt(qm)
    with tempfile.TemporaryDirectory() as tmp:
        ekq = dataclasses.replace(qm, tokenizer=None).save(Path(tmp) / "model.ekq")  # deterministic zip
        files: dict[str, str | Path] = {"model.ekq": ekq}
        tvm_linears = None
        if compile_target is not None:
            from edgekit.llm.compile import build_device_linears

            tvm_linears = build_device_linears(qm, compile_target, Path(tmp) / "tvm")
            for key in ("library", "weights"):
                files[tvm_linears[key]] = Path(tmp) / "tvm" / tvm_linears[key]
        manifest = {
            "runtime": RUNTIME,
            "model_file": "model.ekq",
            "target": compile_target or "numpy",
            "model_hash": sha256_file(ekq),
            "inputs": [
                {"name": "prompt_ids", "shape": [1, len(prompt)], "dtype": "int32"},
                {"name": "max_new_tokens", "shape": [1], "dtype": "int32"},
            ],
            "outputs": [
                {"name": "tokens", "shape": [1, max_new_tokens], "dtype": "int32"},
                {"name": "step_ms", "shape": [1, max_new_tokens], "dtype": "float64"},
            ],
            "extra": {
                "kind": "language-model",
                "max_new_tokens": int(max_new_tokens),
                "example_prompt_ids": prompt,
                "eos_token_id": None,  # greedy for a fixed number of tokens: comparable runs
                "vocab_size": cfg.vocab_size,
                "layers": cfg.layers,
                "hidden": cfg.hidden,
                "weight_bits": sorted({getattr(lw["q"], "storage_bits", lw["q"].bits) for lw in qm.layers}),
                "group_size": max(getattr(lw["q"], "group_size", 0) for lw in qm.layers),
                "weight_bytes": qm.weight_bytes(),
                "packer_version": PACKER_VERSION,
                "tvm_linears": tvm_linears,
            },
        }
        return pack_artifact(out, manifest, files)


def is_lm_file(path: str | Path) -> bool:
    """An ``.ekq`` holding a language model (``format: "edgekit.lm"``)?"""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read("model.json")).get("format") == "edgekit.lm"
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False


def device_artifact(path: str | Path, data: str | Path | None = None) -> tuple[str, str | Path | None]:
    """For the device CLI: an ``edgekit.lm`` ``.ekq`` becomes an ``lm`` artifact (packed once, cached
    on the file's content) and, without ``data``, an .npz with its example prompt; anything else passes."""
    path = Path(path)
    if path.suffix == ".tar" or not path.is_file() or not is_lm_file(path):
        return str(path), data
    key = hashlib.sha256(f"{sha256_file(path)}:{PACKER_VERSION}".encode()).hexdigest()[:20]
    CACHE.mkdir(parents=True, exist_ok=True)
    art = CACHE / f"{path.stem}-{key}.tar"
    if not art.is_file():
        pack_lm_artifact(path, art)
    if data is None:
        data = CACHE / f"{path.stem}-{key}.prompt.npz"
        if not data.is_file():
            extra = read_manifest(art)["extra"]
            write_prompt_npz(data, extra["example_prompt_ids"], extra["max_new_tokens"])
    return str(art), data


def write_prompt_npz(path: str | Path, prompt_ids: list[int] | np.ndarray, max_new_tokens: int) -> Path:
    """The input file ``edgekit profile --input`` takes for an ``lm`` artifact."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(
        tmp,
        prompt_ids=np.asarray(prompt_ids, np.int32).reshape(1, -1),
        max_new_tokens=np.array([max_new_tokens], np.int32),
    )
    tmp.replace(path)
    return path


def add_token_rates(report: dict[str, Any], max_new_tokens: int | None = None) -> dict[str, Any]:
    """tokens/s of a profile report of an ``lm`` artifact (others are returned unchanged)."""
    if report.get("runtime") != RUNTIME:
        return report
    if max_new_tokens is None:
        max_new_tokens = int(read_manifest(report["artifact"])["extra"]["max_new_tokens"])
    report["new_tokens"] = max_new_tokens
    report["tokens_per_s"] = max_new_tokens / (report["median_ms"] / 1e3) if report["median_ms"] > 0 else None
    for layer in report.get("layers", []):
        if layer["name"].startswith("decode"):
            report["decode_ms_per_token"] = layer["ms"]
            report["decode_tokens_per_s"] = 1e3 / layer["ms"] if layer["ms"] > 0 else None
        elif layer["name"].startswith("prefill"):
            report["prefill_ms"] = layer["ms"]
    return report


def profile_lm(
    session: Any,
    artifact: str | Path,
    *,
    prompt_ids: list[int] | None = None,
    max_new_tokens: int | None = None,
    runs: int = 3,
    warmup: int = 1,
    timeout: float | None = None,
) -> dict[str, Any]:
    """``edgekit.device.profile.profile`` of an ``lm`` artifact with a prompt, plus tokens/s."""
    from edgekit.device.profile import profile

    extra = read_manifest(artifact)["extra"]
    prompt = prompt_ids if prompt_ids is not None else extra["example_prompt_ids"]
    n = int(max_new_tokens if max_new_tokens is not None else extra["max_new_tokens"])
    with tempfile.TemporaryDirectory() as tmp:
        data = write_prompt_npz(Path(tmp) / "prompt.npz", prompt, n)
        report = profile(session, artifact, runs=runs, warmup=warmup, data=data, timeout=timeout)
    return add_token_rates(report, n)


def validate_lm(
    session: Any,
    artifact: str | Path,
    prompts: list[list[int]] | list[np.ndarray],
    *,
    max_new_tokens: int | None = None,
    reference: QuantLM | str | Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Generate on the device and on the host (``qlm.generate``) for each prompt; compare the tokens.

    The host reference is the artifact's own model file unless ``reference`` is given (then its
    saved bytes must hash to the manifest's ``model_hash``)."""
    from edgekit.device.deploy import deploy

    t0 = time.monotonic()
    manifest = read_manifest(artifact)
    n = int(max_new_tokens if max_new_tokens is not None else manifest["extra"]["max_new_tokens"])
    qm = _reference(artifact, manifest, reference)
    dep = deploy(session, artifact)
    session.load(dep.sha256)
    results, device_ms = [], []
    first: dict[str, Any] | None = None
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt, np.int32).reshape(1, -1)
        outs, ms = session.run({"prompt_ids": ids, "max_new_tokens": np.array([n], np.int32)}, timeout=timeout)
        dev = [int(t) for t in outs["tokens"][0] if t >= 0]
        host = generate(qm, ids[0], n)
        same = dev == host
        steps = [float(t) for t in outs["step_ms"][0][: len(dev)]] if "step_ms" in outs else []
        calls = int(outs["tvm_kernel_calls"][0]) if "tvm_kernel_calls" in outs else 0
        results.append(
            {
                "prompt": ids[0].tolist(),
                "device": dev,
                "host": host,
                "identical": same,
                "step_ms": steps,
                "tvm_kernel_calls": calls,
            }
        )
        device_ms.append(ms)
        if not same and first is None:
            pos = next((j for j, (a, b) in enumerate(zip(dev, host, strict=False)) if a != b), min(len(dev), len(host)))
            first = {
                "prompt_index": i,
                "position": pos,
                "device_token": dev[pos] if pos < len(dev) else None,
                "host_token": host[pos] if pos < len(host) else None,
            }
            first.update(_first_divergent_activation(session, qm, ids, dev[:pos] if pos else []))
    same = [r["identical"] for r in results]
    return {
        "device": session.url,
        "artifact": str(artifact),
        "runtime": manifest["runtime"],
        "n": len(results),
        "new_tokens": n,
        "bit_exact_fraction": float(np.mean(same)) if same else 0.0,
        "tokens_identical": all(same),
        "results": results,
        "first_mismatch": first,
        "device_ms": device_ms,
        "seconds": time.monotonic() - t0,
    }


def _reference(artifact: str | Path, manifest: dict[str, Any], reference: QuantLM | str | Path | None) -> QuantLM:
    import tarfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.ekq"
        if reference is None:
            with tarfile.open(artifact) as tar:
                f = tar.extractfile(manifest["model_file"])
                if f is None:
                    raise ValueError(f"{artifact}: {manifest['model_file']} is missing")
                path.write_bytes(f.read())
        else:
            dataclasses.replace(_lm(reference), tokenizer=None).save(path)
        if manifest.get("model_hash") and sha256_file(path) != manifest["model_hash"]:
            raise ValueError(
                "the reference model does not match the artifact's model_hash; pass the model it was packed from"
            )
        return load_lm(path)


def _first_divergent_activation(session: Any, qm: QuantLM, ids: np.ndarray, continuation: list[int]) -> dict:
    """The first named activation (in executor order) of the pass that produced the first differing
    token that the device computes differently from the host."""
    seq = np.concatenate([ids[0], np.asarray(continuation, np.int32)]).astype(np.int32)
    try:
        dev = session.intermediates({"prompt_ids": seq.reshape(1, -1)})
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the token mismatch is the finding
        return {"activation": None, "note": f"no intermediate tensors from the device ({exc})"}
    host: dict[str, np.ndarray] = {}
    int_forward(qm, seq, trace=host)
    for name, h in host.items():  # insertion order is execution order
        d = dev.get(name)
        if d is None or d.shape != h.shape or not np.array_equal(d, h):
            diff = None if d is None or d.shape != h.shape else float(np.abs(d.astype(np.float64) - h).max())
            return {"activation": name, "max_abs_diff": diff}
    return {"activation": None, "note": "every activation of the prompt pass matches"}
