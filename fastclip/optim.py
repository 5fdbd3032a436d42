"""What the loop optimises with: AdamW's parameter groups and kernel, and the warm-up + cosine
schedule (open_clip_train's recipe), its length checked against the run's."""
import logging
import math
from dataclasses import dataclass

import torch

from fastclip.errors import InputError
from fastclip.schema.run import ADAMW_IMPLS
from fastclip.checks import warmup_steps as checked_warmup

log = logging.getLogger(__name__)


@dataclass
class Schedule:
    """The lr factor (x trainer.lr) of each optimizer step: a linear warm-up to 1 over `warmup` steps,
    then a cosine from `peak` at step `start` to 0 at step `total` (open_clip_train's recipe:
    start = warmup, peak = 1). Steps count from 0: factor(s) is what update s+1 uses.

    A resume that changes the run's length keeps the warm-up (`warmup` is resolved once, when the
    run starts, and travels in the checkpoint: LambdaLR saves a callable object's fields) and
    re-plans the cosine from where the run is: `replanned`. Units: steps; factors in [0, 1]."""
    warmup: int
    total: int
    start: int | None = None   # None: the warm-up's end
    peak: float = 1.0

    def __post_init__(self):
        if self.start is None:
            self.start = self.warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        # clamped below too: a re-plan's start lies after the warm-up, and the step before it ran at `peak`
        progress = min(1.0, max(0.0, (step - self.start) / max(1, self.total - self.start)))
        return self.peak * 0.5 * (1.0 + math.cos(math.pi * progress))

    def replanned(self, step: int, total: int) -> "Schedule":
        """This schedule for a run resumed at `step` (steps taken) that now ends at `total`.
        The same length: itself (an exact resume). Another length: the warm-up keeps its step count
        (no second warm-up); a cosine that has not begun yet begins where it was planned, one under
        way goes on from `step` at the factor of the last update (step - 1's, so the lr never jumps
        up) down to 0 at `total`. A finished run extended thus trains on at its last, smallest lr.
        Raises ValueError when `total` ends before the warm-up."""
        if total == self.total:
            return self
        if total < self.warmup:
            raise InputError(f"the run's warm-up is {self.warmup} steps (resolved when it started); a schedule of "
                             f"{total} steps would end before it")
        if step <= self.start:
            return Schedule(self.warmup, total, self.start, self.peak)
        return Schedule(self.warmup, total, step, self(step - 1))

    def describe(self, step: int) -> str:
        """What the schedule does from `step` on, for the run's plan line."""
        cosine = f"cosine to 0 at step {self.total}"
        if step < self.warmup:
            return f"warm-up {self.warmup} steps (to step {self.warmup}), then {cosine}"
        done = f"warm-up done ({self.warmup} steps)" if self.warmup else "no warm-up"
        if self.start == self.warmup and self.peak == 1.0:
            return f"{done}, {cosine}"
        return f"{done}, {cosine} from {self.peak:.4g} x trainer.lr at step {self.start} (re-planned on resume)"


def warmup_cosine(warmup: int, total: int) -> Schedule:
    """lr factor of step s: linear warm-up to 1 over `warmup` steps, then cosine to 0 at `total`."""
    return Schedule(warmup, total)


def warmup_steps(value, total: int) -> int:
    """trainer.warmup_steps as steps of this run of `total` (checks.warmup_steps); a warm-up over half
    the run is a warning."""
    steps = checked_warmup(value, total, f"the run ({total} optimizer steps)")
    if steps > total / 2:
        log.warning("trainer.warmup_steps=%s takes %d of the run's %d steps: most of the run is warm-up",
                    value, steps, total)
    return steps


def boundary_decision_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that decide where boundaries go: every BoundaryPredictor's, and the
    stride start's per-position logits (vision tower, `position_logits`)."""
    from fastclip.models.dtp import BoundaryPredictor
    ids = {id(p) for m in model.modules() if isinstance(m, BoundaryPredictor) for p in m.parameters()}
    return ids | {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "position_logits"}


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, predictor_lr_scale: float = 1.0):
    """No decay on gains, biases, embeddings' scale and the logit scale (as open_clip_train).
    The boundary predictors' parameters learn at lr x predictor_lr_scale (their only task signal
    is the straight-through estimate through the pooling, and in CLIP towers they stayed near the
    prior: docs/results/dtp_image_findings.md)."""
    if predictor_lr_scale <= 0:
        raise InputError(f"trainer.predictor_lr_scale={predictor_lr_scale}: expected > 0")
    deciding = boundary_decision_parameters(model) if predictor_lr_scale != 1.0 else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        groups.setdefault((id(p) in deciding, skip), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if skip else weight_decay,
             "lr": lr * (predictor_lr_scale if predictor else 1.0)}
            for (predictor, skip), params in sorted(groups.items())]


def adamw_impl(name: str) -> dict:
    """torch AdamW's implementation switch. fused: one kernel over all parameters, the fastest on the
    CPU and on CUDA (measured: docs/guide/data.md, trainer.optimizer_impl)."""
    if name not in ADAMW_IMPLS:
        raise InputError(f"trainer.optimizer_impl={name!r}: expected one of {', '.join(ADAMW_IMPLS)}")
    return {"fused": name == "fused", "foreach": name == "foreach"}


def build_adamw(model: torch.nn.Module, tc) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.lr, tc.predictor_lr_scale), lr=tc.lr,
                             betas=tuple(tc.betas), eps=tc.eps, **adamw_impl(tc.optimizer_impl))
