"""TVM compilation of QuantModels: lowering to Relax/TE kernels (``kernels/``), targets
(``targets/*.toml``), MetaSchedule tuning with a persistent database, artifact packing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
try:  # ``kernels`` is a top-level package beside ``edgekit``
    import kernels  # noqa: F401
except ImportError:  # pragma: no cover - source checkout where only edgekit* is installed
    if (_ROOT / "kernels" / "__init__.py").is_file():
        sys.path.insert(0, str(_ROOT))


def compile_model(qm, target: Any = "host", out=None, **kw):
    """Compile a QuantModel (or .ekq path) for a target into an artifact; see ``build.compile_model``."""
    from .build import compile_model as _compile

    return _compile(qm, target, out, **kw)


def list_targets(targets_dir=None):
    from .targets import list_targets as _list

    return _list(targets_dir)


__all__ = ["compile_model", "list_targets"]
