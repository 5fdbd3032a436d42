"""compression.name -> its option (base.Compression), the one place the names are mapped to code."""
from fastclip.compression.base import Compression
from fastclip.errors import InputError
from fastclip.schema import typed_group


def build_compression(cfg) -> Compression:
    """The run's compression option, built from cfg.compression (the run's whole config is kept for what
    an option reads beyond its group: the encoder's input size, the run's precision, the MLflow store).
    Raises ValueError for an unknown name (fastclip.checks refuses it first, naming the choices)."""
    cc = typed_group(cfg, "compression")  # fastclip.schema.compression's dataclass
    if cc.name == "none":
        return Compression()
    if cc.name == "quant":
        from fastclip.compression.quant import Quantization
        return Quantization(cc, cfg)
    if cc.name == "prune":
        from fastclip.compression.prune import Pruning
        return Pruning(cc, cfg)
    if cc.name == "distill":
        from fastclip.compression.distill import Distillation
        return Distillation(cc, cfg)
    raise InputError(f"compression={cc.name!r}: expected none, quant, prune or distill")
