"""compression=prune: magnitude pruning during training, masks held through every optimizer step.

structure=unstructured: global magnitude over every nn.Linear weight and attention's packed input
projection (MultiheadAttention.in_proj_weight), the smallest |w| across the whole model zeroed.
structure=structured: in every transformer block (open_clip's ResidualAttentionBlock) the same share
of attention heads and of MLP channels, those with the smallest L1 norm (a head: its q, k and v rows
and its out_proj columns; a channel: its c_fc row and c_proj column); at the end they are removed
(`shrunk_copy`), so the matrices shrink and the dense forward gets cheaper.

schedule=oneshot: the model trains dense until `compression.finetune_steps` before the end, is pruned
to `compression.sparsity` there, and fine-tunes the rest with the masks held (inside the run's one
schedule, so a pruned run trains as many steps as a dense one; the fine-tuning has the schedule's
tail learning rate). schedule=gradual: the cubic schedule of Zhu & Gupta 2017 ("To prune, or not to
prune"): s_t = s_f (1 - (1 - (t - t0) / (t1 - t0))^3) from the warm-up's end t0 to t1 = the start of
the fine-tuning, masks recomputed every `compression.prune_every` steps.

Masks act on the weights themselves: after every optimizer step the pruned entries are set to zero
again, so every reader of a weight sees them (why not torch.nn.utils.prune: prune_masks.py, which
selects the weights). Left dense: DTP's boundary predictors and their auxiliary heads
(pruning them moves the boundaries, so the compute), embeddings, norms and the projections kept as
bare parameters.
"""
import logging

import torch
from torch import nn

from fastclip.schema import typed_node
from fastclip.schema.errors import ConfigError
from fastclip.compression.base import Compression, Twin
from fastclip.compression.measure import QUALITY, model_bytes, run_autocast, side_by_side_ms
from fastclip.compression.prune_masks import (blocks, nonzero_parameters, shrunk_copy, structured_masks,
                                              unstructured_masks, weight_sparsity)

log = logging.getLogger(__name__)


