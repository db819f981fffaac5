#!/usr/bin/env bash
# All quality benchmarks, then the goals table: about 45 CPU-minutes on a 2-core CPU with the
# default settings (most of it the smallcnn CV runs). Results: docs/quality.md, docs/quality/*.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
for bench in pblm_cv snu_fdm_cv normal_only watch_policy summary; do
  echo "== benchmarks/quality/$bench.py"
  "$PY" "benchmarks/quality/$bench.py"
done
