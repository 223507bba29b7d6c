"""A quantized language model (``.ekq`` with ``format: "edgekit.lm"``) generating on the device.

Greedy generation with the integer KV cache, through edgekit's own integer executor
(``edgekit.llm.qlm``, numpy only, shipped with the agent bundle): the device computes with the
same code the host reference runs, so its tokens must be identical.

Inputs: ``prompt_ids`` (int, ``[T]`` or ``[B, T]``) and optionally ``max_new_tokens`` (int, any
shape, first element; default: the manifest's ``extra.max_new_tokens``). Outputs: ``tokens``
(int32 ``[B, N]``, -1 after an end-of-sequence stop) and ``step_ms`` (float64 ``[B, N]``: the
device-clock time of the prefill pass that produced the first token, then of each decode step).
Per-"layer" times for ``edgekit profile`` are the prefill pass and the mean decode step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgekit.device.runtimes.base import AgentError, LoadedModel


class LMModel(LoadedModel):
    per_layer = True
    layer_calls = 1  # one generation gives a prefill and every decode step

    def __init__(self, path: Path, manifest: dict[str, Any], threads: int):
        try:
            from edgekit.llm import qlm
        except ImportError as exc:  # an agent bundle from before the LM runtime
            raise AgentError(f"this agent bundle cannot run language models ({exc}); reconnect to update it") from exc
        self.qlm = qlm
        self.qm = qlm.load_lm(path)
        extra = manifest.get("extra") or {}
        self.default_new = int(extra.get("max_new_tokens", 16))
        eos = extra.get("eos_token_id")
        self.eos = None if eos is None else int(eos)

    def _args(self, inputs: dict[str, Any]) -> tuple[Any, int]:
        import numpy as np

        if "prompt_ids" not in inputs:
            raise AgentError(f"a language model takes 'prompt_ids' (and 'max_new_tokens'), got {sorted(inputs)}")
        ids = np.asarray(inputs["prompt_ids"])
        if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2) or ids.shape[-1] == 0:
            raise AgentError(f"prompt_ids must be integer [T] or [B, T] with T >= 1, got {ids.dtype} {ids.shape}")
        ids = ids.reshape(-1, ids.shape[-1]).astype(np.int64)
        vocab = self.qm.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise AgentError(f"prompt_ids outside the vocabulary [0, {vocab})")
        n = inputs.get("max_new_tokens")
        n = self.default_new if n is None else int(np.asarray(n).reshape(-1)[0])
        if not 0 <= n <= 1 << 16:
            raise AgentError(f"max_new_tokens must be in [0, 65536], got {n}")
        return ids, n

    def _generate(self, prompt: Any, n: int) -> tuple[list[int], list[float]]:
        """``qlm.generate`` (greedy, integer KV cache), with each step timed on the device clock."""
        import numpy as np

        qlm = self.qlm
        cache = qlm.KVCache(self.qm.config.layers)
        out: list[int] = []
        steps: list[float] = []
        if n == 0:
            return out, steps
        t0 = time.perf_counter_ns()
        lg = qlm.int_forward(self.qm, prompt, cache)
        for i in range(n):
            nxt = int(np.argmax(lg[-1]))
            steps.append((time.perf_counter_ns() - t0) / 1e6)
            out.append(nxt)
            if (self.eos is not None and nxt == self.eos) or i == n - 1:
                break
            t0 = time.perf_counter_ns()
            lg = qlm.int_forward(self.qm, np.array([nxt]), cache)
        return out, steps

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        ids, n = self._args(inputs)
        tokens = np.full((len(ids), n), -1, np.int32)
        step_ms = np.zeros((len(ids), n), np.float64)
        for b, prompt in enumerate(ids):
            out, steps = self._generate(prompt, n)
            tokens[b, : len(out)] = out
            step_ms[b, : len(steps)] = steps
        return {"tokens": tokens, "step_ms": step_ms}

    def run_timed_layers(self, inputs: dict[str, Any]) -> dict[str, float]:
        ids, n = self._args(inputs)
        _, steps = self._generate(ids[0], max(n, 2))
        decode = steps[1:]
        return {
            f"prefill ({ids.shape[1]} tokens, first token)": steps[0],
            "decode step (1 token, mean)": sum(decode) / len(decode),
        }

    def intermediates(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Every named activation of the prompt pass (dequantized, as ``int_forward``'s trace)."""
        ids, _ = self._args(inputs)
        trace: dict[str, Any] = {}
        self.qlm.int_forward(self.qm, ids[0], trace=trace)
        return trace
