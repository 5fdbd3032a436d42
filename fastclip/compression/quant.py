"""compression=quant: int8 post-training quantization of the trained model with torchao, evaluated
as quantized beside the dense model it came from.

scheme=dynamic: torchao's Int8DynamicActivationInt8WeightConfig (int8 weights, activations
quantized per token at run time); scheme=weight_only: Int8WeightOnlyConfig (int8 weights, float
activations). Attention is converted to plain Linears first (compression.attention), so its
projections are quantized too, not only the MLPs; token embeddings are int8 weight-only
(compression.embedding=int8, the default). Left in float: DTP's boundary predictors and
their auxiliary heads (int8 there would move the boundaries, so the compute, not only the weights'
precision) and RN50's attention pooling (open_clip's AttentionPool2d runs its Linears' weights
through F.multi_head_attention_forward, which torchao's int8 tensors do not support).
"""
import copy

import torch
from torch import nn

from fastclip.compression import FLOAT_PARTS
from fastclip.compression.attention import project_attention
from fastclip.compression.base import Compression, Twin
from fastclip.compression.measure import QUALITY, model_bytes, run_autocast, side_by_side_ms
from fastclip.schema.compression import QUANT_EMBEDDINGS, QUANT_SCHEMES
from fastclip.schema.fields import choice


def _import_torchao() -> None:
    """torchao registers an Enum with torch's pytree at import, which this torch logs as deprecated (a
    warning about torch.compile in every compression=quant run's console, none of the user's doing):
    the first import runs with that one logger quiet."""
    import importlib
    import logging
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module("torchao.quantization")
    finally:
        logger.setLevel(level)


_import_torchao()  # this module is imported only where compression=quant runs (compression.options)


def quantized_copy(model: nn.Module, scheme: str, embedding: str = "int8") -> nn.Module:
    """An int8 copy of `model` (the model itself is left dense) in eval mode. embedding="int8" also
    stores the token embeddings (nn.Embedding: a ViT-B/32 CLIP's 49408 x 512 BPE table is a sixth of
    its weights) as int8, one scale per row (torchao IntxWeightOnlyConfig, PerAxis(0)): a lookup has
    no activation to quantize, whatever the scheme. Raises ValueError for an unknown scheme or
    embedding choice."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    configs = {"dynamic": Int8DynamicActivationInt8WeightConfig, "weight_only": Int8WeightOnlyConfig}
    choice("compression.scheme", scheme, QUANT_SCHEMES)  # the schema's rule: a caller outside a run is checked too
    choice("compression.embedding", embedding, QUANT_EMBEDDINGS)
    out = copy.deepcopy(model).eval()
    from_qat(out)
    project_attention(out)
    # set_inductor_config=False: torchao would otherwise change torch.compile's settings for the whole process
    quantize_(out, configs[scheme](set_inductor_config=False), filter_fn=quantizable(out))
    if embedding == "int8":
        quantize_(out, _intx_weight_only(), filter_fn=quantizable(out, nn.Embedding))
    return out


def quantizable(model: nn.Module, kind: type = nn.Linear):
    """torchao's filter_fn for `model`: its `kind` modules (nn.Linear, nn.Embedding) outside FLOAT_PARTS
    and RN50's attention pooling."""
    from open_clip.modified_resnet import AttentionPool2d
    pooled = {name for name, m in model.named_modules() if isinstance(m, AttentionPool2d)}

    def keep(module: nn.Module, name: str) -> bool:
        parts = name.split(".")
        return (isinstance(module, kind) and not set(parts) & set(FLOAT_PARTS)
                and not any(".".join(parts[:i]) in pooled for i in range(1, len(parts))))
    return keep


def _intx_dynamic():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))


def _intx_weight_only():
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis
    return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))


# compression.scheme -> the torchao config whose fake quantization QAT trains under (qat_config)
QAT_BASES = {"dynamic": _intx_dynamic, "weight_only": _intx_weight_only}


