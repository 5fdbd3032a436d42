"""The optimisation state of one run (Trainer): AdamW, the warm-up + cosine schedule, gradient
accumulation, mixed precision and clipping, the compression option's training hooks, and the checkpoint
round trip."""
import contextlib
import math
from dataclasses import dataclass, field

import torch

from fastclip import distributed, runtime
from fastclip.checkpoint import ResumeError
from fastclip.errors import InputError
from fastclip.eval.names import step_metric_name, summed_over_micro_batches
from fastclip.schema.steps import steps_of
from fastclip.loop.evaluation import run_evaluation
from fastclip.loop.compute import TrainingCompute, probe_gflops
from fastclip.loop.full_tokens import FullTokenPhase
from fastclip.loop.state import TrainState
from fastclip.optim import Schedule, adamw_impl, build_adamw, warmup_steps
from fastclip.tasks.protocol import StepOutput, Task


class Trainer:
    """The optimisation state of one run: AdamW over the task's model, the warm-up + cosine schedule,
    the fp16 grad scaler and the TrainState; state_dict()/load_state_dict() round-trip all of it."""

    def __init__(self, task: Task, cfg, device: torch.device):
        tc = cfg.trainer
        self.task, self.model, self.cfg = task, task.model, cfg
        self.accum = int(tc.accum_steps)  # >= 1: the schema's (the task checked the config)
        self.batches_per_epoch = len(task.train_batches(0))
        self.steps_per_epoch = self.batches_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise InputError(f"trainer.batch_size={tc.batch_size} x accum_steps={self.accum} leaves no full step "
                             f"per epoch ({self.batches_per_epoch} batches)")
        self.world = distributed.current()
        self.amp_dtype = runtime.autocast_dtype(tc.precision, device)
        self.compute = TrainingCompute(device, tc.count_flops_every)
        self.max_pflops = tc.max_pflops
        self.total_steps = self._planned_steps(task, cfg, device)
        self.warmup_steps = warmup_steps(tc.warmup_steps, self.total_steps)
        if tc.compile:
            runtime.compile_blocks(self.model)
        self.optimizer = build_adamw(self.model, tc)
        self.schedule = Schedule(self.warmup_steps, self.total_steps)  # a resume replaces it (load_state_dict)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.device = device
        self.state = TrainState(world_size=self.world.size)
        # the training forward goes through DistributedDataParallel (gradients averaged over ranks);
        # evaluation and checkpoints use the model itself
        self.forward = distributed.wrap(self.model, device, tc.ddp_find_unused_parameters)
        self.compression = task.compression
        self.compression.start(self.model, self.total_steps, self.warmup_steps, self._quality_now(task))
        self.phase = FullTokenPhase(tc.full_token_steps, self.total_steps,
                                    self._quality_now(task, "the evaluation before the full-token phase"),
                                    self.max_pflops, self._phase_pflops)
        self._in_step = False  # a micro-batch of the step in progress has run
        if self.world.rank:  # each rank its own noise (gumbel, dropout); the weights are rank 0's (DDP)
            runtime.seed_everything(runtime.sample_seed(cfg.seed, self.world.rank) % 2**32)

    def _planned_steps(self, task: Task, cfg, device: torch.device) -> int:
        """The run's optimizer steps: epochs x steps per epoch, capped by trainer.max_steps; under
        trainer.max_pflops, the steps the budget buys at the first batch's counted training GFLOPs per
        sample, a full-token phase's steps at theirs (the run also stops once its counted compute
        reaches the budget: finished())."""
        tc = cfg.trainer
        self._phase_pflops = 0.0  # under max_pflops, what the full-token phase is planned to spend
        if not self.max_pflops:
            total = self.steps_per_epoch * cfg.epochs
            return min(total, tc.max_steps) if tc.max_steps else total
        step_samples = tc.batch_size * self.accum * self.world.size
        budget = self.max_pflops * 1e6 / step_samples  # GFLOPs per sample the run may spend, summed over steps
        reduced = probe_gflops(task, self.amp_dtype, device, self.accum)
        phase = tc.full_token_steps
        if not phase:
            return max(1, math.ceil(budget / reduced))
        task.model.set_full_tokens(True)  # the phase's steps cost more: priced at their own count
        full = probe_gflops(task, self.amp_dtype, device, self.accum)
        task.model.set_full_tokens(False)
        if phase < 1:  # a fraction of the run
            total = max(1, math.ceil(budget / ((1 - phase) * reduced + phase * full)))
            phase_steps = round(phase * total)
        else:
            phase_steps = int(phase)
            total = phase_steps + max(1, math.ceil((budget - phase_steps * full) / reduced))
        self._phase_pflops = phase_steps * full * step_samples / 1e6
        return total

    @staticmethod
    def _quality_now(task, what: str = "the evaluation before pruning"):
        """For what measures the model mid-run (a oneshot pruning just before it prunes, the reduced
        model before a full-token phase): as the loop's evaluations (shared by the ranks, or on rank 0),
        no random number training draws is used."""
        def quality_now() -> dict[str, float]:
            with runtime.preserved_rng():
                return run_evaluation(task, task.quality, what)
        return quality_now

    def discard_partial_step(self) -> None:
        """An epoch starts: micro-batches of an unfinished step (the last epoch's leftover, fewer than
        accum_steps) are dropped, their gradients and FLOP count with them."""
        self.optimizer.zero_grad(set_to_none=True)
        self._in_step = False
        self.compute.discard()

    def finished(self) -> bool:
        if self.max_pflops:  # the budget decides, however many epochs it takes
            return self.state.step >= self.total_steps or self.state.train_pflops >= self.max_pflops
        return self.state.step >= self.total_steps or self.state.epoch >= self.cfg.epochs

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def accumulate(self, batches: list) -> list[StepOutput]:
        """One optimizer step's micro-batches (trainer.accum_steps of them with a loss, and any whose every
        sample was bad; fewer at an epoch's end), forward and backward through the task's accumulate()
        -> each one's StepOutput. Data-parallel, gradients are averaged over the ranks on the list's last
        backward (DDP's no_sync before it). The FLOPs of everything the task runs count (a contrastive
        task's extra forward without gradients too)."""
        if not self._in_step:  # the step's first micro-batch
            self.phase.before_step(self.state, self.model, self.compute)
            self._in_step = True
        with self.compute.micro_batch(self.state):
            return self.task.accumulate(batches, _Backward(self))

    def forward_backward(self, batch) -> StepOutput:
        """One micro-batch on its own (accumulate([batch])): its loss / accum_steps, backward."""
        return self.accumulate([batch])[0]

    def step(self, samples: int = 0) -> float:
        """The optimizer step on the accumulated gradients, counted in the state with the `samples` it
        trained on; compression=prune then holds its masks (the pruned weights zero again).
        -> the lr this update used (the first parameter group's; `lr` is the next one's after it)."""
        used = self.lr
        self.compression.before_optimizer_step()  # prune: the pruned weights' gradients out of the clipping norm
        if self.cfg.trainer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.stepped(samples)
        self._in_step = False
        self.compute.stepped(self.state, samples // self.world.size, samples)
        self.compression.after_optimizer_step(self.state.step)  # prune: the pruned weights zero again
        return used

    def weights_finite(self) -> bool:
        """One host sync: every parameter finite (checked before a checkpoint replaces the last one)."""
        return bool(torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all())

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "train_state": self.state.state_dict(),
                **({"compression": state} if (state := self.compression.state_dict()) is not None else {})}

    def load_state_dict(self, ckpt: dict, source: str = "the checkpoint") -> None:
        """Continues from a checkpoint. A model that does not match fails naming the differences.
        The schedule is the checkpoint's, re-planned for this run's length (optim.Schedule.replanned:
        the warm-up keeps its steps, the cosine goes on from the last update's lr, no jump up) and
        scaled by a new trainer.lr from the step it resumes at; unchanged, it is exactly the old one."""
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ResumeError(f"{source} does not fit this model: {str(exc).splitlines()[0]} ...") from exc
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # the kernel is this run's choice (trainer.optimizer_impl)
            group.update(adamw_impl(self.cfg.trainer.optimizer_impl))
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState.from_state_dict(ckpt["train_state"])
        if self.state.world_size != self.world.size:
            raise ResumeError(f"{source} was written by {self.state.world_size} data-parallel process(es) and this "
                              f"run has {self.world.size}: the data split, the batch and the random states depend on "
                              f"it; resume with {self.state.world_size} (torchrun --nproc_per_node, SLURM tasks)")
        if not self.world.main:
            self.state.skipped = {}  # counted into rank 0's, which saved them
        if self.total_steps < self.state.step:
            raise ResumeError(f"{source} is at step {self.state.step}, beyond this run's {self.total_steps} steps "
                              f"(epochs={self.cfg.epochs}, trainer.max_steps={self.cfg.trainer.max_steps}): a resume "
                              f"can lengthen the schedule, not end it before where it is")
        if self.state.batch_in_epoch is None:  # a version-1 checkpoint counted optimizer steps
            self.state.batch_in_epoch = self.state.steps_in_epoch * self.accum
        old_lr = ckpt["config"]["trainer"]["lr"]
        scale = self.cfg.trainer.lr / old_lr if old_lr else 1.0
        self.schedule = self._resumed_schedule(ckpt, source)
        self.warmup_steps = self.schedule.warmup
        # the option re-planned on the resumed schedule (a pruning ramp starts at the warm-up's end, which
        # the checkpoint keeps), then given its state back
        self.compression.start(self.model, self.total_steps, self.warmup_steps, self._quality_now(self.task))
        self.phase = FullTokenPhase(self.cfg.trainer.full_token_steps, self.total_steps, self.phase.quality_now,
                                    self.max_pflops, self._phase_pflops)
        if self.state.reduced is not None:  # inside the phase (it measured the reduced model): evaluations too
            self.model.set_full_tokens(True)  # at full tokens; its count was made where the uninterrupted run's was
        if ckpt.get("compression"):
            self.compression.load_state_dict(ckpt["compression"])
        self.scheduler.lr_lambdas = [self.schedule] * len(self.optimizer.param_groups)
        factor = self.schedule(self.scheduler.last_epoch)
        self.scheduler.base_lrs = [base * scale for base in self.scheduler.base_lrs]
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["initial_lr"], group["lr"] = base, base * factor
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what get_last_lr() reports; no setter
        rng = self.state.rng
        if rng is not None:
            runtime.set_rng_state(rng[self.world.rank] if isinstance(rng, list) else rng)

    def _resumed_schedule(self, ckpt: dict, source: str) -> Schedule:
        """The checkpoint's schedule (LambdaLR saved its fields) for this run's length. One written
        before the schedule was saved gets it re-derived from its own config: its length then was
        epochs x this run's steps per epoch (data, batch and accumulation cannot change on resume)."""
        saved = (ckpt["scheduler"].get("lr_lambdas") or [None])[0]
        if saved:
            planned = Schedule(**saved)
        else:
            tc = ckpt["config"]["trainer"]
            total = self.steps_per_epoch * ckpt["config"]["epochs"]
            total = min(total, tc["max_steps"]) if tc.get("max_steps") else total
            planned = Schedule(steps_of(tc["warmup_steps"], total), total)
        try:
            return planned.replanned(self.state.step, self.total_steps)
        except ValueError as exc:
            raise ResumeError(f"{source}: {exc} (epochs={self.cfg.epochs}, trainer.max_steps="
                              f"{self.cfg.trainer.max_steps})") from exc


