#!/usr/bin/env bash
# What each compression option buys on top of each boundary method, embedded default data: first a
# teacher (vanilla, TEACHER_EPOCHS epochs, default 3x the default 15), then the grid
# compression=none,quant,prune,distill x boundary=none,fixed,gumbel, distill from that teacher.
# ARGS go to both, but for boundary.* and compression.* (the vanilla teacher reads none: the command-line
# check would refuse them there) and epochs (the teacher's is TEACHER_EPOCHS); `make report ARGS="--experiment compression_ablation"` compares the grid.
#   make sweep SWEEP=compression_ablation ARGS="epochs=5" TEACHER_EPOCHS=15
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=$(date +%Y-%m-%d/%H-%M-%S)
teacher_dir="outputs/multirun/compression_ablation/$stamp/teacher"
teacher_args=()  # ARGS without the grid's length and its boundary and compression keys
for arg in "$@"; do case "$arg" in epochs=*|boundary.*|compression.*) ;; *) teacher_args+=("$arg") ;; esac; done
.venv/bin/python -m fastclip.train boundary=none compression=none "epochs=${TEACHER_EPOCHS:-45}" \
  tracking.experiment=compression_ablation tracking.run_name=teacher "hydra.run.dir=$teacher_dir" \
  trainer.progress=false ${teacher_args[@]+"${teacher_args[@]}"}
# ++: the grid's non-distill jobs do not have the key; distill's gets its teacher
exec .venv/bin/python -m fastclip.train -m compression=none,quant,prune,distill boundary=none,fixed,gumbel \
  "++compression.teacher=$PWD/$teacher_dir/checkpoints/last.pt" \
  tracking.experiment=compression_ablation trainer.progress=false "$@"
