"""The training loop every task shares: AdamW, warm-up + cosine, clipping, accumulation, mixed
precision, the NaN guard, and checkpoints that resume exactly. `fit()` reads top to bottom.

What the loop may ask of a task is fastclip.tasks.protocol.Task (its StepOutput is re-exported here).
"""
import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastclip import checkpoint, distributed, runtime
from fastclip.checkpoint import ResumeError
from fastclip.checks import steps_of
from fastclip.optim import Schedule, adamw_impl, build_adamw, warmup_steps
from fastclip.tasks.protocol import StepOutput, Task

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGUSR2: the run stopped after a step, its checkpoint written (the message says where)."""


LEFT_OVER = "accumulation left over"  # micro-batches an epoch ended before they filled a step


class StopRequests:
    """While fit() runs, SIGINT (Ctrl-C), SIGTERM (`kill`, SLURM's preemption) and SIGUSR2 (the
    notice Submitit asks SLURM to send before a time limit) ask the loop to stop after the step in
    progress, once its checkpoint is written. A second Ctrl-C stops at once (KeyboardInterrupt); a
    scheduler's further signals do not (SLURM sends SIGTERM at the limit, then waits KillWait before
    SIGKILL: time to finish the step and its checkpoint). Handlers are installed only in the main
    thread and restored on exit; then `hand_over()` gives a SIGUSR2, if one came, to the handler that
    was there before (Submitit's: it requeues the job and exits)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ())

    def __init__(self):
        self.received: int | None = None  # the first
        self.all: set[int] = set()
        self._previous: dict = {}
        self._handed: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._handed, self._previous = self._previous, {}

    def handing_over(self) -> bool:
        """Whether hand_over() passes a SIGUSR2 on (one came, and a handler was there before fit)."""
        usr2 = getattr(signal, "SIGUSR2", None)
        return usr2 in self.all and callable(self._handed.get(usr2))

    def hand_over(self) -> None:
        """After the stop's checkpoint (and __exit__): a SIGUSR2 goes on to the handler installed before
        fit (Submitit's requeues the job and exits the process); nothing else does."""
        usr2 = getattr(signal, "SIGUSR2", None)
        previous = self._handed.get(usr2)
        if self.handing_over():
            log.info("handing SIGUSR2 on to %s (the job's requeue)", getattr(previous, "__qualname__", previous))
            previous(usr2, None)

    def requested(self) -> bool:
        """Whether the run stops now: a signal came to this process or, data-parallel, to any rank
        (one host all-reduce, so every rank stops after the same step)."""
        return distributed.any_rank(self.received is not None)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in self.all:  # a second Ctrl-C: now
            self.__exit__()
            raise KeyboardInterrupt
        self.all.add(signum)
        if self.received is not None:
            log.warning("%s received as well: still stopping after the step in progress", signal.Signals(signum).name)
            return
        self.received = signum
        log.warning("%s received: the run stops after the step in progress, once its checkpoint is written "
                    "(Ctrl-C again to stop at once, losing the steps since the last checkpoint)",
                    signal.Signals(signum).name)


WORKER_STOP_GRACE_S = 60.0


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A loader worker's init. Ctrl-C and SIGUSR2, sent to the whole process group (a terminal, SLURM),
    are the training process's to handle: a worker that died of them would fail the batch the run
    needs to finish its step. SIGTERM: from the training process (the loader ending a hung worker,
    multiprocessing at exit) the worker leaves at once; from anyone else (a scheduler stopping the
    whole job) it leaves WORKER_STOP_GRACE_S later, time for the training process to finish its step
    and checkpoint (which ends the worker sooner, as the loader always does). SIGTERM is taken by a
    thread (sigwaitinfo names the sender), so this holds while the worker's main thread is busy."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGUSR2"):
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_watch_sigterm, args=(os.getppid(),), daemon=True, name="sigterm").start()


def _watch_sigterm(parent: int) -> None:
    while True:
        sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
        if sender == parent:
            os._exit(0)
        timer = threading.Timer(WORKER_STOP_GRACE_S, os._exit, args=(0,))
        timer.daemon = True
        timer.start()


class NoTrainingData(RuntimeError):
    pass


