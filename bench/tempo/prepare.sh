#!/usr/bin/env bash
# Idempotent set-up for `python -m bench.tempo`: real drum kits from Debian's hydrogen-drumkits
# package (multi-sampled acoustic and electronic kits) and the aubio onset detector (the bench's
# independent judge) in the project venv. Runs as root (CI too); does nothing when all is there.
set -euo pipefail

cd "$(dirname "$0")/../.."
KIT_DIR=/usr/share/hydrogen/data/drumkits

if [ ! -f "$KIT_DIR/The Black Pearl 1.0/PearlKick-Hard.wav" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "prepare.sh: hydrogen-drumkits is missing and installing it needs root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends hydrogen-drumkits >/dev/null
fi

PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import aubio" 2>/dev/null; then
    if [ -x .venv/bin/uv ]; then
        .venv/bin/uv pip install --python "$PY" "aubio>=0.4.9"
    else
        "$PY" -m pip install -q "aubio>=0.4.9"
    fi
fi
echo "bench/tempo: drum kits in $KIT_DIR, aubio $("$PY" -c 'import aubio; print(aubio.version)')"
