"""Training compute, counted (not assumed): torch's FlopCounterMode around real training steps, forward
and backward of the whole model (both towers, boundary predictors and their auxiliary heads, the loss,
a distillation teacher's forward), with the boundaries the model drew on that batch.

- efficiency/train_gflops: GFLOPs per training sample, counted on the run's first step and the first
  step of each epoch (every evaluation has a fresh count), and every `trainer.count_flops_every`
  steps when set (1: every step).
- efficiency/train_pflops_total: the training compute so far (PFLOPs, all data-parallel ranks): each
  step adds the last count per sample x the step's global samples. Logged with train/loss, so every
  curve can be drawn against compute (FLIP, CLIPA compare methods at equal training compute).

Data-parallel, a count is the mean over ranks (one all-reduce on counted steps only). FLOPs of
matmuls, convolutions and attention (torch's counter; elementwise ops are not counted), the CPU flash
attention kernel included (fastclip.eval.efficiency.CPU_ATTENTION_FLOPS).
"""
import contextlib

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastclip import distributed
from fastclip.errors import InputError
from fastclip.eval.efficiency import CPU_ATTENTION_FLOPS
from fastclip.loop.state import TrainState


class TrainingCompute:
    """Decides which optimizer steps are counted, counts their micro-batches, and keeps the totals in
    the TrainState (train_gflops, train_pflops), so a resume goes on from them."""

    def __init__(self, device: torch.device, every: int | None = None):
        self.device, self.every = device, every
        self.counting: bool | None = None  # None: decided at the step's first micro-batch
        self._flops = 0
        self._samples = 0
        self.counted_now: float | None = None  # the GFLOPs per sample counted on the step just taken
        self._recount = False

    def plan(self, state: TrainState) -> bool:
        """Whether the step about to start is counted (a resumed run counts where the uninterrupted one
        would, so the two log the same compute)."""
        return (self._recount or state.train_gflops is None or state.steps_in_epoch == 0
                or bool(self.every and state.step % self.every == 0))

    def discard(self) -> None:
        """The micro-batches counted so far belong to a step that will not be taken."""
        self.counting, self._flops = None, 0

    def recount(self) -> None:
        """The next step is counted whatever the schedule (the model's cost changed: a full-token phase)."""
        self._recount = True
        self.counting = None

    def micro_batch(self, state: TrainState):
        """The context one micro-batch's forward and backward run in: a FlopCounterMode on a counted step."""
        if self.counting is None:  # the step's first micro-batch
            self.counting = self.plan(state)
        if not self.counting:
            return contextlib.nullcontext()
        return _Counting(self)

    def stepped(self, state: TrainState, samples: int, global_samples: int) -> None:
        """After the optimizer step on `samples` of this rank (`global_samples` over all ranks)."""
        self.counted_now = None
        if self.counting:
            state.train_gflops = ranks_mean(self._flops / max(samples, 1) / 1e9, self.device)
            self.counted_now = state.train_gflops
            self._flops = 0
        state.train_pflops += (state.train_gflops or 0.0) * global_samples / 1e6
        self.counting, self._recount = None, False

    def metrics(self, state: TrainState) -> dict[str, float]:
        """This step's: the cumulative compute, and the count per sample where the step was counted."""
        out = {"efficiency/train_pflops_total": state.train_pflops}
        if self.counted_now is not None:
            out["efficiency/train_gflops"] = self.counted_now
        return out


def probe_gflops(task, amp_dtype, device: torch.device, accum: int = 1) -> float:
    """Training GFLOPs per sample of the first optimizer step (its `accum` micro-batches, through the
    task's own accumulate: under trainer.accum_steps a contrastive step also embeds every micro-batch
    without gradients first, which one micro-batch's loss and backward missed, 1.34x under-priced at
    accum 2), counted on a step that leaves no trace: gradients dropped, buffers (batch-norm
    statistics) and every random generator restored. What `trainer.max_pflops` plans the run's length
    with, before its first step."""
    import itertools

    from fastclip import runtime
    model = task.model
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    counter = _Counting(TrainingCompute(device))
    with runtime.preserved_rng():
        batches = list(itertools.islice(task.train_batches(0), accum))
        with counter:
            outs = task.accumulate(batches, _Probe(device, amp_dtype, accum))
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    samples = sum(out.samples for out in outs if out.loss is not None)
    if not samples:
        raise InputError("trainer.max_pflops: the first training batch has no usable sample to count the compute of")
    return ranks_mean(counter.compute._flops / samples / 1e9, device)


class _Probe:
    """A task's `Backward` for probe_gflops: the run's autocast, plain backward, no DDP wrapper (each
    rank probes its own share; ranks_mean averages them)."""
    forward = None

    def __init__(self, device: torch.device, amp_dtype, accum: int):
        self.device, self.amp_dtype, self.accum = device, amp_dtype, accum

    def autocast(self):
        from fastclip import runtime
        return runtime.autocast(self.device, self.amp_dtype)

    def sync(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def ranks_mean(value: float, device: torch.device) -> float:
    """A host number's mean over the data-parallel ranks: one all-reduce when there are several, no
    device tensor at all when there is one (a read back would wait for the device's queue)."""
    if not distributed.current().distributed:
        return value
    return float(distributed.mean(torch.tensor(value, dtype=torch.float64, device=device)))


class _Counting:
    def __init__(self, compute: TrainingCompute):
        self.compute = compute
        self.mode = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.compute._flops += self.mode.get_total_flops()
        return False
