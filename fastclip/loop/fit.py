"""fit(): the training loop every task shares, top to bottom. Each pass over an epoch's batches
(train_epoch) ends in a checkpoint, then maybe an evaluation; a stop request ends the run at a
checkpoint; the final evaluation and the timing summary close it."""
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastclip import sweep_jobs
from fastclip.loop.accounting import check_epoch_data, leave_out_unfilled
from fastclip.loop.checkpointing import CheckpointPolicy
from fastclip.loop.divergence import diverged
from fastclip.loop.evaluation import evaluate, final_evaluation
from fastclip.loop.signals import StopRequests, stopped
from fastclip.loop.steplog import StepLog, StepTimer
from fastclip.loop.trainer import Accumulation, Trainer
from fastclip.tasks.protocol import StepOutput, Task

log = logging.getLogger(__name__)


def shows_progress_bar(cfg, main: bool) -> bool:
    """tqdm's bar on the main process where trainer.progress asks for it and stderr is a terminal: into
    a file (`make train > log`, a SLURM job's log) its redraws land as hundreds of carriage-return lines
    with the log lines glued to them; there the step log's heartbeat line (every 30 s) says the same."""
    if not (cfg.trainer.progress and main):
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stderr (pythonw), or one closed under it
        return False


def fit(task: Task, cfg, tracker, run_dir: Path, device: torch.device, trainer: Trainer | None = None,
        provenance: dict | None = None, evaluation: bool = True) -> dict[str, float]:
    """Trains `task` from `trainer`'s state (new, or loaded from a checkpoint) to the end of its
    schedule; returns the final metrics. provenance: what checkpoints record beyond the training
    state (the config group choices). Ctrl-C / SIGTERM stop it after a step, checkpointed (RunInterrupted).

    tracker: a fastclip.tracking.Tracker, None (nothing logged), or a stand-in answering what the
    loop calls: log_metrics(metrics, step, flush=...), log_artifact(path, artifact_path) and flush().
    evaluation=False: neither task.evaluate() nor task.final_evaluate() runs; everything else at
    an evaluation point (its timing, the data counts, their logging) happens as in a run, so a
    benchmark can time the training alone (bench-overhead). Runs never set it."""
    trainer = trainer or Trainer(task, cfg, device)
    state = trainer.state
    checkpoints = CheckpointPolicy(trainer, cfg, tracker, run_dir, provenance)
    bar = tqdm(total=trainer.total_steps, initial=state.step, desc="train", dynamic_ncols=True,
               disable=not shows_progress_bar(cfg, trainer.world.main))
    steps = StepLog(tracker, cfg.tracking.log_every, bar, checkpoints.path, heading=sweep_jobs.position)
    timer = StepTimer()
    metrics: dict[str, float] = {}
    task.model.train()
    with StopRequests() as stop:
        run = Run(task, trainer, steps, timer, checkpoints, stop, bar)
        while not trainer.finished():
            if stop.requested():  # came during an evaluation: the checkpoint before it holds this state
                stopped(stop, state, checkpoints.path)
            left = train_epoch(run)
            steps.drain()  # before this epoch's checkpoint and evaluation
            epoch_done = end_pass(task, trainer, left)
            if trainer.finished():  # the training loader's workers are done: the evaluations get their CPUs and memory
                task.close()
            checkpoints.save()  # before evaluating: a failing evaluation never loses the training
            if stop.requested() and not trainer.finished():  # not an evaluation the time left may not hold
                stopped(stop, state, checkpoints.path)
            if trainer.finished() or (epoch_done and state.epoch % cfg.eval.every_epochs == 0):
                metrics = evaluate(task, tracker, state, checkpoints.path, run_task=evaluation)
        if stop.received:  # during the last evaluation: the run is complete, nothing to continue
            log.warning("%s came during the final evaluation: the run completes", signal.Signals(stop.received).name)
    bar.close()
    if not metrics:  # resumed from a finished run: still report its numbers
        metrics = evaluate(task, tracker, state, checkpoints.path, run_task=evaluation)
    if evaluation:
        metrics.update(final_evaluation(task, tracker, state))
    reduced = trainer.phase.metrics(state)  # trainer.full_token_steps: the model before the phase
    if reduced and tracker:
        tracker.log_metrics(reduced, state.step)
    metrics.update(reduced)
    summary = timer.summary(state)
    metrics.update(summary)
    if tracker:
        tracker.log_metrics(summary, state.step)
    return metrics


