"""What a sweep prints for its user: a line now and then while a job trains without a progress bar,
and at the end a table of its jobs' headline metrics with the commands that compare them."""
import logging

import pytest
import torch
from tqdm import tqdm

from fastclip.loop import steplog
from fastclip.loop.state import TrainState
from omegaconf import OmegaConf

from fastclip import sweep_jobs
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
    log = steplog.StepLog(_Tracker(), 1, bar, tmp_path / "last.pt", heading=lambda: "job 2 (3 of 6; 2 done)")
    state = TrainState(step=7, epoch=1)
    with caplog.at_level(logging.INFO, logger=steplog.__name__):
        log.add(state, torch.tensor(2.5), torch.tensor(True), 1e-3, {})
        log.drain()
    said = [r.getMessage() for r in caplog.records]
    assert said == ([] if progress else ["job 2 (3 of 6; 2 done): step 7 of 50 (epoch 2): train/loss 2.5000, "
                                         + said[0].split(", ")[1]])
    bar.close()


def test_the_sweeps_table_has_each_jobs_swept_overrides_and_headline_metrics():
    outcomes = [JobOutcome(0, "boundary=none epochs=2", "COMPLETED"), JobOutcome(1, "boundary=fixed epochs=2", "COMPLETED"),
                JobOutcome(2, "boundary=gumbel epochs=2", "FAILED", "JobFailed: error: ...")]
    # the run's mean cost a sample, not its last count (after a full-token phase, vanilla's)
    metrics = {0: {"val/zeroshot_top1": 0.5, "zeroshot/top1": 0.51, "efficiency/train_gflops_mean": 0.05,
                   "efficiency/train_gflops": 0.09, "val/i2t_r1": 0.2},
               1: {"val/zeroshot_top1": 0.6, "zeroshot/top1": 0.62, "efficiency/train_gflops_mean": 0.03}}
    table = results_table(outcomes, metrics).splitlines()
    assert table[0] == ("| job | status | overrides (the swept ones) | val/zeroshot_top1 | zeroshot/top1 | "
                        "train GFLOPs/sample (run mean) |")
    assert table[2:] == ["| 0 | COMPLETED | boundary=none | 0.5000 | 0.5100 | 0.05 |",
                         "| 1 | COMPLETED | boundary=fixed | 0.6000 | 0.6200 | 0.03 |",
                         "| 2 | FAILED | boundary=gumbel | - | - | - |"]
    said = next_steps("boundary_ablation", "abc123")
    assert 'make report ARGS="--experiment boundary_ablation --sweep abc123"' in said and "make ui" in said


BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@pytest.mark.parametrize("sweeper, overrides, planned", [
    ({"_target_": BASIC}, ["boundary=none,fixed,gumbel", "seed=range(0,2)", "trainer.lr=1e-3"], 6),
    ({"_target_": BASIC, "params": {"trainer.lr": "1e-3,2e-3"}}, ["seed=0,1"], 4),  # hydra.sweeper.params too
    ({"_target_": BASIC}, ["trainer.lr=1e-3"], 1),
    # a key in both: the command line's values, as the basic sweeper takes them
    ({"_target_": BASIC, "params": {"seed": "0,1,2"}}, ["seed=5"], 1),
    ({"_target_": BASIC, "params": {"seed": "0,1,2"}}, ["seed=0,1", "boundary=none,fixed"], 4),
    ({"_target_": BASIC}, ["dataset.path=glob(*.csv)"], None),  # needs Hydra's config loader: unknown, no error
    ({"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "n_trials": 12},
     ["trainer.lr=interval(1e-4,1e-3)"], 12),
    ({"_target_": "some.OtherSweeper"}, ["trainer.lr=interval(1e-4,1e-3)"], None),
])
def test_a_sweep_knows_how_many_jobs_it_plans(sweeper, overrides, planned):
    config = OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": {"task": overrides}}})
    assert sweep_jobs.planned_jobs(config) == planned


def test_a_jobs_position_counts_the_jobs_that_ended(tmp_path):
    hydra = OmegaConf.create({"mode": "RunMode.MULTIRUN", "sweep": {"dir": str(tmp_path)}, "job": {"num": 2}})
    assert sweep_jobs.position(hydra) == "job 2 (0 done)"  # no plan written (a sweep of older code)
    sweep_jobs.write_plan(tmp_path, 6)
    for num, status in ((0, "COMPLETED"), (1, "FAILED")):
        (tmp_path / str(num)).mkdir()
        (tmp_path / str(num) / sweep_jobs.OUTCOME_FILE).write_text(
            f'{{"num": {num}, "overrides": "", "status": "{status}"}}')
    assert sweep_jobs.position(hydra) == "job 2 (3 of 6; 2 done, 1 failed)"
    assert sweep_jobs.position(OmegaConf.create({"mode": "RunMode.RUN"})) == ""


@pytest.mark.parametrize("tty, progress, main, shown", [(True, True, True, True), (False, True, True, False),
                                                        (True, False, True, False), (True, True, False, False)])
def test_the_bar_is_drawn_only_on_a_terminal_and_redirected_output_gets_the_status_line(monkeypatch, tty, progress,
                                                                                         main, shown):
    """`make train > log`: tqdm's redraws landed as carriage-return lines with log lines glued on; the bar
    is now off where stderr is no terminal, and the step log's heartbeat (above) speaks instead."""
    import sys
    from omegaconf import OmegaConf
    from fastclip.loop.fit import shows_progress_bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    assert shows_progress_bar(OmegaConf.create({"trainer": {"progress": progress}}), main) is shown
