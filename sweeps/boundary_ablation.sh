#!/usr/bin/env bash
# Every boundary method on CLIP's towers, one grid, embedded default data.
#   make sweep SWEEP=boundary_ablation ARGS="epochs=5"
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m fastclip.train -m boundary=none,fixed,gumbel,entropy_spike,unigram,tome \
  tracking.experiment=boundary_ablation trainer.progress=false "$@"