@dataclass
class TrainState:
    """Where a run is, beyond its weights: what a checkpoint needs to continue exactly."""
    step: int = 0                # optimizer steps taken
    epoch: int = 0               # the epoch in progress (= epochs completed)
    batch_in_epoch: int = 0      # loader batches of `epoch` consumed; a resume starts after them
    steps_in_epoch: int = 0
    samples_in_epoch: int = 0    # samples of `epoch` that reached an optimizer step
    samples_seen: int = 0
    train_s: float = 0.0         # data loading + steps, not evaluation
    skipped: dict = field(default_factory=dict)   # reason -> samples left out so far (data/skipped)
    trained_fraction: float | None = None         # last complete epoch: trained / declared samples
    rng: dict | list | None = None  # Python, numpy, torch (and CUDA) generators as of the last save (a list: by rank)
    world_size: int = 1          # data-parallel processes (the data split and the RNG states depend on it)

    def count(self, out: StepOutput) -> None:
        """A loader batch consumed: its skips count now, its samples once their step is taken."""
        self.batch_in_epoch += 1
        self.skip(out.skipped)

    def skip(self, counts: dict) -> None:
        for reason, n in counts.items():
            if n:
                self.skipped[reason] = self.skipped.get(reason, 0) + n

    def stepped(self, samples: int) -> None:
        self.step += 1
        self.steps_in_epoch += 1
        self.samples_in_epoch += samples
        self.samples_seen += samples

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = self.steps_in_epoch = self.samples_in_epoch = 0

    def state_dict(self) -> dict:
        """Every rank's generators (a collective when data-parallel: every rank calls it)."""
        rng = distributed.gather(runtime.rng_state())
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"rng": rng if len(rng) > 1 else rng[0]}

    def gather_skips(self) -> None:
        """Data-parallel: every rank's skip counts added into rank 0's (the one that saves and logs them);
        the others start counting afresh (a collective: every rank calls it)."""
        counts = distributed.gather(self.skipped)
        if len(counts) > 1:
            self.skipped = dict(sum(map(Counter, counts), Counter())) if distributed.current().main else {}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})


class Trainer:
    """The optimisation state of one run: AdamW over the task's model, the warm-up + cosine schedule,
    the fp16 grad scaler and the TrainState; state_dict()/load_state_dict() round-trip all of it."""

    def __init__(self, task: Task, cfg, device: torch.device):
        tc = cfg.trainer
        self.task, self.model, self.cfg = task, task.model, cfg
        self.accum = int(tc.accum_steps)
        if self.accum < 1:
            raise ValueError(f"trainer.accum_steps={self.accum}: expected >= 1")
        self.batches_per_epoch = len(task.train_batches(0))
        self.steps_per_epoch = self.batches_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"trainer.batch_size={tc.batch_size} x accum_steps={self.accum} leaves no full step "
                             f"per epoch ({self.batches_per_epoch} batches)")
        total = self.steps_per_epoch * cfg.epochs
        self.total_steps = min(total, tc.max_steps) if tc.max_steps else total
        self.warmup_steps = warmup_steps(tc.warmup_steps, self.total_steps)
        if tc.compile:
            runtime.compile_blocks(self.model)
        self.optimizer = build_adamw(self.model, tc)
        self.schedule = Schedule(self.warmup_steps, self.total_steps)  # a resume replaces it (load_state_dict)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.amp_dtype = runtime.autocast_dtype(tc.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.device = device
        self.world = distributed.current()
        self.state = TrainState(world_size=self.world.size)
        # the training forward goes through DistributedDataParallel (gradients averaged over ranks);
        # evaluation and checkpoints use the model itself
        self.forward = distributed.wrap(self.model, device, bool(tc.get("ddp_find_unused_parameters", False)))
        self.pruner = self._pruner(task, cfg) if cfg.compression.name == "prune" else None
        if self.world.rank:  # each rank its own noise (gumbel, dropout); the weights are rank 0's (DDP)
            runtime.seed_everything(runtime.sample_seed(cfg.seed, self.world.rank) % 2**32)

    def _pruner(self, task, cfg):
        """compression=prune: the masks and their schedule (compression/prune.py). A oneshot pruning asks
        first for the quality of the model as it is at that step (rank 0 evaluates; no random number
        training draws is used): `*_before_prune`, not a dense twin of the finished run."""
        from fastclip.compression.prune import Pruner

        def quality_before() -> dict[str, float]:
            with runtime.preserved_rng():
                return distributed.on_main(task.quality, "the evaluation before pruning")
        return Pruner(self.model, cfg.compression, self.total_steps, self.warmup_steps, quality_before)

    def finished(self) -> bool:
        return self.state.step >= self.total_steps or self.state.epoch >= self.cfg.epochs

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def forward_backward(self, batch, sync: bool = True) -> StepOutput:
        """sync=False: a micro-batch before the step's last; data-parallel, its gradients stay local
        (DDP's no_sync) and are averaged with the last one's."""
        ddp = self.world.distributed
        with self.forward.no_sync() if ddp and not sync else contextlib.nullcontext():
            with runtime.autocast(self.device, self.amp_dtype):
                out = self.task.loss(batch, forward=self.forward) if ddp else self.task.loss(batch)
            if out.loss is not None:
                self.scaler.scale(out.loss / self.accum).backward()
        return out

    def step(self, samples: int = 0) -> float:
        """The optimizer step on the accumulated gradients, counted in the state with the `samples` it
        trained on; compression=prune then holds its masks (the pruned weights zero again).
        -> the lr this update used (the first parameter group's; `lr` is the next one's after it)."""
        used = self.lr
        if self.pruner is not None:
            self.pruner.mask_gradients()
        if self.cfg.trainer.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.trainer.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.state.stepped(samples)
        if self.pruner is not None:
            self.pruner.after_step(self.state.step)
        return used

    def weights_finite(self) -> bool:
        """One host sync: every parameter finite (checked before a checkpoint replaces the last one)."""
        return bool(torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all())

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "train_state": self.state.state_dict(),
                **({"pruner": self.pruner.state_dict()} if self.pruner is not None else {})}

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
        if self.pruner is not None and ckpt.get("pruner"):
            self.pruner.load_state_dict(ckpt["pruner"])
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


