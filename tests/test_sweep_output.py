"""What a sweep prints for its user: a line now and then while a job trains without a progress bar,
and at the end a table of its jobs' headline metrics with the commands that compare them."""
import logging

import pytest
import torch
from tqdm import tqdm

from fastclip.loop import steplog
from fastclip.loop.state import TrainState
from fastclip.sweep_jobs import JobOutcome, next_steps, results_table


class _Tracker:
    def log_metrics(self, values, step, flush=True):
        pass

    def flush(self):
        pass


@pytest.mark.parametrize("progress", [False, True])
def test_a_job_without_a_progress_bar_says_where_it_is(tmp_path, caplog, monkeypatch, progress):
    monkeypatch.setattr(steplog, "HEARTBEAT_S", 0.0)
    bar = tqdm(total=50, disable=not progress)
    log = steplog.StepLog(_Tracker(), 1, bar, tmp_path / "last.pt")
    state = TrainState(step=7, epoch=1)
    with caplog.at_level(logging.INFO, logger=steplog.__name__):
        log.add(state, torch.tensor(2.5), torch.tensor(True), 1e-3, {})
        log.drain()
    said = [r.getMessage() for r in caplog.records]
    assert said == ([] if progress else ["step 7 of 50 (epoch 2): train/loss 2.5000, " + said[0].split(", ")[1]])
    bar.close()


def test_the_sweeps_table_has_each_jobs_swept_overrides_and_headline_metrics():
    outcomes = [JobOutcome(0, "boundary=none epochs=2", "COMPLETED"), JobOutcome(1, "boundary=fixed epochs=2", "COMPLETED"),
                JobOutcome(2, "boundary=gumbel epochs=2", "FAILED", "JobFailed: error: ...")]
    metrics = {0: {"val/zeroshot_top1": 0.5, "zeroshot/top1": 0.51, "efficiency/train_gflops": 0.05, "val/i2t_r1": 0.2},
               1: {"val/zeroshot_top1": 0.6, "zeroshot/top1": 0.62, "efficiency/train_gflops": 0.03}}
    table = results_table(outcomes, metrics).splitlines()
    assert table[0] == ("| job | status | overrides (the swept ones) | val/zeroshot_top1 | zeroshot/top1 | "
                        "train GFLOPs/sample |")
    assert table[2:] == ["| 0 | COMPLETED | boundary=none | 0.5000 | 0.5100 | 0.05 |",
                         "| 1 | COMPLETED | boundary=fixed | 0.6000 | 0.6200 | 0.03 |",
                         "| 2 | FAILED | boundary=gumbel | - | - | - |"]
    said = next_steps("boundary_ablation", "abc123")
    assert 'make report ARGS="--experiment boundary_ablation --sweep abc123"' in said and "make ui" in said
