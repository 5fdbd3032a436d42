"""What the data gave the run: samples skipped (while building the data, in each batch, at an
epoch's end), the epoch's check that anything was trained on, and the data/* metrics."""
import logging
from collections import Counter

from fastclip import distributed
from fastclip.loop.state import TrainState
from fastclip.tasks.protocol import Task

log = logging.getLogger(__name__)

LEFT_OVER = "accumulation left over"  # micro-batches an epoch ended before they filled a step


class NoTrainingData(RuntimeError):
    pass


def leave_out_unfilled(state: TrainState, micro: int, samples: int, accum: int) -> None:
    """An epoch's last `micro` micro-batches (`samples` samples) did not fill an optimizer step (batches whose
    every sample was bad left it short): they count as skipped."""
    log.warning("epoch %d: %d micro-batch(es) at its end did not fill an optimizer step "
                "(trainer.accum_steps=%d); their %d samples count as skipped", state.epoch + 1, micro, accum, samples)
    state.skip({LEFT_OVER: samples})


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
