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
again, so every reader of a weight sees them (open_clip's MultiheadAttention reads
`out_proj.weight` and `in_proj_weight` directly, not through the Linear's forward, which is why
torch.nn.utils.prune's forward pre-hooks never refresh there: pytorch#69353; fastclip's packed DTP
path reads them directly too). torch.nn.utils.prune also re-registers the parameters it prunes,
which reorders them under the optimizer and DistributedDataParallel; so the selection (a top-k
over magnitudes) is written here. Left dense: DTP's boundary predictors and their auxiliary heads
(pruning them moves the boundaries, so the compute), embeddings, norms and the projections kept as
bare parameters.
"""
import copy
import logging

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from fastclip.checks import ConfigError, steps_of
from fastclip.compression import PRUNE_SCHEDULES, PRUNE_STRUCTURES
from fastclip.compression.attention import ProjectedAttention, project_attention
from fastclip.compression.quant import FLOAT_PARTS

log = logging.getLogger(__name__)


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> the weights unstructured pruning ranks: every nn.Linear's weight and every
    MultiheadAttention's in_proj_weight, outside DTP's predictors and their auxiliary heads."""
    out = {}
    for name, module in model.named_modules():
        if set(name.split(".")) & set(FLOAT_PARTS):
            continue
        if isinstance(module, nn.Linear):
            out[f"{name}.weight"] = module.weight
        elif isinstance(module, nn.MultiheadAttention):
            out[f"{name}.in_proj_weight"] = module.in_proj_weight
    return out


def weight_sparsity(model: nn.Module) -> float:
    """compression/sparsity: the share of the prunable weights (`prunable_weights`) that are zero,
    counted from the weights."""
    weights = prunable_weights(model).values()
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))


def nonzero_parameters(model: nn.Module) -> int:
    """compression/params_nonzero: every parameter entry of the model that is not zero."""
    return sum(int(p.count_nonzero()) for p in model.parameters())


def unstructured_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """name -> bool mask (True: kept): the round(sparsity x N) smallest |w| of all prunable weights
    together set False (exactly that many; weights already zero are the smallest, so they stay pruned)."""
    weights = prunable_weights(model)
    scores = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights.values()])
    k = round(sparsity * scores.numel())
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep[torch.topk(scores, k, largest=False, sorted=False).indices] = False
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = keep[start:start + w.numel()].view_as(w).to(w.device)
        start += w.numel()
    return out


def blocks(model: nn.Module) -> dict[str, ResidualAttentionBlock]:
    """The transformer blocks structured pruning acts on (open_clip's, image and text towers, DTP's)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ResidualAttentionBlock)
            and isinstance(m.attn, nn.MultiheadAttention) and hasattr(m.mlp, "c_fc")}


def structured_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """name -> bool mask (True: kept) over each block's attention projections (weights and biases)
    and MLP: in every block round(sparsity x heads) heads (at most all but one) and
    round(sparsity x channels) MLP channels with the smallest L1 norm pruned."""
    out = {}
    for name, block in blocks(model).items():
        attn, fc, proj = block.attn, block.mlp.c_fc, block.mlp.c_proj
        heads, d = attn.num_heads, attn.embed_dim
        hd = d // heads
        w_in = attn.in_proj_weight.detach().abs().view(3, heads, hd, d)
        score = w_in.sum((0, 2, 3)) + attn.out_proj.weight.detach().abs().view(d, heads, hd).sum((0, 2))
        head_keep = _keep_largest(score, min(round(sparsity * heads), heads - 1))
        rows = head_keep[None, :, None].expand(3, heads, hd).reshape(-1)
        out[f"{name}.attn.in_proj_weight"] = rows[:, None].expand_as(attn.in_proj_weight)
        if attn.in_proj_bias is not None:
            out[f"{name}.attn.in_proj_bias"] = rows
        out[f"{name}.attn.out_proj.weight"] = head_keep[:, None].expand(heads, hd).reshape(1, d).expand_as(
            attn.out_proj.weight)
        channels = fc.out_features
        score = fc.weight.detach().abs().sum(1) + proj.weight.detach().abs().sum(0)
        channel_keep = _keep_largest(score, min(round(sparsity * channels), channels - 1))
        out[f"{name}.mlp.c_fc.weight"] = channel_keep[:, None].expand_as(fc.weight)
        if fc.bias is not None:
            out[f"{name}.mlp.c_fc.bias"] = channel_keep
        out[f"{name}.mlp.c_proj.weight"] = channel_keep[None, :].expand_as(proj.weight)
    return {k: v.contiguous() for k, v in out.items()}


def _keep_largest(score: torch.Tensor, pruned: int) -> torch.Tensor:
    keep = torch.ones_like(score, dtype=torch.bool)
    if pruned:
        keep[torch.topk(score, pruned, largest=False).indices] = False
    return keep


@torch.no_grad()
def shrunk_copy(model: nn.Module) -> nn.Module:
    """A copy of a structurally pruned model with its pruned heads and MLP channels removed: attention
    becomes ProjectedAttention with fewer heads, c_fc / c_proj fewer channels. Its outputs equal the
    masked model's (a pruned head's q, k, v and out_proj columns are zero, so it adds nothing; a pruned
    channel's pre-activation is zero and GELU(0) = 0). The model itself is left as it is."""
    out = copy.deepcopy(model)
    for block in blocks(out).values():
        attn = block.attn
        hd = attn.embed_dim // attn.num_heads
        alive = attn.in_proj_weight.view(3, attn.num_heads, hd, -1).ne(0).flatten(2).any(-1).any(0)
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        channels = fc.weight.ne(0).any(1)
        block.attn = ProjectedAttention(attn)
        block.attn.keep_heads(alive.nonzero().flatten())
        kept = channels.nonzero().flatten()
        block.mlp.c_fc = _rows(fc, kept)
        block.mlp.c_proj = _columns(proj, kept)
    project_attention(out)  # any attention outside the blocks stays as it computed
    return out


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    out = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight[index])
    if linear.bias is not None:
        out.bias.copy_(linear.bias[index])
    return out