class Pruner:
    """The masks of one run and the schedule that sets them (module docstring). after_step(step) is
    called after every optimizer step: it recomputes the masks where the schedule's target changed and
    zeroes the pruned entries again. state_dict() holds the masks, so a resume continues exactly.

    quality_before: called once, just before a oneshot pruning: the zero-shot of the model as it was
    then (trained `end` steps, not the whole run), kept in the state as `before_prune` with the step
    (`before_prune_step`). It is no dense twin of the final model: that one trained the last
    `total_steps - end` steps more. cc: the compression group (fastclip.schema.compression.Prune, or
    a DictConfig, checked by it). Raises ConfigError for a value out of its range or a pruning span the
    run does not have."""

    def __init__(self, model: nn.Module, cc, total_steps: int, warmup_steps: int, quality_before=None):
        cc = typed_node("compression", cc)  # a DictConfig checked by the schema; the dataclass as it is
        self.model, self.quality_before = model, quality_before
        self.sparsity = float(cc.sparsity)
        self.structure, self.schedule = cc.structure, cc.schedule
        self.start, self.end, self.every = cc.span(total_steps, warmup_steps)  # pruned to the target from `end` on
        self.masks: dict[str, torch.Tensor] = {}
        self.applied = 0.0  # the target the masks were made for
        self.before_prune: dict[str, float] = {}
        self.before_prune_step: int | None = None

    def target(self, step: int) -> float:
        """The sparsity the schedule asks for after `step` optimizer steps."""
        if step >= self.end:
            return self.sparsity
        if self.schedule == "oneshot" or step < self.start:
            return 0.0
        t = (step - self.start) // self.every * self.every  # held between mask updates
        return self.sparsity * (1 - (1 - t / (self.end - self.start)) ** 3)

    def after_step(self, step: int, target: float | None = None) -> None:
        """After `step` optimizer steps: the masks for the schedule's target there (or `target`)."""
        # never below the masks held: a resume that lengthens the run re-plans `end` later, and the
        # schedule's target there can fall under what the checkpoint's steps already pruned
        target = max(self.target(step) if target is None else target, self.applied)
        if target != self.applied:
            if self.schedule == "oneshot" and self.quality_before is not None:
                self.before_prune, self.before_prune_step = self.quality_before(), step
            make = unstructured_masks if self.structure == "unstructured" else structured_masks
            self.masks = make(self.model, target) if target > 0 else {}
            self.applied = target
            log.info("step %d: pruned to %.1f%% %s sparsity (target %.1f%% at step %d)", step, 100 * target,
                     self.structure, 100 * self.sparsity, self.end)
        self.apply()

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zeroes the pruned entries' gradients (before clipping: a pruned weight's gradient must not
        count in the norm that scales the surviving ones)."""
        params = dict(self.model.named_parameters())
        for name, mask in self.masks.items():
            grad = params[name].grad
            if grad is not None:
                grad.mul_(mask)

    def finish(self, step: int) -> bool:
        """The schedule's final masks, if the run ended (after `step` steps) before reaching them (a
        compute budget, skipped batches) -> whether they had to be applied now (then without
        fine-tuning; a oneshot's before-pruning numbers are the model's at `step`)."""
        if self.applied == self.sparsity:
            return False
        self.after_step(step, self.sparsity)
        return True

    @torch.no_grad()
    def apply(self) -> None:
        """Zeroes the pruned entries (after each optimizer step, and after loading weights)."""
        params = dict(self.model.named_parameters())
        for name, mask in self.masks.items():
            params[name].mul_(mask)

    def state_dict(self) -> dict:
        return {"applied": self.applied, "before_prune": self.before_prune,
                "before_prune_step": self.before_prune_step, "masks": {k: v.cpu() for k, v in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.model.named_parameters())
        self.applied = state["applied"]
        # "dense": what checkpoints from before the rename called it (its step was not kept)
        self.before_prune = dict(state.get("before_prune", state.get("dense")) or {})
        self.before_prune_step = state.get("before_prune_step")
        self.masks = {k: v.to(params[k].device) for k, v in state["masks"].items()}
        self.apply()


@torch.no_grad()
def _gflops(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    from fastclip.eval.efficiency import count_gflops
    return {"efficiency/image_gflops": count_gflops(model.visual, images)[0],
            "efficiency/text_gflops": count_gflops(model.text, tokens)[0]}


def shrunk_layout_efficiency(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """A structured pruning's evaluation efficiency/* (fastclip.eval.efficiency.tower_efficiency),
    counted on the layout it deploys (`shrunk_copy`: its pruned heads and channels removed, as
    `compress` does; before any is pruned, the dense layout), with the dense layout's count beside
    it as efficiency/{image,text}_gflops_dense: every evaluation's efficiency/*_gflops is the same
    layout's as the run's final summary."""
    from fastclip.eval.efficiency import tower_efficiency
    was_training = model.training
    try:
        model.eval()
        metrics = tower_efficiency(shrunk_copy(model), images, tokens)
        metrics.update({f"{k}_dense": v for k, v in _gflops(model, images, tokens).items()})
    finally:
        model.train(was_training)
    return metrics


def compress(task, cfg, pruner: Pruner, final: dict[str, float], step: int) -> dict[str, float]:
    """The pruned model measured: the sparsity counted from its weights, its nonzero parameters, its
    bytes, its eval latency beside its dense layout's, and (oneshot) the zero-shot the model had just
    before pruning as <name>_before_prune, with that step as compression/before_prune_step: the model
    trained that many steps, not the run's, so no dense twin (a compression=none run is). structured:
    the pruned heads and channels removed first; its
    zero-shot is the shrunk model's own (it equals the masked model's, which the loop evaluated), and
    efficiency/{image,text}_gflops are counted on it (beside the dense layout's as *_dense). A run that
    ended (step) before its schedule's final masks gets them now, unfine-tuned, and says so
    (compression/pruned_at_end = 1).
    Unstructured zeros stay in dense matrices: the FLOPs and the latency do not fall, and the
    numbers show it."""
    model = task.model
    was_training = model.training
    late = pruner.finish(step)
    if late:
        log.warning("the run ended at step %d, before its pruning schedule's end (step %d): the final masks were "
                    "applied now, without fine-tuning", step, pruner.end)
    try:
        model.eval()
        deployed = shrunk_copy(model) if pruner.structure == "structured" else model
        images, tokens = task.eval_batch(split="test")  # the efficiency/* it logs are the test split's, as the loop's
        # the dense twin is the pruned model in its dense layout: dense kernels take the same time whatever
        # the values (unstructured: it is the deployed model itself, timed again); both under the run's autocast
        amp = run_autocast(cfg, images.device)
        dense_ms, pruned_ms = side_by_side_ms([(model, images, tokens), (deployed, images, tokens)], amp_dtype=amp)
        metrics = {f"{k}_before_prune": v for k, v in pruner.before_prune.items() if k.startswith(QUALITY)}
        if pruner.before_prune_step is not None:
            metrics["compression/before_prune_step"] = float(pruner.before_prune_step)
        if deployed is not model or late:  # the loop's final evaluation was of another model
            metrics.update({k: v for k, v in task.quality(deployed).items() if k.startswith(QUALITY)})
        else:
            metrics.update({k: v for k, v in final.items() if k.startswith(QUALITY)})
        if deployed is not model:
            metrics.update(_gflops(deployed, images, tokens))  # the shrunk towers' own count
            metrics.update({f"{k}_dense": v for k, v in _gflops(model, images, tokens).items()})
    finally:
        model.train(was_training)
    metrics.update({
        "compression/sparsity": weight_sparsity(model),
        "compression/params_nonzero": float(nonzero_parameters(deployed)),
        "compression/params_nonzero_dense": float(sum(p.numel() for p in model.parameters())),
        "compression/model_mb": model_bytes(deployed) / 1e6, "compression/model_mb_dense": model_bytes(model) / 1e6,
        "time/eval_batch_ms": pruned_ms, "time/eval_batch_ms_dense": dense_ms})
    metrics["compression/pruned_at_end"] = float(late)
    return metrics


class Pruning(Compression):
    """compression=prune. Its twin (oneshot only) is the model just before it was pruned, at that step:
    it trained fewer steps than the run, so no dense twin of the finished run (a compression=none run
    is). Its *_dense latency, bytes and GFLOPs are the pruned weights in the dense layout."""
    name = "prune"
    twin = Twin("before_prune", "the model at the step it was pruned (oneshot), before pruning")

    def __init__(self, cc, cfg):
        self.cc, self.cfg = cc, cfg
        self.pruner: Pruner | None = None

    def prepare(self, model: nn.Module, tokenizer=None) -> None:
        """structured takes heads and channels from transformer blocks: a tower without any (RN50's
        ResNet) would stay dense while the run reports structured pruning; refused, naming the tower."""
        if self.cc.structure != "structured":
            return
        for tower, module in (("image", model.visual), ("text", model.text)):
            if not blocks(module):
                raise ConfigError(f"compression.structure=structured with encoder={self.cfg.encoder.name}: its {tower} "
                                  f"tower has no transformer blocks (open_clip's ResidualAttentionBlock) to take heads "
                                  f"and channels from; use compression.structure=unstructured (its Linear and attention "
                                  f"weights; convolutions stay dense)")

    def start(self, model: nn.Module, total_steps: int, warmup_steps: int, quality_before=None) -> None:
        self.pruner = Pruner(model, self.cc, total_steps, warmup_steps, quality_before)

    def before_optimizer_step(self) -> None:
        self.pruner.mask_gradients()

    def after_optimizer_step(self, step: int) -> None:
        self.pruner.after_step(step)

    def state_dict(self) -> dict:
        return self.pruner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.pruner.load_state_dict(state)

    def efficiency(self, model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
        if self.cc.structure != "structured":  # zeros in dense matrices: the layout is the model's own
            return super().efficiency(model, images, tokens)
        return shrunk_layout_efficiency(model, images, tokens)

    def finish(self, task, final: dict[str, float], step: int) -> dict[str, float]:
        return compress(task, self.cfg, self.pruner, final, step)

    def describe(self, metrics: dict[str, float]) -> str:
        said = (f"{self.cc.structure} {self.cc.schedule}, {metrics['compression/sparsity']:.1%} of the prunable "
                f"weights zero (Linear and attention; embeddings, norms, convolutions and predictors are never pruned)")
        if metrics.get("compression/params_nonzero_dense"):
            said += f": {1 - metrics['compression/params_nonzero'] / metrics['compression/params_nonzero_dense']:.1%} " \
                    f"of all parameters gone"
        return said

