"""Contrastive gradient accumulation: trainer.accum_steps=k micro-batches of B give the loss and the
gradients of one batch of kB (every sample's negatives are the whole step's), where accumulating each
micro-batch's own loss would give each sample only its micro-batch's B - 1 negatives.

The method is open_clip_train's `accum_freq` (GradCache, Gao et al. 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup"): embed every micro-batch without gradients, then run
each micro-batch again with gradients and take the contrastive loss over its fresh features and the
cached features of the others. Micro-batch i's backward gives the loss's gradient through its own
features; summed over i that is the whole gradient. It costs one more forward per micro-batch (counted
in the training FLOPs: Trainer.accumulate runs this inside the step's FLOP counter).
"""
import torch

from fastclip import runtime
from fastclip.tasks.protocol import Backward, StepOutput


def accumulate_contrastive(task, batches: list, run: Backward) -> list[StepOutput]:
    """One optimizer step over `batches` (a ClipTask's: data/pairs.py Batch; those without images pass
    through as StepOutput(None)) -> each batch's StepOutput; the gradients of the step's objective are
    left in the parameters.

    The objective is the contrastive loss over all k usable micro-batches' rows (data-parallel: each
    rank's rows against every rank's columns, open_clip's ClipLoss) plus, averaged over the k
    micro-batches, each micro-batch's own terms: the DTP towers' boundary losses and what the
    compression option adds (compression.training_loss: distillation's affinity KL and feature MSE
    are each micro-batch's, against its own teacher outputs, and its -alpha x contrastive term uses
    the step's contrastive loss). A StepOutput's loss and metrics: the step's contrastive loss
    (metrics["contrastive_loss"]) with that micro-batch's own terms.

    Exact up to floating-point order: every random draw of a micro-batch's forward (gumbel
    boundaries, dropout, patch dropout) is the same in both passes (the generators are saved before
    the pass without gradients and restored before the one with them; afterwards they are where one
    forward per micro-batch leaves them). Buffers a forward updates (batch-norm statistics) would
    update twice; the towers here have none.
    """
    model = task.model
    usable = [i for i, batch in enumerate(batches) if task.usable(batch)]
    k = len(usable)
    states, cached = [], []
    with torch.no_grad():
        model.logit_scale.clamp_(0, 4.6052)  # as ClipTask.loss (idempotent there after this)
        with run.autocast():
            for i in usable:
                states.append(runtime.rng_state())
                out = model(*task.device_inputs(batches[i]))
                cached.append((out["image_features"], out["text_features"]))
    after = runtime.rng_state()
    outs = [StepOutput(None, skipped=batch.skipped) for batch in batches]
    for j, i in enumerate(usable):
        runtime.set_rng_state(states[j])

        def contrastive(image_features, text_features, logit_scale, j=j):
            images = torch.cat([image_features if m == j else f for m, (f, _) in enumerate(cached)])
            texts = torch.cat([text_features if m == j else t for m, (_, t) in enumerate(cached)])
            # the temperature is every pass's (not cached): 1/k of its gradient in each
            loss = task.criterion(images, texts, _scaled_grad(logit_scale, 1 / k))
            # k times its gradient: the objective / k below then carries the contrastive loss's whole
            # gradient through this micro-batch's features, none through the cached ones
            return _scaled_grad(loss, k)

        with run.sync(j == k - 1):
            with run.autocast():
                out = task.loss(batches[i], forward=run.forward, criterion=contrastive)
            run.backward(out.loss / k)
        outs[i] = out
    runtime.set_rng_state(after)
    return outs


def _scaled_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x's value (exactly), `factor` x its gradient."""
    return x.detach() + factor * (x - x.detach())