class StepLog:
    """Per-step training scalars (loss, lr, the task's metrics, whether the loss was finite) kept
    on the device until drain(): a log step, a checkpoint, the end of an epoch. Then they come to
    the host in one transfer per device (each read of a device tensor makes the host wait for
    the GPU's queue to drain; open_clip_train, likewise, reads its loss at log steps only)."""

    def __init__(self, tracker, every: int, bar, checkpoint_path: Path):
        self.tracker, self.every, self.bar, self.checkpoint_path = tracker, max(1, int(every)), bar, checkpoint_path
        self._rows: list[tuple[int, int, torch.Tensor | bool, dict]] = []
        self._window = (0, time.perf_counter())  # steps since the last drain, and its start

    def add(self, state: TrainState, loss: torch.Tensor, finite: torch.Tensor, lr: float, metrics: dict) -> None:
        """The step just taken: its last micro-batch's loss and metrics, and whether every micro-batch
        loss of the step was finite (a device tensor: read at the next drain, not now)."""
        self._rows.append((state.step - 1, state.epoch, finite,
                           {"train/loss": loss.detach(), "train/lr": lr, **{k if "/" in k else f"train/{k}": v for k, v in metrics.items()}}))
        self._window = (self._window[0] + 1, self._window[1])

    def fetch(self) -> list[tuple[int, int, bool, dict[str, float]]]:
        """-> [(step, epoch, finite, {name: float})], oldest first; empties the buffer. Data-parallel:
        each value is the mean over ranks (the contrastive loss is the global batch's on every rank,
        a boundary loss or a compression is each rank's own), finite only where every rank's was."""
        tensors = [v for _, _, finite, values in self._rows for v in (finite, *values.values())
                   if isinstance(v, torch.Tensor)]
        host = iter(_to_host(tensors))

        def read(v):
            return next(host) if isinstance(v, torch.Tensor) else v
        rows = [(step, epoch, read(finite) >= 1.0, {k: float(read(v)) for k, v in values.items()})
                for step, epoch, finite, values in self._rows]
        self._rows = []
        return rows

    def drain(self) -> None:
        """Logs the buffered steps; stops at the first non-finite loss, naming its step (callers
        drain before every checkpoint, so the last one written is good)."""
        rows = self.fetch()
        bad = next((row for row in rows if not row[2]), None)
        if self.tracker:  # the steps before a non-finite one are still logged
            for index, _, _, values in rows[:rows.index(bad) if bad else len(rows)]:
                self.tracker.log_metrics(values, index + 1, flush=False)  # a step's metrics carry the count after it
            self.tracker.flush()
        if bad:
            step, epoch, _, values = bad
            loss = values["train/loss"]
            diverged(f"train/loss is {loss} at step {step} (epoch {epoch + 1})" if not math.isfinite(loss) else
                     f"a micro-batch loss of step {step} (epoch {epoch + 1}) is not finite", self.checkpoint_path)
        if rows and self.bar is not None:
            steps, t0 = self._window
            self.bar.set_postfix(loss=f"{rows[-1][3]['train/loss']:.4f}", steps_s=f"{steps / max(1e-9, time.perf_counter() - t0):.2f}")
        self._window = (0, time.perf_counter())



