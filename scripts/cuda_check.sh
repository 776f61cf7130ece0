#!/usr/bin/env bash
# The benchmark and the test suite on MLX's CUDA backend: Linux, an NVIDIA GPU, CUDA 13 (README,
# "GPUs", says how to install MLX's CUDA build in place of its CPU build). On Linux `make test`
# runs MLX on the CPU only; this runs the GPU path, the one Apple users get through Metal (the
# same mlx_steer code: its CPU-only kernels apply on MLX's CPU device alone).
# docs/BENCHMARKS.md records a run.
#
#   scripts/cuda_check.sh [OUTDIR]            (default: cuda-check)
#
# Environment: PYTHON (default python3); SECTIONS (benchmark sections, in order; default
# "step shared overhead sweeps compare calibration"); SECTION_TIMEOUT (seconds per section,
# default 120); RUNS (runs per figure, default 3); TEST_TIMEOUT (seconds for the suite,
# default 900); PYTEST_ARGS (more pytest arguments, e.g. --ignore=tests/test_browser.py
# where the app's packages or chromium are not installed).
# Each section runs in its own process under its own time limit, so a slow one loses only
# its own figures; a limit stops pytest with SIGINT, which still writes its report.
set -u
PY=${PYTHON:-python3}
OUT=$(realpath -m "${1:-cuda-check}")
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PY" -c 'import mlx.core as mx; print("mlx", mx.__version__, "default device:", mx.default_device())'
} 2>&1 | tee "$OUT/device.txt"
# A check of the GPU path that silently ran on the CPU would report nothing true.
"$PY" -c 'import mlx.core as mx, sys; sys.exit(0 if mx.default_device() == mx.gpu else "MLX has no GPU device here")' || exit 1

for s in ${SECTIONS:-step shared overhead sweeps compare calibration}; do
    echo "== bench section $s" | tee -a "$OUT/bench.log"
    timeout -s INT "${SECTION_TIMEOUT:-120}" "$PY" scripts/bench.py --only "$s" \
        --runs "${RUNS:-3}" --json "$OUT/bench-$s.json" >>"$OUT/bench.log" 2>&1
    echo "exit $?" >>"$OUT/bench.log"
done
"$PY" - "$OUT" <<'EOF'  # one JSON file of every section's rows
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows, meta = [], None
for f in sorted(out.glob("bench-*.json")):
    data = json.loads(f.read_text())
    meta = meta or data["meta"]
    rows += data["rows"]
(out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
EOF
grep -E '^\|' "$OUT/bench.log"  # each section's table, as bench.py printed it

# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
timeout -s INT "${TEST_TIMEOUT:-900}" "$PY" -m pytest -q -ra -p no:cacheprovider \
    --durations=25 --junitxml "$OUT/junit.xml" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/test.log"
exit "${PIPESTATUS[0]}"
