"""Schemas of the compression group's options (fastclip.compression implements them)."""
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from fastclip.schema.errors import ConfigError
from fastclip.schema.fields import choice, frozen
from fastclip.schema.steps import check_steps, steps_of

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
    # key -> the (key, value) pairs it is read under (fastclip.schema.unread.unmet); set apart from its
    # default otherwise, it is a no-op: refused on the command line where no job reads it, named by the job
    # that does not (fastclip.schema.unread)
    READ_WHEN: ClassVar[dict] = {"start_step": (("schedule", "gradual"),), "prune_every": (("schedule", "gradual"),)}

    def span(self, total_steps: int, warmup_steps: int) -> tuple[int, int, int]:
        """(start, end, every) of the pruning in a `total_steps`-step run whose warm-up ends at
        `warmup_steps`: masks at the target from step `end` (finetune_steps before the end); gradual's
        ramp from `start` (start_step, or the warm-up's end) with a mask update every `every` steps.
        Raises ConfigError naming the key whose value leaves no pruning: a finetune_steps as long as
        the run, a start_step at or past the ramp's end, a prune_every that updates once (oneshot)."""
        finetune = steps_of(self.finetune_steps, total_steps, "compression.finetune_steps")
        end = total_steps - finetune
        if end < 1:
            raise ConfigError(f"compression.finetune_steps={self.finetune_steps} leaves no steps to train before "
                              f"pruning (a {total_steps}-step run)")
        start = warmup_steps if self.start_step is None else \
            steps_of(self.start_step, total_steps, "compression.start_step")
        if self.schedule == "oneshot":
            return end, end, 1
        if end <= start:
            key, value = (("compression.start_step", self.start_step) if self.start_step is not None else
                          ("compression.finetune_steps", self.finetune_steps))
            raise ConfigError(f"{key}={value} leaves the gradual ramp no steps: it would start at step {start} "
                              f"({'start_step' if self.start_step is not None else 'the warm-up'}) and end at "
                              f"step {end} of {total_steps} (finetune_steps before the end)")
        if self.prune_every is not None and self.prune_every >= end - start:
            raise ConfigError(f"compression.prune_every={self.prune_every} is at least the ramp's {end - start} steps "
                              f"(from step {start} to {end}): the gradual schedule would prune once, at its end; "
                              f"use compression.schedule=oneshot, or fewer steps between updates")
        return start, end, self.prune_every or max(1, (end - start) // 20)

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