def diverged(what: str, checkpoint_path: Path):
    kept = f"last good checkpoint kept at {checkpoint_path}" if checkpoint_path.exists() else "no checkpoint written yet"
    raise TrainingDiverged(f"{what}; stopping; {kept}")


def _to_host(tensors: list[torch.Tensor]) -> list[float]:
    """0-dim tensors -> Python numbers, one stack and one transfer per device (data-parallel: the
    means over ranks, one all-reduce per device)."""
    out: list[float] = [0.0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        values = distributed.mean(torch.stack([tensors[i].detach().reshape(()).float() for i in idx])).tolist()
        for i, v in zip(idx, values):
            out[i] = v
    return out


class StepTimer:
    """Per optimizer step: the whole step (data wait included) and its data wait alone, as
    open_clip_train's batch_time / data_time; compute = step - data."""

    def __init__(self):
        self.step_times: list[float] = []
        self.data_times: list[float] = []

    def start(self) -> None:
        self.tick = self.waiting_since = time.perf_counter()
        self.data_wait = 0.0

    def arrived(self) -> None:
        self.data_wait += time.perf_counter() - self.waiting_since

    def waiting(self) -> None:
        self.waiting_since = time.perf_counter()

    def stepped(self) -> float:
        now = time.perf_counter()
        self.step_times.append(now - self.tick)
        self.data_times.append(self.data_wait)
        elapsed, self.tick, self.data_wait = now - self.tick, now, 0.0
        return elapsed

    def summary(self, state: TrainState) -> dict[str, float]:
        out = {"time/train_s": state.train_s,
               "throughput/train_samples_per_s": state.samples_seen / max(state.train_s, 1e-9)}
        if self.step_times:
            out["time/step_median_s"] = float(np.median(self.step_times))
            out["time/data_median_s"] = float(np.median(self.data_times))
            out["time/compute_median_s"] = float(np.median(np.subtract(self.step_times, self.data_times)))
        return out


def fit(task: Task, cfg, tracker, run_dir: Path, device: torch.device, trainer: Trainer | None = None,
        provenance: dict | None = None) -> dict[str, float]:
    """Trains `task` from `trainer`'s state (new, or loaded from a checkpoint) to the end of its
    schedule; returns the final metrics. provenance: what checkpoints record beyond the training
    state (the config group choices). Ctrl-C / SIGTERM stop it after a step, checkpointed (RunInterrupted)."""
    trainer = trainer or Trainer(task, cfg, device)
    state, accum = trainer.state, trainer.accum
    ckpt_path = Path(run_dir) / "checkpoints" / "last.pt"
    extra = {"config": runtime.config_container(cfg), "run_dir": str(Path(run_dir).resolve()),
             "mlflow_uri": getattr(tracker, "uri", None), "mlflow_run_id": getattr(tracker, "run_id", None),
             **(provenance or {})}
    world = trainer.world
    bar = tqdm(total=trainer.total_steps, initial=state.step, disable=not cfg.trainer.progress or not world.main,
               desc="train", dynamic_ncols=True)
    steps = StepLog(tracker, cfg.tracking.get("log_every", 10), bar, ckpt_path)
    timer = StepTimer()
    metrics: dict[str, float] = {}
    task.model.train()
    with StopRequests() as stop:
        while not trainer.finished():
            if stop.requested():  # came during an evaluation: the checkpoint before it holds this state
                stopped(stop, state, ckpt_path)
            trainer.optimizer.zero_grad(set_to_none=True)  # nothing carries over from an unfinished accumulation
            micro, pending, finite = 0, 0, True  # micro-batches of the step being accumulated, their samples
            timer.start()
            # a checkpoint taken after an epoch's last step has nothing left of it to run (len % accum batches at most)
            batches = task.train_batches(state.epoch, start=state.batch_in_epoch) \
                if state.steps_in_epoch < trainer.steps_per_epoch else ()
            for batch in batches:
                timer.arrived()
                try:
                    out = trainer.forward_backward(batch, sync=micro == accum - 1)
                except FloatingPointError as exc:  # models.dtp.NonFiniteBoundaries: the weights went non-finite
                    if not world.distributed:  # (data-parallel, the other ranks are not draining now)
                        steps.drain()
                    diverged(f"{exc} at step {state.step} (epoch {state.epoch + 1})", ckpt_path)
                state.count(out)
                if out.loss is not None:
                    micro, pending = micro + 1, pending + out.samples
                    finite = torch.isfinite(out.loss.detach()) & finite  # read at the next drain (no sync)
                if micro < accum:
                    timer.waiting()
                    continue
                lr = trainer.step(pending * world.size)  # the ranks' batches are the same size (distributed.Lockstep)
                steps.add(state, out.loss, finite, lr, out.metrics)
                micro, pending, finite = 0, 0, True
                state.train_s += timer.stepped()
                bar.update(1)
                checkpoint_now = bool(cfg.trainer.ckpt_every_steps) and state.step % cfg.trainer.ckpt_every_steps == 0
                stop_now = stop.requested()
                if state.step % steps.every == 0 or checkpoint_now or stop_now:
                    steps.drain()
                if checkpoint_now or stop_now:
                    save(trainer, ckpt_path, extra)
                if stop_now:
                    stopped(stop, state, ckpt_path)
                if trainer.finished() or state.steps_in_epoch >= trainer.steps_per_epoch:
                    break  # the epoch's last len % accum_steps batches would not fill a step: left out, as drop_last
                timer.waiting()
            steps.drain()  # before this epoch's checkpoint and evaluation
            if micro:  # batches whose every sample was bad left the last step unfilled
                log.warning("epoch %d: %d micro-batch(es) at its end did not fill an optimizer step "
                            "(trainer.accum_steps=%d); their %d samples count as skipped", state.epoch + 1, micro,
                            accum, pending)
                state.skip({LEFT_OVER: pending})
            epoch_done = state.steps_in_epoch >= trainer.steps_per_epoch or not trainer.finished()
            if epoch_done:
                check_epoch_data(task, state)
                state.next_epoch()
            save(trainer, ckpt_path, extra)  # before evaluating: a failing evaluation never loses the training
            if stop.requested() and not trainer.finished():  # not an evaluation the time left may not hold
                stopped(stop, state, ckpt_path)
            if trainer.finished() or (epoch_done and state.epoch % cfg.eval.every_epochs == 0):
                metrics = evaluate(task, tracker, state, ckpt_path)
        if stop.received:  # during the last evaluation: the run is complete, nothing to continue
            log.warning("%s came during the final evaluation: the run completes", signal.Signals(stop.received).name)
    bar.close()
    if not metrics:  # resumed from a finished run: still report its numbers
        metrics = evaluate(task, tracker, state, ckpt_path)
    with runtime.preserved_rng():
        final = distributed.on_main(task.final_evaluate, "the final evaluation")
    metrics.update(final)
    if tracker and final:
        tracker.log_metrics(final, state.step)
    summary = timer.summary(state)
    metrics.update(summary)
    if tracker:
        tracker.log_metrics(summary, state.step)
    return metrics


def stopped(stop: StopRequests, state: TrainState, ckpt_path: Path):
    """The run stops at a checkpoint written for this state: a SIGUSR2 goes on to the handler from
    before fit (Submitit's requeues the job and exits the process), else RunInterrupted."""
    stop.__exit__()
    usr2 = getattr(signal, "SIGUSR2", None)
    if usr2 is not None and distributed.any_rank(usr2 in stop.all):  # the job's notice reached some rank: requeue
        stop.all.add(usr2)
    why = signal.Signals(stop.received).name if stop.received else "another data-parallel rank's stop signal"
    message = (f"{why}: stopped after step {state.step}; its checkpoint is {ckpt_path}: "
               f"`trainer.resume=` it (or `trainer.resume=auto` with the same run dir) to continue")
    log.warning(message)  # said before the hand-over too, which exits the process
    if not distributed.current().main and stop.handing_over():
        raise SystemExit(0)  # rank 0 requeues the job; a failing exit here could end the job step before it does
    stop.hand_over()
    raise RunInterrupted(message)


def save(trainer: Trainer, path: Path, extra: dict) -> None:
    """Replaces the last checkpoint, unless the weights have gone non-finite (then the last good
    one stays and the run stops). Data-parallel: every rank calls it, rank 0 writes, and no rank goes
    on (or exits) before the file is complete."""
    if not trainer.weights_finite():
        diverged(f"the weights are not finite after step {trainer.state.step}", path)
    trainer.state.gather_skips()
    state = trainer.state_dict()
    distributed.on_main(lambda: checkpoint.save(path, {**state, **extra}), f"writing the checkpoint {path}")


def check_epoch_data(task: Task, state: TrainState) -> None:
    """After a complete epoch: no optimizer step (no sample trained on) fails the run; fewer than half
    of what the source declares is a warning and shows in data/trained_fraction."""
    state.gather_skips()  # data-parallel: rank 0's counts are every rank's (a collective: every rank is here)
    declared = task.epoch_samples()
    trained = state.samples_in_epoch
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(_skip_counts(task, state).items())) or "none"
    if trained == 0 or state.steps_in_epoch == 0:
        raise NoTrainingData(f"epoch {state.epoch + 1} trained on no sample: every batch was left out (skipped so far: "
                             f"{reasons}; the warnings above name each one)"
                             + (f"; the source declares {declared} samples per epoch" if declared else ""))
    if declared:
        state.trained_fraction = trained / declared
        if state.trained_fraction < 0.5 and distributed.current().main:  # rank 0 holds every rank's skip counts
            log.warning("epoch %d trained on %d of the %d samples its source declares (%.0f%%); skipped so far: %s",
                        state.epoch + 1, trained, declared, 100 * state.trained_fraction, reasons)