@dataclass
class Run:
    """What one fit() call's steps use."""
    task: Task
    trainer: Trainer
    steps: StepLog
    timer: StepTimer
    checkpoints: CheckpointPolicy
    stop: StopRequests
    bar: tqdm


def train_epoch(run: Run) -> Accumulation:
    """The optimizer steps of the epoch in progress, from where the state is, to the epoch's end or the
    run's (a stop request ends the run here, checkpointed: raises) -> the micro-batches at its end
    that did not fill a step."""
    trainer, state = run.trainer, run.trainer.state
    trainer.discard_partial_step()  # nothing carries over from an unfinished accumulation
    step = Accumulation()
    run.timer.start()
    # a checkpoint taken after an epoch's last step has nothing left of it to run (len % accum batches at most)
    batches = run.task.train_batches(state.epoch, start=state.batch_in_epoch) \
        if state.steps_in_epoch < trainer.steps_per_epoch else ()
    pending = []  # the step's micro-batches, run together once they can fill it (a contrastive loss needs them all)
    for batch in batches:
        run.timer.arrived()
        pending.append(batch)
        if step.micro + sum(map(run.task.usable, pending)) < trainer.accum:
            run.timer.waiting()
            continue
        micro_steps(run, pending, step)
        pending = []
        if step.micro < trainer.accum:  # a batch the task took for usable had no loss: the step is not full
            run.timer.waiting()
            continue
        loss, metrics = step.logged()
        # the ranks' batches are the same size (distributed.Lockstep)
        lr = trainer.step(step.samples * trainer.world.size)
        run.steps.add(state, loss, step.finite, lr, {**metrics, **trainer.compute.metrics(state)})
        step = Accumulation()
        state.train_s += run.timer.stepped()
        run.bar.update(1)
        after_step(run)
        if trainer.finished() or state.steps_in_epoch >= trainer.steps_per_epoch:
            break  # the epoch's last len % accum_steps batches would not fill a step: left out, as drop_last
        run.timer.waiting()
    if pending:  # the epoch ran out before they filled a step: run and counted as before, then left out (end_pass)
        micro_steps(run, pending, step)
    return step


def micro_steps(run: Run, batches: list, step: Accumulation) -> list[StepOutput]:
    """Micro-batches' forward and backward (Trainer.accumulate), each counted in the state and in `step`."""
    trainer, state = run.trainer, run.trainer.state
    try:
        outs = trainer.accumulate(batches)
    except FloatingPointError as exc:  # models.dtp.NonFiniteBoundaries: the weights went non-finite
        if not trainer.world.distributed:  # (data-parallel, the other ranks are not draining now)
            run.steps.drain()
        diverged(f"{exc} at step {state.step} (epoch {state.epoch + 1})", run.checkpoints.path)
    for out in outs:
        state.count(out)
        step.add(out)
    return outs


def after_step(run: Run) -> None:
    """A log step drains the step log; a checkpoint step or a stop request also writes the checkpoint
    (drained first, so a non-finite loss never reaches it); a stop request then ends the run."""
    state = run.trainer.state
    checkpoint_now = run.checkpoints.due()
    log_now = state.step % run.steps.every == 0
    stop_now = run.stop.requested(agree=log_now or checkpoint_now)  # ranks agree at these steps only
    if log_now or checkpoint_now or stop_now:
        run.steps.drain()
    if checkpoint_now or stop_now:
        run.checkpoints.save()
    if stop_now:
        stopped(run.stop, state, run.checkpoints.path)


def end_pass(task: Task, trainer: Trainer, left: Accumulation) -> bool:
    """After a pass over the epoch's batches: micro-batches that did not fill a step count as skipped;
    an epoch gone through (not one the run's end cut short) is checked and closed -> whether it was."""
    state = trainer.state
    if left.micro:  # batches whose every sample was bad left the last step unfilled
        leave_out_unfilled(state, left.micro, left.samples, trainer.accum)
    epoch_done = state.steps_in_epoch >= trainer.steps_per_epoch or not trainer.finished()
    if epoch_done:
        check_epoch_data(task, state)
        state.next_epoch()
    return epoch_done
