"""The README's main command, `edgekit demo`, end to end on the generated default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_demo_on_the_generated_model_runs_the_whole_flow(tmp_path):
    env = dict(os.environ, EDGEKIT_DATA="none")  # the path a user without ../shared takes
    r = subprocess.run(
        [sys.executable, "-m", "edgekit.cli", "demo", "--quick", "--json", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["integer_only"] is True
    assert result["agreement_with_float_int8"] > 0.85
    assert result["compiled_bit_exact_fraction"] == 1.0 and result["compiled_max_lsb_diff"] == 0
    assert result["latency_ms_compiled_median"] > 0
    assert (tmp_path / "demo" / "model.int8.ekq").exists() and (tmp_path / "demo" / "model.host.tar").exists()
