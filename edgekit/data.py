"""Reading ``.npz`` data files (``x`` inputs, optional ``y`` labels) with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError


def read_npz(path: str | Path, error: type[EdgekitError] = EdgekitError) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file (no pickles); ``error`` is raised for a missing or bad file."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise error(f"{path}: not a readable .npz file ({exc})") from exc
