#!/usr/bin/env bash
# One command on a GPU machine, < 8 minutes on one GPU, one table (see benchmarks/gpu_check.py).
# Never needed by the tests. CPU fallback that proves it runs: benchmarks/gpu_check.sh --device cpu --quick
#   CELLFM_DATA_DIR=/path/to/shared/data benchmarks/gpu_check.sh [--compile-presets 80m 800m] [--no-train] ...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
: "${CELLFM_DATA_DIR:?set CELLFM_DATA_DIR to the shared data folder (it holds pbmc4k_soupx/)}"
export CELLFM_DATA_DIR
cd "$here"
exec timeout 900 python gpu_check.py "$@"
