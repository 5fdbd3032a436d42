"""What the training loop (fastclip.loop) and the run (fastclip.train) may ask of a task: the
`Task` protocol, the `StepOutput` a task's loss hands back, and `TaskBase`, whose defaults say
"this task has none" for each optional part, so callers ask plainly and never probe for an
attribute. ClipTask and LMTask subclass TaskBase; so may a test's stand-in task.

This module imports nothing of the package but the compression interface (itself a leaf): towers,
data and the loop all sit on either side of it.
"""
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import torch

from fastclip.compression.base import Compression


@dataclass
class StepOutput:
    """What a task's loss(batch) hands the loop."""
    loss: torch.Tensor | None        # None: nothing to learn from (every sample of the batch was bad)
    metrics: dict = field(default_factory=dict)   # name -> float or 0-dim device tensor (read when logged)
    samples: int = 0                 # samples the loss was computed on
    skipped: dict = field(default_factory=dict)   # reason -> samples of this batch left out

    def __iter__(self):  # `loss, metrics, n = task.loss(batch)`, as the tuple it replaced
        return iter((self.loss, self.metrics, self.samples))


class Batches(Protocol):
    """An epoch's micro-batches: len() is the WHOLE epoch's count, iteration starts where asked."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


class Backward(Protocol):
    """What a task's accumulate() runs one optimizer step's micro-batches through (the Trainer's)."""

    accum: int                         # trainer.accum_steps: micro-batches with a loss in a full step
    forward: torch.nn.Module | None    # data-parallel: the DistributedDataParallel wrapper; else None

    def autocast(self) -> AbstractContextManager:
        """The run's mixed precision, around a forward and its loss."""

    def sync(self, last: bool) -> AbstractContextManager:
        """Around a forward and its backward: data-parallel, gradients stay local (DDP's no_sync)
        unless `last`, the step's last backward, which averages them over the ranks."""

    def backward(self, loss: torch.Tensor) -> None:
        """Adds the gradients of `loss` (scaled by the fp16 grad scaler where there is one)."""


class Task(Protocol):
    """Everything the loop and the run use of a task. The first four each task defines; the rest
    TaskBase answers with "none" unless the task overrides them."""

    model: torch.nn.Module            # what the optimizer trains and a checkpoint saves
    build_skipped: Mapping[str, int]  # reason -> samples left out while building the data (counted once)
    checks_eval_overlap: bool         # whether training samples in an evaluation set are left out (data/eval_overlap)
    eval_duplicates: int | None       # evaluation images merged as copies (data/eval_duplicates); None: not checked
    tags: Mapping[str, str]           # MLflow run tags the task adds (e.g. which retrieval set)
    compression: Compression          # the run's compression option (its hooks; compression=none: no-ops)
    shards_evaluation: bool           # data-parallel: every rank evaluates its share (eval/sharded.py), not rank 0 alone

    def train_batches(self, epoch: int, start: int = 0) -> Batches:
        """Epoch `epoch`'s micro-batches after its first `start` (a resumed epoch); len = the whole epoch."""

    def loss(self, batch: Any, forward: torch.nn.Module | None = None) -> StepOutput:
        """One micro-batch's loss and metrics; tensor metrics stay on the device until the loop reads
        them (logged as train/<name>; a name with its own prefix, distill/kl, as is). forward
        (data-parallel runs only): the DistributedDataParallel wrapper to run the model through."""

    def usable(self, batch: Any) -> bool:
        """Whether `batch` has anything to learn from (False: every sample was bad; its loss is None)."""

    def accumulate(self, batches: list, run: Backward) -> list[StepOutput]:
        """One optimizer step's micro-batches: forward and backward of each through `run`, the
        gradients of the step's objective left in the parameters -> each batch's StepOutput, in order."""

    def evaluate(self) -> dict[str, float]:
        """The periodic evaluation (validation split): metric name -> value."""

    def final_evaluate(self) -> dict[str, float]:
        """Once, after training: the reported (test) numbers; {} when there are none beyond evaluate()."""

    def quality(self) -> dict[str, float]:
        """The model's quality as it is now, for compression's before/after comparisons."""

    def epoch_samples(self) -> int | None:
        """Samples the training source declares per epoch (data/trained_fraction); None: not known."""

    def new_artifacts(self) -> list[Path]:
        """Files written since the last call (by evaluate), to attach to the run."""

    def close(self) -> None:
        """Releases what the task holds past the run (the training loader's persistent workers)."""

    def params(self) -> dict[str, int]:
        """Parameter counts logged as run params (name -> count)."""

    def sizes(self) -> dict[str, int]:
        """The data's sizes for the run's plan line (e.g. "train samples/epoch" -> n)."""


class TaskBase:
    """The optional parts of `Task`, as "this task has none". Subclasses define model, train_batches,
    loss and evaluate, and override what else they have. The class-level mappings are read-only:
    a task that has skips or tags sets its own."""

    build_skipped: Mapping[str, int] = MappingProxyType({})
    checks_eval_overlap: bool = False
    eval_duplicates: int | None = None
    tags: Mapping[str, str] = MappingProxyType({})
    compression: Compression = Compression()  # compression=none holds no state: one instance serves every task
    shards_evaluation: bool = False

    def usable(self, batch: Any) -> bool:
        return True

    def accumulate(self, batches: list, run: Backward) -> list[StepOutput]:
        """Plain gradient accumulation: each micro-batch's loss / trainer.accum_steps, backward in
        turn. Exact where a sample's loss does not depend on the other samples of its batch and each
        micro-batch is a mean over the same number of samples (the LM task's next-character
        cross-entropy); a contrastive loss is not such a loss (ClipTask overrides this)."""
        outs = []
        for i, batch in enumerate(batches):
            with run.sync(i == len(batches) - 1):
                with run.autocast():
                    out = self.loss(batch, forward=run.forward) if run.forward is not None else self.loss(batch)
                if out.loss is not None:
                    run.backward(out.loss / run.accum)
            outs.append(out)
        return outs

    def final_evaluate(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        return None

    def quality(self) -> dict[str, float]:
        raise NotImplementedError(f"{type(self).__name__} has no quality measure for compression to compare")

    def epoch_samples(self) -> int | None:
        return None

    def wrote(self, path: Path) -> None:
        """A file evaluate() wrote (a boundary picture), handed to the run at the next new_artifacts()."""
        self.__dict__.setdefault("_artifacts", []).append(path)

    def new_artifacts(self) -> list[Path]:
        return self.__dict__.pop("_artifacts", [])

    def params(self) -> dict[str, int]:
        return {"model.params_total": sum(p.numel() for p in self.model.parameters())}

    def sizes(self) -> dict[str, int]:
        return {}
