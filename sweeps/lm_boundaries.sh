#!/usr/bin/env bash
# Every boundary method on the DTP character LM (the paper's text8 table, on the default text
# unless dataset.path=... points at text8).
#   make sweep SWEEP=lm_boundaries ARGS="dataset.path=/data/text8 encoder=char_lm_paper"
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m fastclip.train -m task=lm boundary=none,fixed,whitespace,gumbel,entropy_spike,unigram \
  tracking.experiment=lm_boundaries trainer.progress=false "$@"