def _columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    out = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight[:, index])
    if linear.bias is not None:
        out.bias.copy_(linear.bias)
    return out


def steps_value(value, total: int, key: str) -> int:
    """An integer number of steps, or a fraction of the run's `total` steps in (0, 1)."""
    if value is None or value < 0:
        raise ConfigError(f"{key}={value}: expected steps >= 0 or a fraction of the run in (0, 1)")
    return steps_of(value, total)


class Pruner:
    """The masks of one run and the schedule that sets them (module docstring). after_step(step) is
    called after every optimizer step: it recomputes the masks where the schedule's target changed and
    zeroes the pruned entries again. state_dict() holds the masks, so a resume continues exactly.

    quality_before: called once, just before a oneshot pruning: the zero-shot of the model as it was
    then (trained `end` steps, not the whole run), kept in the state as `before_prune` with the step
    (`before_prune_step`). It is no dense twin of the final model: that one trained the last
    `total_steps - end` steps more. Raises ConfigError for a sparsity outside [0, 1), an unknown
    structure or schedule, or a pruning span the run does not have."""

    def __init__(self, model: nn.Module, cc, total_steps: int, warmup_steps: int, quality_before=None):
        self.model, self.quality_before = model, quality_before
        self.sparsity = float(cc.sparsity)
        if not 0 <= self.sparsity < 1:
            raise ConfigError(f"compression.sparsity={cc.sparsity}: expected a share of the weights in [0, 1)")
        if cc.structure not in PRUNE_STRUCTURES:
            raise ConfigError(f"compression.structure={cc.structure!r}: expected {' or '.join(PRUNE_STRUCTURES)}")
        if cc.schedule not in PRUNE_SCHEDULES:
            raise ConfigError(f"compression.schedule={cc.schedule!r}: expected {' or '.join(PRUNE_SCHEDULES)}")
        self.structure, self.schedule = cc.structure, cc.schedule
        finetune = steps_value(cc.finetune_steps, total_steps, "compression.finetune_steps")
        self.end = total_steps - finetune  # pruned to the target from here on
        self.start = warmup_steps if cc.get("start_step") is None else \
            steps_value(cc.start_step, total_steps, "compression.start_step")
        if self.end < 1 or (self.schedule == "gradual" and self.end <= self.start):
            raise ConfigError(f"compression.finetune_steps={cc.finetune_steps} leaves no steps to train before pruning "
                              f"(pruning from step {self.start} to {self.end} of {total_steps})")
        span = self.end - self.start
        self.every = max(1, int(cc.prune_every) if cc.get("prune_every") else span // 20)
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

    def after_step(self, step: int) -> None:
        target = self.target(step)
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

    def finish(self) -> bool:
        """The schedule's final masks, if the run ended before reaching them (an epoch limit, skipped
        batches) -> whether they had to be applied now (then without fine-tuning)."""
        if self.applied == self.sparsity:
            return False
        self.after_step(self.end)
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


def layout_efficiency(model: nn.Module, cc, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """Each evaluation's efficiency/* (fastclip.eval.efficiency.tower_efficiency) in the layout the run
    reports. compression=prune with structure=structured: the shrunk copy's (`shrunk_copy`: its pruned
    heads and channels removed, as `compress` deploys it; before any is pruned, the dense layout),
    with the dense layout's count beside it as efficiency/{image,text}_gflops_dense, so every
    evaluation's efficiency/*_gflops is the same layout's as the run's final summary. Any other
    compression: the model's own."""
    from fastclip.eval.efficiency import tower_efficiency
    if cc.name != "prune" or cc.get("structure") != "structured":
        return tower_efficiency(model, images, tokens)
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
    from fastclip.compression.quant import QUALITY, eval_batch_ms, model_bytes, run_autocast
    model = task.model
    was_training = model.training
    late = pruner.finish()
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
        dense_ms = eval_batch_ms(model, images, tokens, amp_dtype=amp)
        pruned_ms = eval_batch_ms(deployed, images, tokens, amp_dtype=amp)
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
