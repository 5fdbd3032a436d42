"""SLURM through Submitit without a cluster: stub sbatch/srun/sacct/scancel on PATH (tests/slurm_stub;
the stub sbatch records its script and runs each array task in the background). The example cluster
profile renders its #SBATCH lines and setup, and both jobs of a grid really run and log to MLflow
under one parent run."""
import os
import subprocess

import mlflow
import pytest

from conftest import PYTHON, TINY_CLIP
from fastclip import PROJECT_ROOT

STUBS = PROJECT_ROOT / "tests" / "slurm_stub"


@pytest.mark.slow
def test_a_grid_on_the_example_cluster_renders_its_sbatch_lines_and_both_jobs_log_to_mlflow(tmp_path, cli_env):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    venv = tmp_path / ".venv" / "bin"  # the profile's setup line sources the launch dir's venv: this one says it ran
    venv.mkdir(parents=True)
    (venv / "activate").write_text(f'echo "$SLURM_ARRAY_TASK_ID" >> "{tmp_path / "setup_ran"}"\n')
    env = dict(cli_env, PATH=f"{STUBS}{os.pathsep}{cli_env['PATH']}", STUB_SLURM_DIR=str(tmp_path / "slurm"),
               PWD=str(tmp_path))  # as a shell sets it in the directory it launches from
    cmd = [PYTHON, "-m", "fastclip.train", "-m", "+cluster=example_gpu", "boundary=none,gumbel", "trainer.max_steps=5",
           *TINY_CLIP, "eval.boundary_picture=false", f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    logs = "\n".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*.out")) \
        if (tmp_path / "sweep" / ".submitit").is_dir() else ""
    assert done.returncode == 0, done.stderr[-3000:] + logs[-3000:]

    [script] = [p.read_text() for p in (tmp_path / "slurm").glob("sbatch_*.sh")]  # one array for the grid
    for line in ("#SBATCH --account=my_account", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=240", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --array=0-1%2",
                 "#SBATCH --signal=USR2@120", "module load cuda/12.4",
                 f"source {tmp_path}/.venv/bin/activate"):
        assert line in script, line
    assert sorted((tmp_path / "setup_ran").read_text().split()) == ["0", "1"]  # in each array task
    client = mlflow.MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("fastclip").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("fastclip.role") == "sweep"]
    jobs = [r for r in runs if r.data.tags.get("fastclip.role") != "sweep"]
    assert sorted(r.data.params["boundary.name"] for r in jobs) == ["gumbel", "none"]
    for r in jobs:
        assert r.info.status == "FINISHED" and "zeroshot/top1" in r.data.metrics
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.params["trainer.resume"] == "None"  # auto, and nothing to resume in a new job dir
    assert parent.info.status == "FINISHED"


def test_a_job_that_cannot_see_its_sweep_dir_finds_the_parent_run_in_its_environment(tmp_path, monkeypatch):
    from fastclip.tracking import PARENT_RUN_ENV, PARENT_RUN_FILE, sweep_parent
    sweep = tmp_path / "sweep"
    monkeypatch.setenv(PARENT_RUN_ENV, f"{sweep.resolve()}::abc123")
    assert sweep_parent(sweep) == "abc123"  # no marker file here (another node's disk)
    assert sweep_parent(tmp_path / "other") is None  # another sweep's variable is not ours
    sweep.mkdir()
    (sweep / PARENT_RUN_FILE).write_text("fromfile\n")
    assert sweep_parent(sweep) == "abc123"  # the job's own launch wins over a marker a later launch may replace
    monkeypatch.delenv(PARENT_RUN_ENV)
    assert sweep_parent(sweep) == "fromfile"
