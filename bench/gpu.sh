#!/usr/bin/env bash
# The GPU figures of issue 8, one script, one JSON (bench/bench_gpu.py says what each figure is).
#   bench/gpu.sh [OUT_DIR]            on a GPU node: ConvNeXt-S @1024, within ~8 minutes
#   bench/gpu.sh OUT_DIR --tiny       the same code with tiny models on the CPU (how it is tested)
# It makes its own small demo cache for the loader figures (no data needed), writes OUT_DIR/gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-var/bench}}; shift || true
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SIZE=1024; STUDIES=400
if [[ " $* " == *" --tiny "* ]]; then SIZE=32; STUDIES=40; fi
echo "== demo data and a ${SIZE}px cache for the loader ($STUDIES studies)"
"$PY" -m cxrlt demo-data --out "$WORK/demo" --studies "$STUDIES" --seed 0 >/dev/null
"$PY" -m cxrlt manifest --labels "$WORK/demo/cxr-lt-2024" --images "$WORK/demo/mimic-cxr-jpg" \
    --out "$WORK/manifest" >/dev/null
"$PY" -m cxrlt prepare --manifest "$WORK/manifest" --out "$WORK/cache" --size "$SIZE" >/dev/null
echo "== figures"
timeout "${GPU_BENCH_TIMEOUT:-480}" "$PY" bench/bench_gpu.py --out "$OUT/gpu.json" --cache "$WORK/cache" "$@"
