#!/usr/bin/env bash
# Hyperparameter search with hydra-optuna-sweeper (TPE): each trial is one run, and the value it
# maximises is what the entrypoint returns, the validation metric (val/zeroshot_top1, or val/i2t_r1
# on a retrieval source, for task=clip; for task=lm val/bpc: pass hydra.sweeper.direction=minimize).
# The test numbers (zeroshot/top1, retrieval/*, lm/test_bpc) are measured at each trial's end and
# never optimised on. The best trial is printed and written to <sweep dir>/optimization_results.yaml;
# every trial is an MLflow run under one parent. A trial that fails (a diverging lr) is recorded as
# failed and the study goes on (max_failure_rate=1.0); the exit code then says some failed.
#   make sweep SWEEP=optuna_lr ARGS="hydra.sweeper.n_trials=4 epochs=5"
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m fastclip.train -m hydra/sweeper=optuna hydra.sweeper.direction=maximize \
  hydra.sweeper.n_trials=12 hydra.sweeper.sampler.seed=0 hydra.sweeper.max_failure_rate=1.0 \
  "trainer.lr=tag(log,interval(1e-4,3e-3))" "trainer.weight_decay=interval(0.0,0.2)" \
  tracking.experiment=optuna_lr trainer.progress=false "$@"
