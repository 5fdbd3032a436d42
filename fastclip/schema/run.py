"""Schemas of the run's own keys and of the groups every run has: trainer, eval, tracking, task."""
from dataclasses import dataclass
from typing import Any, ClassVar, List, Optional

from fastclip.schema.errors import ConfigError
from fastclip.schema.fields import at_least, choice, frozen, mutable, runtime
from fastclip.schema.steps import check_steps
from fastclip.schema.workers import check_workers

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ADAMW_IMPLS = ("fused", "foreach", "for_loop")
IMAGENET_TEMPLATES = ("openai", "simple")  # eval.imagenet.TEMPLATE_SETS' keys (open_clip's sets)


@dataclass
class Trainer:
    # key -> the one task that reads it; set apart from its default with the other task alone, it is
    # refused on the command line (fastclip.override_checks), never a silent no-op
    READ_BY: ClassVar[dict[str, str]] = {"num_workers": "clip", "loader_timeout_s": "clip"}
    batch_size: int = frozen()
    lr: float = mutable()
    weight_decay: float = frozen()
    predictor_lr_scale: float = frozen()
    betas: List[float] = frozen()
    eps: float = frozen()
    optimizer_impl: str = runtime()
    # not mutable: the warm-up was resolved to steps when the run started and the checkpoint keeps
    # that count (a longer run warms up no second time: optim.Schedule.replanned)
    warmup_steps: Any = frozen()
    grad_clip: Optional[float] = mutable()
    accum_steps: int = frozen()
    max_steps: Optional[int] = mutable()
    max_pflops: Optional[float] = mutable()
    count_flops_every: Optional[int] = runtime()
    full_token_steps: Any = frozen()
    precision: str = frozen()
    num_workers: Any = runtime()  # int or "auto": OmegaConf's structured configs take no Union[int, str]
    progress: bool = runtime()
    ckpt_every_steps: Optional[int] = runtime()
    resume: Optional[str] = runtime()
    loader_timeout_s: int = runtime()
    ddp_find_unused_parameters: bool = runtime()
    torch_threads: Optional[int] = runtime()
    compile: bool = runtime()

    def __post_init__(self):
        choice("trainer.precision", self.precision, PRECISIONS)
        choice("trainer.optimizer_impl", self.optimizer_impl, ADAMW_IMPLS)
        at_least("trainer.batch_size", self.batch_size, 1)
        at_least("trainer.accum_steps", self.accum_steps, 1)
        if self.lr <= 0:
            raise ConfigError(f"trainer.lr={self.lr}: expected > 0")
        check_steps("trainer.warmup_steps", self.warmup_steps)
        if self.max_pflops is not None:
            if self.max_pflops <= 0:
                raise ConfigError(f"trainer.max_pflops={self.max_pflops}: expected a budget > 0 (PFLOPs)")
            if self.max_steps:
                raise ConfigError(f"trainer.max_pflops={self.max_pflops} with trainer.max_steps={self.max_steps}: the "
                                  f"budget decides the run's length; set one of them")
        at_least("trainer.max_steps", self.max_steps, 1, ">= 1, or null (epochs decide)")  # 0 read as unset
        at_least("trainer.count_flops_every", self.count_flops_every, 1, ">= 1 (steps), or null")
        at_least("trainer.ckpt_every_steps", self.ckpt_every_steps, 1, ">= 1 (steps), or null")
        at_least("trainer.torch_threads", self.torch_threads, 1, ">= 1, or null")
        at_least("trainer.loader_timeout_s", self.loader_timeout_s, 0, ">= 0 (seconds; 0 waits forever)")
        check_workers("trainer.num_workers", self.num_workers)
        check_steps("trainer.full_token_steps", self.full_token_steps)


@dataclass
class Eval:
    batch_size: int = runtime()
    lm_batch_size: int = runtime()
    every_epochs: int = mutable()
    boundary_picture: bool = runtime()
    num_workers: Any = runtime()  # int or "auto", as trainer.num_workers
    imagenet_val: Optional[str] = mutable()
    imagenet_templates: str = mutable()
    classifier_cache_dir: Optional[str] = runtime()
    placement_control: bool = mutable()
    overlap: str = mutable()
    # key -> the one task that reads it (every_epochs and boundary_picture: both); set apart from its
    # default with the other task alone, it is refused on the command line (fastclip.override_checks)
    READ_BY: ClassVar[dict[str, str]] = {
        "batch_size": "clip", "num_workers": "clip", "imagenet_val": "clip", "imagenet_templates": "clip",
        "classifier_cache_dir": "clip", "placement_control": "clip", "overlap": "clip", "lm_batch_size": "lm"}

    def __post_init__(self):
        at_least("eval.every_epochs", self.every_epochs, 1)
        at_least("eval.batch_size", self.batch_size, 1)
        at_least("eval.lm_batch_size", self.lm_batch_size, 1)
        check_workers("eval.num_workers", self.num_workers)
        choice("eval.overlap", self.overlap, ("drop", "fail"))
        choice("eval.imagenet_templates", self.imagenet_templates, IMAGENET_TEMPLATES)


@dataclass
class Tracking:
    uri: Optional[str] = runtime()
    experiment: str = frozen()
    run_name: Optional[str] = runtime()
    log_every: int = runtime()

    def __post_init__(self):
        at_least("tracking.log_every", self.log_every, 1)


@dataclass
class ClipTask:
    name: str = frozen()


@dataclass
class LMTask:
    name: str = frozen()
    context: int = frozen()
    eval_stride: int = frozen()
    valid_max_chars: Optional[int] = frozen()


@dataclass
class Run:
    """The root: the run's own keys and one field per config group (each typed by its option's schema)."""
    epochs: int = mutable()
    seed: int = frozen()
    device: str = runtime()
    task: Any = frozen()
    dataset: Any = frozen()
    encoder: Any = frozen()
    boundary: Any = frozen()
    compression: Any = frozen()
    trainer: Any = frozen()
    tracking: Any = frozen()
    eval: Any = frozen()

    def __post_init__(self):
        at_least("epochs", self.epochs, 1)
