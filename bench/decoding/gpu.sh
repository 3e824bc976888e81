#!/usr/bin/env bash
# The decoding figures of issue #13 on a CUDA machine without network, in one call:
#
#     cp -r ../shared/gpu-bench .gpu && echo /.gpu/ >> .git/info/exclude   # the wheels bundle
#     bash bench/decoding/gpu.sh            # CUDA: graph test, small and medium figures
#     bash bench/decoding/gpu.sh --local    # the same steps on CPU with the tiny model
#
# Steps, each under `timeout` within DEADLINE_S: wheels from $GPU_DIR/whl into $SITE -> the CUDA
# graph test (tests/stems/test_decoding.py, which skips without CUDA) -> bench.decoding on the
# musicgen-small architecture (eager, static, graph; batches 1,3,24,64) -> the same for
# musicgen-medium (batches 1,3,24). Logs and summary.txt under $OUT (/tmp/out).
set -u -o pipefail
START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
GPU_DIR="${GPU_DIR:-$ROOT/.gpu}"
OUT="${OUT:-/tmp/out}" SITE="${SITE:-/tmp/site}" PY="${PY:-python3}"
if [ "${1:-}" = "--local" ]; then
  DEVICE=cpu SMALL=tiny MEDIUM=tiny DURATION=1 BATCHES=1,3 BATCHES_MEDIUM=1 DEADLINE_S="${DEADLINE_S:-600}"
else
  DEVICE=cuda SMALL=small MEDIUM=medium DURATION=10 BATCHES=1,3,24,64 BATCHES_MEDIUM=1,3,24
  DEADLINE_S="${DEADLINE_S:-540}"
fi
mkdir -p "$OUT" "$SITE"
exec > >(tee -a "$OUT/decoding.log") 2>&1
export USER="${USER:-stemgen}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export STEMGEN_CACHE_DIR="${STEMGEN_CACHE_DIR:-/tmp/stemgen-cache}"
left() { echo $(( DEADLINE_S - $(date +%s) + START )); }
step() {  # step NAME CAP -- command...
  local name=$1 cap=$2 l t; shift 3
  l=$(left); t=$(( l < cap ? l : cap ))
  if (( t < 20 )); then echo "== SKIP $name (${l}s left)"; return 99; fi
  echo "== $name (timeout ${t}s): $*"
  timeout -k 10 "$t" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc at $(( $(date +%s) - START ))s"
  (( rc == 0 )) || FAILED="$FAILED $name"
}
FAILED=""
command -v nvidia-smi >/dev/null && nvidia-smi -L
if [ -d "$GPU_DIR/whl" ]; then
  step wheels 120 -- "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$GPU_DIR"/whl/*.whl
  export PYTHONPATH="$SITE:$GPU_DIR/stubs:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -c "import xformers.ops" >/dev/null 2>&1 || export PYTHONPATH="$GPU_DIR/xformers_fallback:$PYTHONPATH"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$ROOT" || exit 2
# the CUDA-graph check of tests/stems/test_decoding.py, inline (the bundle has no pytest)
step graph-test 180 -- "$PY" - <<'PY'
import tempfile, numpy as np, torch
from pathlib import Path
from stems.checkpoint import write_checkpoint
from stems.engine import StemEngine
device = "cuda" if torch.cuda.is_available() else "cpu"
ckpt = str(write_checkpoint(Path(tempfile.mkdtemp()), "tiny", seed=4))
prompts = ["guitar riff", "bass line", "drum groove"]
fast = StemEngine(ckpt, device=device, mode="graph" if device == "cuda" else "static", buckets=(1, 2, 4))
static = StemEngine(ckpt, device=device, mode="static", buckets=(1, 2, 4), precision=fast.precision)
print("capture s", fast.warm_up(batch_size=4), "graphs", fast.decoder.stats.graphs)
a = fast.generate(prompts, 2.0, seed=13)
print("seeded repeat bit-exact:", np.array_equal(a, fast.generate(prompts, 2.0, seed=13)))
b = static.generate(prompts, 2.0, seed=13)
print("graph vs uncaptured static: equal", np.array_equal(a, b))
print("graph test:", fast.decoder.stats)
raise SystemExit(0 if np.array_equal(a, b) else 1)
PY
step "decoding-$SMALL" 300 -- "$PY" -m bench.decoding --strict --device "$DEVICE" --model "$SMALL" \
  --duration "$DURATION" --batches "$BATCHES"
step "decoding-$MEDIUM-medium" 300 -- "$PY" -m bench.decoding --device "$DEVICE" --model "$MEDIUM" \
  --duration "$DURATION" --batches "$BATCHES_MEDIUM" --modes eager,$( [ "$DEVICE" = cuda ] && echo graph || echo static)
grep -hE "^(bench.decoding|\[|  batch|  peak|  token|  against|  graph|  [0-9]+ CUDA|graph test|FAILED)" "$OUT"/*.log > "$OUT/summary.txt"
cat "$OUT/summary.txt"
if [ -n "$FAILED" ]; then echo "FAILED:$FAILED"; exit 1; fi
