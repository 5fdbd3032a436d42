#!/usr/bin/env bash
# The seed's table, six rows: RN50 + transformer on COCO 2014 and on a LAION subset, 1/10/30 epochs.
#   COCO_ROOT=/data/coco LAION_SHARDS='/data/laion/{00000..00099}.tar' IMAGENET_VAL=/data/imagenet/val \
#     make sweep SWEEP=seed_table [ARGS="hydra/launcher=slurm"]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${COCO_ROOT:?set COCO_ROOT to the COCO 2014 root (annotations/, train2014/, val2014/)}"
: "${LAION_SHARDS:?set LAION_SHARDS to the LAION subset's shard pattern}"
: "${IMAGENET_VAL:=null}"   # unset: no ImageNet zero-shot
.venv/bin/python -m fastclip.train -m experiment=seed_coco_rn50 epochs=1,10,30 \
  dataset.root="$COCO_ROOT" eval.imagenet_val="$IMAGENET_VAL" "$@"
.venv/bin/python -m fastclip.train -m experiment=seed_laion_rn50 epochs=1,10,30 \
  dataset.train_shards="$LAION_SHARDS" eval.imagenet_val="$IMAGENET_VAL" "$@"
