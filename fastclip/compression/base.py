"""The one interface between a compression option and the rest of fastclip, and compression=none.

Who calls what, in a run's order:
  task construction  prepare(model, tokenizer), tags()   before the optimizer sees the model and any
                                                 data is read (a bad option fails first)
  Trainer            start(model, total_steps, warmup_steps, quality_before)
                                                 once the run's length is known (again on a resume)
  task.loss          training_loss(...)          the objective's compression terms
  Trainer.step       before_optimizer_step(), after_optimizer_step(step)
  Trainer checkpoint state_dict() / load_state_dict()
  task evaluation    efficiency(model, images, tokens)   efficiency/* in the layout the run deploys
  the run's end      finish(task, final, step) -> the compressed model's numbers; summary(metrics)

Each option declares its twin once (`twin`): the other model whose quality numbers it logs beside its
own under <metric>_<twin>, and what that model is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for annotations: train.py's console lines import this before torch loads
    import torch
    from torch import nn


@dataclass(frozen=True)
class Twin:
    """The model an option compares itself with: metric names <name>_<suffix>."""
    suffix: str    # dense | before_prune | teacher
    meaning: str   # one sentence: which model that is


class Compression:
    """compression=none, and the defaults every option overrides where it acts."""
    name = "none"
    twin: Twin | None = None

    def prepare(self, model: nn.Module, tokenizer=None) -> None:
        """Before the optimizer is built and any data read: change the model in place (fake
        quantization, a projection head), load what the option needs (a teacher)."""

    def start(self, model: nn.Module, total_steps: int, warmup_steps: int, quality_before=None) -> None:
        """Once the run's length is known (the Trainer), and again on a resume, with the resumed
        schedule's length and warm-up, before load_state_dict: it (re)plans, replacing what an earlier
        call set up, and has no other effect. quality_before: a callable returning the model's quality
        numbers now (evaluated as the loop evaluates: shared by the ranks; the training RNG untouched)."""

    def training_loss(self, loss: torch.Tensor, parts: dict, out: dict, images: torch.Tensor,
                      tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The objective with the option's terms -> (loss, metrics logged per step)."""
        return loss, {}

    def before_optimizer_step(self) -> None:
        """After backward, before clipping and the update."""

    def after_optimizer_step(self, step: int) -> None:
        """After the update that made `step` optimizer steps."""

    def tags(self) -> dict[str, str]:
        """MLflow run tags that say what the option ran with (distill: the teacher's checkpoint and digest)."""
        return {}

    def state_dict(self) -> dict | None:
        """What a checkpoint keeps of the option (None: nothing)."""
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    def efficiency(self, model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
        """An evaluation's efficiency/* (fastclip.eval.efficiency.tower_efficiency) in the layout
        the run reports."""
        from fastclip.eval.efficiency import tower_efficiency
        return tower_efficiency(model, images, tokens)

    def finish(self, task, final: dict[str, float], step: int) -> dict[str, float]:
        """After training: the compressed model measured beside its twin. final: the loop's final
        (test) evaluation of the model as trained; step: the optimizer steps the run made."""
        return {}

    def describe(self, metrics: dict[str, float]) -> str:
        """How the option ran, for the console's summary line (e.g. `dynamic, 94% of the parameters int8`)."""
        return ""

    def summary(self, metrics: dict[str, float]) -> str:
        """One console line: each number finish() logged beside its twin's (and a dense layout's)."""
        pairs = ", ".join(f"{k} {v:.4g} ({twin_label(twin, metrics)} {metrics[f'{k}_{twin}']:.4g})"
                          for k, v in metrics.items() for twin in TWIN_SUFFIXES if f"{k}_{twin}" in metrics)
        return f"compression={self.name} ({self.describe(metrics)}): {pairs}"


# every option's twin suffix, in the order the console lists them; "dense" is also prune's dense layout
TWIN_SUFFIXES = ("dense", "teacher", "before_prune")


def twin_label(suffix: str, metrics: dict) -> str:
    """How the console names a twin: before_prune with the step it was measured at, else its suffix."""
    if suffix != "before_prune":
        return suffix
    step = metrics.get("compression/before_prune_step")
    return "before pruning" + (f", at step {step:.0f}:" if step is not None else ":")