class _Backward:
    """The Trainer as the tasks' `Backward`: its autocast, DDP wrapper, no_sync and grad scaler."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.accum = trainer, trainer.accum
        self.forward = trainer.forward if trainer.world.distributed else None

    def autocast(self):
        return runtime.autocast(self.trainer.device, self.trainer.amp_dtype)

    def sync(self, last: bool):
        return self.forward.no_sync() if self.forward is not None and not last else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.trainer.scaler.scale(loss).backward()


@dataclass
class Accumulation:
    """The micro-batches of the optimizer step being accumulated (those with a loss)."""
    micro: int = 0
    samples: int = 0
    # every micro-batch loss finite: a device tensor, read at the next drain (no host sync per step)
    finite: torch.Tensor | bool = True
    outputs: list = field(default_factory=list)

    def add(self, out: StepOutput) -> None:
        if out.loss is not None:
            self.micro, self.samples = self.micro + 1, self.samples + out.samples
            self.finite = torch.isfinite(out.loss.detach()) & self.finite
            self.outputs.append(out)

    def logged(self) -> tuple[torch.Tensor, dict]:
        """(the step's loss, its metrics) over every micro-batch: the loss is their mean, as the
        objective weighs them (each backward takes loss / accum_steps; a contrastive task's every
        micro-batch loss carries the step's whole contrastive loss plus its own auxiliary terms); each
        metric their mean, or their sum where it adds up (a count, a time: names.summed_over_micro_batches).
        Device tensors stay on the device."""
        outs = self.outputs
        if len(outs) == 1:
            return outs[0].loss.detach(), dict(outs[0].metrics)
        metrics = {}
        for key in dict.fromkeys(k for out in outs for k in out.metrics):
            values = [out.metrics[key] for out in outs if key in out.metrics]
            total = sum(values[1:], values[0])
            metrics[key] = total if summed_over_micro_batches(step_metric_name(key)) else total / len(values)
        return sum(out.loss.detach() for out in outs) / len(outs), metrics