def _skip_counts(task: Task, state: TrainState) -> Counter:
    return Counter(task.build_skipped) + Counter(state.skipped)


def data_metrics(task: Task, state: TrainState) -> dict[str, float]:
    """data/skipped: every sample left out so far (while building the data, once; while training,
    each time it comes round), data/eval_overlap: those left out for being in the evaluation set,
    data/eval_duplicates: evaluation images merged into another for being the same image (data.overlap),
    data/trained_fraction: the last complete epoch's trained / declared samples."""
    counts = _skip_counts(task, state)
    out = {"data/skipped": float(sum(counts.values()))}
    if task.checks_eval_overlap:
        out["data/eval_overlap"] = float(counts.get("eval overlap", 0))
    if task.eval_duplicates is not None:
        out["data/eval_duplicates"] = float(task.eval_duplicates)
    if state.trained_fraction is not None:
        out["data/trained_fraction"] = state.trained_fraction
    return out


def evaluate(task: Task, tracker, state: TrainState, ckpt_path: Path | None = None) -> dict[str, float]:
    """The task's evaluation, its time and the data counts, logged. Data-parallel: rank 0 evaluates
    the whole sets (the numbers are one process's) while the others wait; every rank returns them."""
    return distributed.on_main(lambda: _evaluate(task, tracker, state, ckpt_path), f"the evaluation at step {state.step}")


def _evaluate(task: Task, tracker, state: TrainState, ckpt_path: Path | None) -> dict[str, float]:
    t0 = time.perf_counter()
    try:
        with runtime.preserved_rng():  # evaluation draws no number training would have drawn (exact resume)
            metrics = task.evaluate()
    except Exception as exc:
        if ckpt_path is not None and ckpt_path.exists():
            exc.add_note(f"fastclip: the training up to step {state.step} is saved in {ckpt_path}; `trainer.resume=` "
                         f"that path continues from there once the evaluation is fixed (at the end of the run it only "
                         f"evaluates)")
        raise
    metrics["time/eval_s"] = time.perf_counter() - t0
    metrics.update(data_metrics(task, state))
    log.info("step %d, epoch %s: %s", state.step, state.epoch if not state.batch_in_epoch else f"{state.epoch + 1} (part)",
             " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not math.isnan(v)))
    if tracker:
        tracker.log_metrics({**metrics, "epoch": state.epoch}, state.step)
        for path in task.new_artifacts():
            tracker.log_artifact(path, "boundaries")
    return metrics
