"""A run stopped by SIGTERM to its whole process group (as SLURM preempts a job: the training
process and its loader workers alike) and started again with the same command and run dir
(`trainer.resume=auto`, as a requeued job is) ends exactly where an uninterrupted run ends, in the
same MLflow run. DTP gumbel (learned boundaries, gumbel noise), random crops of real digits, 2
loader workers."""
import os
import signal
import subprocess
import time

import mlflow
import pytest
import torch

from conftest import PYTHON, TINY_CLIP, load_checkpoint

COMPARED = ("zeroshot/top1", "zeroshot/top5", "train/loss", "efficiency/compression_image",
            "efficiency/compression_text", "efficiency/image_gflops")


def command(store: str, run_dir) -> list[str]:
    return [PYTHON, "-m", "fastclip.train", *TINY_CLIP, "boundary=gumbel", "trainer.num_workers=2",
            "trainer.batch_size=16", "trainer.max_steps=40", "tracking.log_every=1",
            "eval.boundary_picture=false", f"tracking.uri={store}", "trainer.resume=auto", f"hydra.run.dir={run_dir}"]


def runs_of(client, run_dir) -> list:
    exp = client.get_experiment_by_name("fastclip")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`fastclip.run_dir` = '{run_dir.resolve()}'")


@pytest.mark.slow
def test_a_preempted_run_requeued_with_resume_auto_ends_as_an_uninterrupted_one(tmp_path, cli_env):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    full = subprocess.run(command(store, tmp_path / "full"), cwd=tmp_path, env=cli_env, capture_output=True, text=True,
                          timeout=900)
    assert full.returncode == 0, full.stderr[-3000:]

    job = tmp_path / "job"
    first = subprocess.Popen(command(store, job), cwd=tmp_path, env=cli_env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, stepped = time.time() + 600, 0
    while stepped < 5 and time.time() < deadline:  # preempt once a few steps are logged
        assert first.poll() is None, "the run ended before it could be preempted: " + first.stderr.read()[-2000:]
        found = runs_of(client, job)
        if found:
            stepped = max((m.step for m in client.get_metric_history(found[0].info.run_id, "train/loss")), default=0)
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGTERM)  # the training process and its loader workers
    stderr = first.communicate(timeout=300)[1]
    assert first.returncode == 130, stderr[-3000:]
    assert "SIGTERM: stopped after step" in stderr
    at = load_checkpoint(job / "checkpoints" / "last.pt")["train_state"]
    assert 5 <= at["step"] < 40 and at["epoch"] == 0 and at["batch_in_epoch"] == at["step"]  # mid-epoch

    again = subprocess.run(command(store, job), cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"trainer.resume=auto: continuing from {job / 'checkpoints' / 'last.pt'}" in again.stdout + again.stderr

    [resumed] = runs_of(client, job)  # one MLflow run, continued
    [reference] = runs_of(client, tmp_path / "full")
    assert resumed.info.status == "FINISHED"
    for key in COMPARED:
        assert resumed.data.metrics[key] == pytest.approx(reference.data.metrics[key], abs=1e-6), key
    ours, theirs = load_checkpoint(job / "checkpoints" / "last.pt"), load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    assert ours["train_state"]["step"] == theirs["train_state"]["step"] == 40
    for key, value in theirs["model"].items():
        torch.testing.assert_close(ours["model"][key], value, rtol=0, atol=1e-6, msg=key)


def test_resume_auto_in_a_new_run_dir_starts_the_run(tmp_path, cli_env):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = command(store, tmp_path / "new")
    cmd[cmd.index("trainer.max_steps=40")] = "trainer.max_steps=3"
    done = subprocess.run(cmd, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainer.resume=auto: no checkpoint in" in done.stdout + done.stderr
    assert load_checkpoint(tmp_path / "new" / "checkpoints" / "last.pt")["train_state"]["step"] == 3


@pytest.mark.slow
def test_a_profile_run_resumes_without_its_profile_and_auto_never_continues_another_run(tmp_path, cli_env):
    """+cluster= says where a job runs, not what it trains: a checkpoint does not record it, so a
    resume by hand elsewhere needs no +cluster. Under trainer.resume=auto a run dir whose checkpoint this
    command line would change is another run's (a reused dir), not a requeue: refused, naming the changes."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [PYTHON, "-m", "fastclip.train", *TINY_CLIP, "eval.boundary_picture=false", f"tracking.uri={store}"]
    job = tmp_path / "job"
    first = subprocess.run([*common, "+cluster=local", "trainer.max_steps=3", f"hydra.run.dir={job}"], cwd=tmp_path,
                           env=cli_env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    by_hand = subprocess.run([*common, f"trainer.resume={job / 'checkpoints' / 'last.pt'}", "trainer.max_steps=4"],
                             cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600)
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    assert load_checkpoint(job / "checkpoints" / "last.pt")["train_state"]["step"] == 4
    reused = subprocess.run([*common, "+cluster=local", "trainer.max_steps=6", f"hydra.run.dir={job}"], cwd=tmp_path,
                            env=cli_env, capture_output=True, text=True, timeout=600)
    assert reused.returncode != 0
    assert "trainer.resume=auto found" in reused.stderr and "trainer.max_steps: 4 -> 6" in reused.stderr
    assert load_checkpoint(job / "checkpoints" / "last.pt")["train_state"]["step"] == 4  # untouched
