"""The `compression` config group: what is done to a model to make it smaller or faster, and the
measured trade-off (size, latency, zero-shot) logged beside its twin's.

Every option lives here end to end, behind one interface (base.Compression) that the task and the
loop call and nothing else: prepare (before training), the training hooks, finish (after it).
  base.py     the interface and compression=none
  options.py  compression.name -> its option (build_compression)
  quant.py    int8 quantization (torchao), post-training or quantization-aware
  prune.py    magnitude pruning's schedule and option; prune_masks.py: which weights it zeroes
  distill.py  knowledge distillation from a frozen teacher
  measure.py  what finish() measures for every option (eval latency, bytes, quality keys)
  attention.py  open_clip's MultiheadAttention as plain Linears (so int8 and pruning reach it)

Each option's keys, their types and ranges: fastclip/schema/compression.py. This module imports nothing.
"""

# DTP's boundary predictors and their auxiliary heads: quantization and pruning leave their weights float and
# dense (rounding or zeroing them moves the boundaries, so the compute)
FLOAT_PARTS = ("predictor", "next_patch", "next_char", "next_token")
PROJECTION = "distill_projection"  # a distilled student's module mapping its embeddings to the teacher's width