def qat_config(scheme: str):
    """The fake quantization that quantization-aware training applies for compression.scheme: torchao 0.18
    derives none from the int8 configs quantized_copy deploys (QATConfig raises "Unexpected base config"
    for Int8DynamicActivationInt8WeightConfig and Int8WeightOnlyConfig), so the int8 equivalents it does
    support are used: per-channel symmetric int8 weights, as deployed, and (dynamic) per-token int8
    activations, asymmetric where the deployed kernel's are symmetric. Checked on a probe Linear, so a
    scheme this torchao does not support fails here, before training. Raises ConfigError naming the key."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    from fastclip.checks import ConfigError
    if scheme not in QAT_BASES:
        raise ConfigError(f"compression.scheme={scheme!r} with compression.qat=true: quantization-aware training "
                          f"supports {' or '.join(QAT_BASES)}")
    try:
        config = QATConfig(QAT_BASES[scheme](), step="prepare")
        quantize_(nn.Sequential(nn.Linear(8, 8)), config)
    except (ValueError, AssertionError, NotImplementedError) as exc:
        raise ConfigError(f"compression.scheme={scheme!r} with compression.qat=true: this torchao cannot fake-"
                          f"quantize it ({exc})") from None
    return config


def prepare_qat(model: nn.Module, scheme: str) -> None:
    """Quantization-aware training (compression.qat=true), in place, before the optimizer is built:
    attention becomes Linears (compression.attention; its checkpoints keep MultiheadAttention's keys)
    and every Linear quantized_copy would quantize trains through torchao's fake quantization."""
    from torchao.quantization import quantize_
    config = qat_config(scheme)
    project_attention(model)
    quantize_(model, config, filter_fn=quantizable(model))


def from_qat(model: nn.Module) -> None:
    """Fake-quantized Linears back to plain float ones, in place (torchao's QAT convert step without a
    base config); a model never prepared is left as it is."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear
    if any(isinstance(m, FakeQuantizedLinear) for m in model.modules()):
        quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, _: isinstance(m, FakeQuantizedLinear))


def int8_weight_fraction(model: nn.Module) -> float:
    """The share of the model's parameters (by count) stored as int8 (torchao tensor subclasses
    whose data is int8): 1.0 would be every weight, embeddings and norms included."""
    total = quantized = 0
    for p in model.parameters():
        total += p.numel()
        data = getattr(p, "qdata", None)
        if data is not None and data.dtype == torch.int8:
            quantized += p.numel()
    return quantized / max(total, 1)


def compress(task, cfg, dense_metrics: dict[str, float]) -> dict[str, float]:
    """The trained task.model quantized and evaluated. dense_metrics: the final evaluation of the
    model as trained (the loop's), whose quality numbers come back as <name>_dense (after
    quantization-aware training: the trained weights evaluated without fake quantization instead). -> the quantized
    model's quality numbers under their own names (zeroshot/top1, retrieval/..., ImageNet), sizes, the
    int8 share, and the eval latency of both models on the same batch, under the run's autocast."""
    trained = task.model
    was_training = trained.training
    qat = cfg.compression.qat
    try:
        trained.eval()
        dense = trained
        if qat:  # the dense twin: the trained weights without the fake quantization the loop evaluated with
            dense = copy.deepcopy(trained)
            from_qat(dense)
            dense_metrics = task.quality(dense)
        quantized = quantized_copy(dense, cfg.compression.scheme, cfg.compression.embedding)
        images, tokens = task.eval_batch()
        amp = run_autocast(cfg, images.device)
        dense_ms, quant_ms = side_by_side_ms([(dense, images, tokens), (quantized, images, tokens)], amp_dtype=amp)
        metrics = {f"{k}_dense": v for k, v in dense_metrics.items() if k.startswith(QUALITY)}
        metrics.update({k: v for k, v in task.quality(quantized).items() if k.startswith(QUALITY)})
    finally:
        trained.train(was_training)
    metrics.update({"compression/model_mb": model_bytes(quantized) / 1e6,
                    "compression/model_mb_dense": model_bytes(dense) / 1e6,
                    "compression/int8_weight_fraction": int8_weight_fraction(quantized),
                    "time/eval_batch_ms": quant_ms, "time/eval_batch_ms_dense": dense_ms})
    return metrics


class Quantization(Compression):
    """compression=quant. Its twin is the model as trained, in float: after quantization-aware training,
    the trained weights without the fake quantization the loop evaluated with."""
    name = "quant"
    twin = Twin("dense", "the model as trained, in float (after QAT: its weights without fake quantization)")

    def __init__(self, cc, cfg):
        self.scheme, self.embedding, self.qat, self.cfg = cc.scheme, cc.embedding, cc.qat, cfg

    def prepare(self, model: nn.Module, tokenizer=None) -> None:
        if self.qat:
            prepare_qat(model, self.scheme)

    def finish(self, task, final: dict[str, float], step: int) -> dict[str, float]:
        return compress(task, self.cfg, final)

    def describe(self, metrics: dict[str, float]) -> str:
        return self.scheme + (", quantization-aware training" if self.qat else "")

    def summary(self, metrics: dict[str, float]) -> str:
        share = metrics.get("compression/int8_weight_fraction")
        return super().summary(metrics) + (f", {share:.0%} of the parameters int8" if share is not None else "")

