"""A real Hydra multirun in a subprocess: jobs fan out, one store, one parent run, finished children."""
import subprocess

import mlflow

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
