"""hydra/sweeper=optuna searches on the value the entrypoint returns (the validation metric): the
shipped sweep runs as written (2 trials here), each trial an MLflow run under one parent, and the
best value it reports is the best trial's val/zeroshot_top1, not its test zeroshot/top1."""
import subprocess

import mlflow
import pytest
import yaml

from conftest import TINY_CLIP
from fastclip import PROJECT_ROOT


@pytest.mark.slow
def test_the_optuna_sweep_maximises_the_validation_metric_over_its_trials(tmp_path, cli_env):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(["bash", str(PROJECT_ROOT / "sweeps" / "optuna_lr.sh"), "hydra.sweeper.n_trials=2",
                           "trainer.max_steps=3", *TINY_CLIP, "eval.boundary_picture=false", f"tracking.uri={store}",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=cli_env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    client = mlflow.MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("optuna_lr").experiment_id])
    trials = [r for r in runs if r.data.tags.get("fastclip.role") != "sweep"]
    [parent] = [r for r in runs if r.data.tags.get("fastclip.role") == "sweep"]
    assert len(trials) == 2 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    lrs = {float(r.data.params["trainer.lr"]) for r in trials}
    assert len(lrs) == 2 and all(1e-4 <= lr <= 3e-3 for lr in lrs)  # sampled from the interval
    top = max(trials, key=lambda r: r.data.metrics["val/zeroshot_top1"])
    assert best["best_value"] == pytest.approx(top.data.metrics["val/zeroshot_top1"])
    # the two splits give the trials different numbers: the value above is the validation one, not the test one
    assert all(r.data.metrics["val/zeroshot_top1"] != r.data.metrics["zeroshot/top1"] for r in trials)
    assert "objective val/zeroshot_top1 = " in done.stderr + done.stdout
    assert float(best["best_params"]["trainer.lr"]) in lrs
