"""The task's evaluations inside a run: periodic (evaluate) and once at the end (final_evaluation),
timed, with the data counts, logged; the ranks share the evaluation (or rank 0 evaluates), every rank
gets the numbers."""
import logging
import math
import time
from pathlib import Path

from fastclip import distributed, runtime
from fastclip.eval import sharded
from fastclip.loop.accounting import data_metrics
from fastclip.loop.state import TrainState
from fastclip.tasks.protocol import Task

log = logging.getLogger(__name__)


def evaluate(task: Task, tracker, state: TrainState, ckpt_path: Path | None = None,
             run_task: bool = True) -> dict[str, float]:
    """The task's evaluation, its time and the data counts, logged. Data-parallel: every rank encodes
    its share of the sets (a task that shards its evaluation), else rank 0 the whole sets while the
    others wait; the numbers are one process's, and every rank returns rank 0's.
    run_task=False (fit(evaluation=False)): the task's evaluation is skipped, the rest is not."""
    return run_evaluation(task, lambda: _evaluate(task, tracker, state, ckpt_path, run_task),
                          f"the evaluation at step {state.step}")


def run_evaluation(task: Task, fn, what: str):
    """fn() (an evaluation of `task`) as the task evaluates in a data-parallel run: on every rank,
    each encoding its share of the sets (task.shards_evaluation: eval/sharded.py), else on rank 0
    while the others wait. Rank 0's result on every rank; one process: fn()."""
    if task.shards_evaluation:
        return sharded.together(fn, what)
    return distributed.on_main(fn, what)


def _evaluate(task: Task, tracker, state: TrainState, ckpt_path: Path | None, run_task: bool = True) -> dict[str, float]:
    t0 = time.perf_counter()
    try:
        with runtime.preserved_rng():  # evaluation draws no number training would have drawn (exact resume)
            metrics = task.evaluate() if run_task else {}
    except Exception as exc:
        if ckpt_path is not None and ckpt_path.exists():
            exc.add_note(f"fastclip: the training up to step {state.step} is saved in {ckpt_path}; `trainer.resume=` "
                         f"that path continues from there once the evaluation is fixed (at the end of the run it only "
                         f"evaluates)")
        raise
    metrics["time/eval_s"] = time.perf_counter() - t0
    metrics.update(data_metrics(task, state))
    if distributed.current().main:  # one line for the run, not one per rank
        log.info("step %d, epoch %s: %s", state.step,
                 state.epoch if not state.batch_in_epoch else f"{state.epoch + 1} (part)", " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not math.isnan(v)))
    if tracker:
        tracker.log_metrics({**metrics, "epoch": state.epoch}, state.step)
        for path in task.new_artifacts():
            tracker.log_artifact(path, "boundaries")
    return metrics


def final_evaluation(task: Task, tracker, state: TrainState) -> dict[str, float]:
    """task.final_evaluate() once after training (run_evaluation: shared by the ranks or on rank 0;
    drawing no random number), logged at the last step."""
    with runtime.preserved_rng():
        final = run_evaluation(task, task.final_evaluate, "the final evaluation")
    if tracker and final:
        tracker.log_metrics(final, state.step)
    return final
