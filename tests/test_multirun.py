"""A real Hydra multirun in a subprocess: jobs fan out, one store, one parent run, finished children."""
import subprocess

import mlflow
import pytest

from conftest import PYTHON, TINY_CLIP


def test_two_job_multirun_lands_in_the_default_store(tmp_path, cli_env):
    cmd = [PYTHON, "-m", "fastclip.train", "-m", "trainer.lr=5e-4,1e-3", "epochs=1", "trainer.max_steps=2",
           *TINY_CLIP, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    store = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"  # the default: <launch dir>/outputs
    client = mlflow.MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("fastclip")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("fastclip.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("fastclip.role") != "sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert len(children) == 2
    assert sorted(r.data.params["trainer.lr"] for r in children) == ["0.0005", "0.001"]
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.params["epochs"] == "1"
        assert "zeroshot/top1" in r.data.metrics
        assert r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert r.data.tags["hydra.job.num"] in ("0", "1")
    assert (tmp_path / "sweep" / "0" / "config.yaml").is_file()

    # the parent is named after what the sweep swept; the experiment opens on its runs in MLflow 3's UI
    name = parent[0].info.run_name  # cut at 200 characters, as this command line is longer
    assert name.startswith("sweep trainer.lr=5e-4,1e-3 epochs=1 trainer.max_steps=2 encoder.") and name.endswith("...")
    assert len(name) == 200
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    # make report (the latest sweep): one row per job, the varied key as its label, the parent left out
    from fastclip.report import main
    report = main(["--sweep", "latest", "--uri", store, "--out", str(tmp_path / "report")])
    assert report.selection.sweep_id == parent[0].info.run_id
    assert sorted(g.label for g in report.groups) == ["trainer.lr=0.0005", "trainer.lr=0.001"]


def parent_and_children(store: str, experiment: str):
    client = mlflow.MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("fastclip.role") == "sweep"]
    children = {r.data.params["trainer.lr"]: r for r in runs if r.data.tags.get("fastclip.role") != "sweep"}
    return parent, children


DIVERGES = "1e12"  # the first steps' weights go non-finite: TrainingDiverged, a job that fails with a message


def test_a_failing_job_is_counted_and_the_rest_of_the_grid_still_runs(tmp_path, cli_env):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [PYTHON, "-m", "fastclip.train", "-m", f"trainer.lr={DIVERGES},5e-4", "epochs=1", "trainer.max_steps=3",
           *TINY_CLIP, "eval.boundary_picture=false", f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0  # the multirun's exit code says a job failed
    said = done.stderr + done.stdout
    assert "sweep: 2 jobs ended, 1 completed, 1 failed" in said, done.stderr[-3000:]
    # progress as it runs: each job's place when it starts, the count when it ends
    assert "sweep: job 0 (1 of 2; 0 done) starts: trainer.lr=1000000000000.0" in said
    assert "sweep: job 0 failed; 1 of 2 jobs ended (1 failed)" in said
    assert "sweep: job 1 (2 of 2; 1 done, 1 failed) starts: trainer.lr=0.0005" in said
    assert "sweep: job 1 completed; 2 of 2 jobs ended (1 failed)" in said
    parent, children = parent_and_children(store, "fastclip")
    assert children["1000000000000.0"].info.status == "FAILED"
    assert children["0.0005"].info.status == "FINISHED" and "zeroshot/top1" in children["0.0005"].data.metrics
    assert parent.info.status == "FAILED" and parent.data.tags["fastclip.sweep.failed_jobs"] == "1"


def test_an_optuna_study_records_a_failed_trial_and_goes_on(tmp_path, cli_env):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # TPE's seed 10 draws the diverging lr first, then the good one (optuna 2.10; asserted below). Not the grid
    # sampler: optuna 2.10's draws its grid with the unseeded `random`, and the plugin crashes on Study.stop when
    # the grid's last trial fails
    cmd = [PYTHON, "-m", "fastclip.train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=10",
           "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", "hydra.sweeper.direction=maximize",
           "hydra.sweeper.max_failure_rate=1.0",
           f"trainer.lr=choice({DIVERGES},5e-4)", "epochs=1", "trainer.max_steps=3", *TINY_CLIP,
           "eval.boundary_picture=false", f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "1 failed" in done.stderr + done.stdout, done.stderr[-3000:]
    assert "sweep: job 1 (2 of 2; 1 done, 1 failed) starts" in done.stderr + done.stdout  # n_trials is the plan
    import yaml
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    parent, children = parent_and_children(store, "fastclip")
    assert float(best["best_params"]["trainer.lr"]) == 5e-4
    assert parent.info.status == "FAILED" and set(children) == {"1000000000000.0", "0.0005"}
    assert children["1000000000000.0"].info.start_time < children["0.0005"].info.start_time  # went on past it


def test_a_grid_with_a_job_a_run_would_refuse_fails_whole_before_any_job_trains(tmp_path, cli_env):
    """Hydra composes a grid's jobs before launching them but checks only their values' types: the
    schemas' choices and the rules across keys ran inside each job, so the first job trained and a
    typo failed the second (on SLURM, hours later). fastclip.sweep_preflight checks every job first."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [PYTHON, "-m", "fastclip.train", "-m", "boundary=fixed", "boundary.image_order=raster,hilbrt",
           "trainer.max_steps=2", f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-2:] == [
        "error: 1 of the multirun's 2 jobs would fail before training, so none ran:",
        "  job 1 (boundary.image_order=hilbrt): boundary.image_order='hilbrt': expected raster or hilbert"]
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "mlflow.db").exists()
    # the check writes nothing: a command line Hydra then refuses leaves no store behind
    done = subprocess.run([PYTHON, "-m", "fastclip.train", "-m", "trainer.lr=1e-3,5e-4", "--cfg", "job"], cwd=tmp_path,
                          env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and not (tmp_path / "outputs").exists(), done.stderr[-2000:]


def test_every_job_is_checked_with_the_rules_across_keys_and_a_sound_grid_passes():
    from fastclip.checks import ConfigError
    from fastclip.sweep_preflight import SHOWN, check_sweep_jobs, sweep_jobs_overrides
    with pytest.raises(ConfigError, match=r"1 of the multirun's 2 jobs .*\n  job 1 \(boundary.k=1\): boundary.random_"
                                          r"offset=true with boundary.k=1"):
        check_sweep_jobs(["-m", "boundary=fixed", "boundary.k=4,1", "boundary.random_offset=true"])
    many = ",".join(str(n) for n in range(-SHOWN - 2, 1))  # every max_steps <= 0 is refused
    with pytest.raises(ConfigError, match=rf"{SHOWN + 3} of the multirun's {SHOWN + 3} jobs(.|\n)*\.\.\. and 3 more$"):
        check_sweep_jobs(["-m", f"trainer.max_steps={many}"])
    check_sweep_jobs(["-m", "boundary=none,fixed,gumbel", "seed=0,1", "+cluster=local"])
    # a job SLURM places is not held to the launching host's CPUs (each job checks its count where it runs)
    from fastclip.schema.workers import available_cpus
    more = f"trainer.num_workers={available_cpus() + 1}"
    check_sweep_jobs(["-m", "+cluster=example_gpu", "seed=0,1", more])
    check_sweep_jobs(["-m", "+cluster=example_gpu", "seed=0,1", "tracking.uri=http://127.0.0.1:9"])  # the nodes' server
    with pytest.raises(ConfigError, match=rf"2 of the multirun's 2 jobs(.|\n)*{more}: more loader workers than the"):
        check_sweep_jobs(["-m", "seed=0,1", more])
    check_sweep_jobs(["boundary.image_order=hilbrt"])  # a single run: the run's own check names it
    with pytest.raises(ConfigError, match=rf"2 of the multirun's 2 jobs(.|\n)*{more}"):  # submitit_local: this host
        check_sweep_jobs(["-m", "+cluster=local", "seed=0,1", more])
    # what only a job's own process knows is left to it; a command that only prints, another tree: not checked
    check_sweep_jobs(["-m", "seed=0,1", "tracking.run_name=job${hydra:job.num}", "dataset.cache_dir=${oc.env:NOPE_X}"])
    check_sweep_jobs(["-m", "seed=0,1", "boundary.image_order=hilbrt", "--cfg", "job"])
    check_sweep_jobs(["-m", "-cn", "mine", "seed=0,1", "eval.placement_control=true"])
    # a job whose overrides its run refuses (a key set and force-added: both reach the job); a key the
    # command line gives twice is the sweep scripts' contract ("$@" after their own values: the last wins)
    with pytest.raises(ConfigError, match="trainer.lr is given 2 times"):
        check_sweep_jobs(["-m", "seed=0,1", "trainer.lr=1e-3", "++trainer.lr=2e-3"])
    check_sweep_jobs(["-m", "seed=0,1", "epochs=3", "epochs=4"])
    assert sweep_jobs_overrides(["-m", "+cluster=local", "trainer.lr=5e-4,1e-3"]) == [
        ["+cluster=local", "trainer.lr=0.0005"], ["+cluster=local", "trainer.lr=0.001"]]
    assert sweep_jobs_overrides(["-m", "hydra/sweeper=optuna", "trainer.lr=interval(1e-4,1e-2)"]) is None
