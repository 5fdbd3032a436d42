"""The `compression` config group: what is done to a trained model to make it smaller or faster,
and the measured trade-off (size, latency, zero-shot) logged beside the dense model's."""

QUANT_SCHEMES = ("dynamic", "weight_only")  # compression.scheme (checked before torch loads: fastclip.checks)
