#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the main job: compose the default pipeline
# through the plugins and sample a grid. (Training lands with the stage issues.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
OUT="${LDMKIT_DEMO_DIR:-$ROOT/runs/demo}"
mkdir -p "$OUT"
"$ROOT/.venv/bin/ldmkit" plugins
"$ROOT/.venv/bin/ldmkit" sample sampler=ddim sampler.steps=20 --num-samples 16 --out "$OUT/untrained_samples.png" "$@"
echo "demo finished: $OUT"
