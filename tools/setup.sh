#!/usr/bin/env bash
# One-time set-up of a fresh machine for edgekit: Python packages, then every
# tools/setup.d/*.sh (system packages some features and tests need). Idempotent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
python3 -m pip install --disable-pip-version-check -q -e ".[test]"
for s in tools/setup.d/*.sh; do
    [ -e "$s" ] || continue
    echo "setup: $s"
    bash "$s"
done
