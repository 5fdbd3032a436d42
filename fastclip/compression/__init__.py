"""The `compression` config group: what is done to a trained model to make it smaller or faster,
and the measured trade-off (size, latency, zero-shot) logged beside the dense model's.
quant.py: int8 post-training quantization; prune.py: magnitude pruning (masks held while training)."""

# named once, checked before torch loads (fastclip.checks)
QUANT_SCHEMES = ("dynamic", "weight_only")      # compression.scheme
QUANT_EMBEDDINGS = ("int8", "float")            # compression.embedding
PRUNE_STRUCTURES = ("unstructured", "structured")  # compression.structure
PRUNE_SCHEDULES = ("oneshot", "gradual")        # compression.schedule
