"""SLURM through Submitit without a cluster: stub sbatch/srun/sacct/scancel on PATH (tests/slurm_stub;
the stub sbatch records its script and runs each array task in the background). The example cluster
profile renders its #SBATCH lines and setup, and both jobs of a grid really run and log to MLflow
under one parent run."""
import os
import signal
import subprocess
import time

import mlflow
import pytest

from conftest import PYTHON, TINY_CLIP, load_checkpoint
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
           "trainer.num_workers=0",  # the profile's workers are for its 12 CPUs a task, not this machine's
           "hydra.launcher.tasks_per_node=1",  # the stub's sbatch starts one task (the profile: 8, one per GPU)
           *TINY_CLIP, "eval.boundary_picture=false", f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    logs = "\n".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*.out")) \
        if (tmp_path / "sweep" / ".submitit").is_dir() else ""
    assert done.returncode == 0, done.stderr[-3000:] + logs[-3000:]

    [script] = [p.read_text() for p in (tmp_path / "slurm").glob("sbatch_*.sh")]  # one array for the grid
    for line in ("#SBATCH --account=my_account", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=240", "#SBATCH --cpus-per-task=12", "#SBATCH --mem=640GB", "#SBATCH --array=0-1%2",
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


@pytest.mark.slow
def test_a_job_noticed_before_its_time_limit_is_requeued_by_submitit_and_finishes_its_run(tmp_path, cli_env):
    """SLURM's SIGUSR2 to the job step: the run checkpoints after its step, Submitit's own handler
    requeues the job (scontrol requeue), SLURM runs the job's script again, hydra-submitit-launcher
    re-runs the Hydra job in its job dir, trainer.resume=auto (the profile's) continues the checkpoint,
    and the job ends at its last step in the same MLflow run."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stub = tmp_path / "slurm"
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "activate").write_text("")  # the profile's setup line sources it
    env = dict(cli_env, PATH=f"{STUBS}{os.pathsep}{cli_env['PATH']}", STUB_SLURM_DIR=str(stub), PWD=str(tmp_path))
    cmd = [PYTHON, "-m", "fastclip.train", "-m", "+cluster=example_gpu", "boundary=gumbel", "trainer.max_steps=40",
           "trainer.num_workers=0", "hydra.launcher.tasks_per_node=1",  # the stub's sbatch starts one task
           "tracking.log_every=1", *TINY_CLIP, "eval.boundary_picture=false", f"tracking.uri={store}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    client = mlflow.MlflowClient(tracking_uri=store)
    deadline, stepped, job = time.time() + 300, 0, None
    while stepped < 5 and time.time() < deadline:  # the notice comes once a few steps are logged
        assert launcher.poll() is None, launcher.stderr.read()[-3000:]
        exp = client.get_experiment_by_name("fastclip")
        jobs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("fastclip.role") != "sweep"] \
            if exp else []
        if jobs:
            job = jobs[0].info.run_id
            stepped = max((m.step for m in client.get_metric_history(job, "train/loss")), default=0)
        time.sleep(0.05)
    assert stepped >= 5, "the job did not log 5 steps in 300 s"
    os.kill(int((stub / "step_pid_1000").read_text()), signal.SIGUSR2)  # as --signal=USR2@120 does (one job: no array)
    stderr = launcher.communicate(timeout=900)[1]
    logs = "\n".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*.out"))
    assert launcher.returncode == 0, stderr[-2000:] + logs[-3000:]

    assert (stub / "scontrol.log").read_text().splitlines() == ["requeue 1000"]  # Submitit's requeue, once
    runs = client.search_runs([client.get_experiment_by_name("fastclip").experiment_id])
    [resumed] = [r for r in runs if r.data.tags.get("fastclip.role") != "sweep"]  # the same run, continued
    assert resumed.info.run_id == job and resumed.info.status == "FINISHED"
    assert 5 <= int(resumed.data.tags["fastclip.resume.1.from_step"]) < 40
    assert load_checkpoint(tmp_path / "sweep" / "0" / "checkpoints" / "last.pt")["train_state"]["step"] == 40


def _srun_env(cli_env: dict, job: int, rank: int, ntasks: int = 2, **more) -> dict:
    """The variables `srun --ntasks=2` sets in task `rank` on one node (no torchrun's, no Submitit's)."""
    env = {k: v for k, v in cli_env.items() if not k.startswith(("SLURM_", "SUBMITIT_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_JOB_ID=str(job), SLURM_NTASKS=str(ntasks), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
               SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost",
               SLURM_TASKS_PER_NODE=str(ntasks), SLURM_STEP_ID="0")
    env.update(more)
    return env


def test_two_tasks_started_by_srun_alone_train_as_one_data_parallel_run_with_one_checkpoint(tmp_path, cli_env):
    """srun without Submitit or torchrun: the tasks read SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and
    the first node of SLURM_JOB_NODELIST, and form one process group (not two runs of their own)."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [PYTHON, "-m", "fastclip.train", *TINY_CLIP, "trainer.max_steps=4", "eval.boundary_picture=false",
           f"tracking.uri={store}", f"hydra.run.dir={tmp_path / 'run'}"]
    job = 40000 + os.getpid() % 20000  # the tasks draw their master port from the job id
    tasks = [subprocess.Popen(cmd, cwd=tmp_path, env=_srun_env(cli_env, job, rank), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outs = [t.communicate(timeout=600)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], "\n".join(o[-3000:] for o in outs)
    checkpoints = list(tmp_path.rglob("last.pt"))
    assert len(checkpoints) == 1, checkpoints
    assert load_checkpoint(checkpoints[0])["train_state"]["world_size"] == 2
    runs = mlflow.MlflowClient(tracking_uri=store).search_runs(
        [mlflow.MlflowClient(tracking_uri=store).get_experiment_by_name("fastclip").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["distributed.world_size"] == "2"


def test_srun_tasks_whose_counts_disagree_fail_naming_them(tmp_path, cli_env):
    env = _srun_env(cli_env, 1234, 0, ntasks=4, SLURM_TASKS_PER_NODE="2")  # 4 tasks, 2 on the job's one node
    done = subprocess.run([PYTHON, "-m", "fastclip.train", *TINY_CLIP, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "SLURM's task counts disagree: SLURM_NTASKS=4, tasks per node '2' (2 tasks)" in done.stderr, \
        done.stderr[-3000:]
    assert not list(tmp_path.rglob("last.pt"))


@pytest.mark.parametrize("asked", [{"SLURM_GPUS_PER_NODE": "1"}, {"SLURM_JOB_GPUS": "3"},
                                   {"CUDA_VISIBLE_DEVICES": "0"}])
def test_a_task_that_was_given_gpus_and_sees_none_fails_naming_the_request(monkeypatch, asked):
    import torch
    from fastclip import runtime
    for name in (*runtime.SLURM_GPU_VARIABLES, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.pick_device("auto").type == "cpu"  # asked for nothing: the CPU is the choice
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # every GPU hidden on purpose: still the CPU
    assert runtime.pick_device("auto").type == "cpu"
    for name, value in asked.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"{next(iter(asked))}={next(iter(asked.values()))} but torch sees no GPU"):
        runtime.pick_device("auto")


def test_a_single_gpu_task_that_sees_no_gpu_fails_before_training(tmp_path, cli_env):
    env = _srun_env(cli_env, 1235, 0, ntasks=1, SLURM_TASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="1")
    done = subprocess.run([PYTHON, "-m", "fastclip.train", *TINY_CLIP, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "SLURM_GPUS_ON_NODE=1 but torch sees no GPU" in done.stderr, done.stderr[-3000:]
    assert not list(tmp_path.rglob("last.pt"))
