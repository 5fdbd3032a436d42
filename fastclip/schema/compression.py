"""Schemas of the compression group's options (fastclip.compression implements them)."""
from dataclasses import dataclass
from typing import Any, Optional

from fastclip.schema.errors import ConfigError
from fastclip.schema.fields import choice, frozen
from fastclip.schema.steps import check_steps

QUANT_SCHEMES = ("dynamic", "weight_only")         # compression.scheme
QUANT_EMBEDDINGS = ("int8", "float")               # compression.embedding
PRUNE_STRUCTURES = ("unstructured", "structured")  # compression.structure
PRUNE_SCHEDULES = ("oneshot", "gradual")           # compression.schedule


@dataclass
class NoCompression:
    name: str = frozen()


@dataclass
class Quant:
    name: str = frozen()
    scheme: str = frozen()
    qat: bool = frozen()
    embedding: str = frozen()

    def __post_init__(self):
        choice("compression.scheme", self.scheme, QUANT_SCHEMES)
        choice("compression.embedding", self.embedding, QUANT_EMBEDDINGS)


@dataclass
class Prune:
    name: str = frozen()
    sparsity: float = frozen()
    structure: str = frozen()
    schedule: str = frozen()
    finetune_steps: Any = frozen()
    start_step: Any = frozen()
    prune_every: Optional[int] = frozen()

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"compression.sparsity={self.sparsity}: expected a share of the weights in [0, 1)")
        choice("compression.structure", self.structure, PRUNE_STRUCTURES)
        choice("compression.schedule", self.schedule, PRUNE_SCHEDULES)
        check_steps("compression.finetune_steps", self.finetune_steps)
        if self.start_step is not None:
            check_steps("compression.start_step", self.start_step)
        if self.prune_every is not None and self.prune_every < 1:
            raise ConfigError(f"compression.prune_every={self.prune_every}: expected a number of steps >= 1 (or null)")


@dataclass
class Distill:
    name: str = frozen()
    teacher: Optional[str] = frozen()
    alpha: float = frozen()
    beta: float = frozen()
    temperature: float = frozen()

    def __post_init__(self):
        if not self.teacher:
            raise ConfigError("compression=distill needs compression.teacher: a fastclip checkpoint, a run dir or "
                              "runs:/<MLflow run id> (a task=clip run)")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"compression.alpha={self.alpha}: expected the distillation's share in [0, 1]")
        if self.beta < 0:
            raise ConfigError(f"compression.beta={self.beta}: expected a feature-MSE weight >= 0")
        if self.temperature <= 0:
            raise ConfigError(f"compression.temperature={self.temperature}: expected > 0")
