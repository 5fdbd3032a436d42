"""A real (tiny) CLIP training job: loss goes down, MLflow gets what it must, failures are loud."""
import math

import mlflow
import pytest
import torch

from conftest import TINY_CLIP, compose_cfg, load_checkpoint, run_killed_at_loss_call
from fastclip import runtime
from fastclip.loop import TrainingDiverged
from fastclip.tasks.clip import ClipTask
from fastclip.store import TrackingStoreError
from fastclip.train import run


def test_a_few_steps_lower_the_loss():
    cfg = compose_cfg(TINY_CLIP + ["trainer.batch_size=64"])
    runtime.seed_everything(0)
    task = ClipTask(cfg, torch.device("cpu"))
    batch = next(iter(task.train_batches(0)))
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss, _, n = task.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert n == 64
    # a contrastive loss first collapses to chance (ln 64 = 4.16), then must go clearly below it
    assert losses[-1] < math.log(64) - 0.5, losses


def test_run_logs_params_metrics_tags_and_config(tmp_path, store):
    cfg = compose_cfg(TINY_CLIP + [f"tracking.uri={store}", "epochs=2", "trainer.max_steps=4", "trainer.lr=1e-3",
                                   "tracking.log_every=2"])
    metrics = run(cfg, tmp_path / "run")
    client = mlflow.MlflowClient(tracking_uri=store)
    logged = client.get_run(metrics["mlflow_run_id"])
    assert logged.info.status == "FINISHED"
    params = logged.data.params
    assert params["trainer.lr"] == "0.001" and params["epochs"] == "2" and params["boundary.name"] == "none"
    assert params["encoder.vision.width"] == "32"
    for key in ("zeroshot/top1", "zeroshot/top5", "time/train_s", "throughput/train_samples_per_s", "train/loss"):
        assert key in logged.data.metrics, key
    assert 0.0 <= logged.data.metrics["zeroshot/top1"] <= 1.0
    assert len(client.get_metric_history(logged.info.run_id, "train/loss")) == 4
    assert len(logged.data.tags["mlflow.source.git.commit"]) >= 7
    artifacts = [a.path for a in client.list_artifacts(logged.info.run_id)]
    assert "config.yaml" in artifacts
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_unwritable_tracking_uri_fails_before_training_naming_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    uri = f"sqlite:///{blocker}/sub/mlflow.db"
    cfg = compose_cfg(TINY_CLIP + [f"tracking.uri={uri}"])
    with pytest.raises(TrackingStoreError, match=str(blocker)):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, store, monkeypatch):
    cfg = compose_cfg(TINY_CLIP + [f"tracking.uri={store}", "epochs=3", "trainer.batch_size=256"])
    real_loss, calls = ClipTask.loss, {"n": 0}

    def poisoned(self, batch):  # epoch 1 has 5 steps; the 8th step's loss is NaN
        calls["n"] += 1
        out = real_loss(self, batch)
        if calls["n"] == 8:
            out.loss = out.loss * math.nan
        return out

    monkeypatch.setattr(ClipTask, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"train/loss is nan at step 7 .*last good checkpoint kept"):
        run(cfg, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["train_state"]["step"] == 5 and state["train_state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    failed = mlflow.MlflowClient(tracking_uri=store).search_runs(
        [mlflow.MlflowClient(tracking_uri=store).get_experiment_by_name("fastclip").experiment_id])
    assert failed[0].info.status == "FAILED"
    # losses are read in batches (not every step); the steps before the bad one are still logged
    history = mlflow.MlflowClient(tracking_uri=store).get_metric_history(failed[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6, 7]


def test_killed_run_resumes_where_it_stopped(tmp_path, store, monkeypatch):
    common = TINY_CLIP + [f"tracking.uri={store}", "trainer.batch_size=256", "trainer.warmup_steps=3", "epochs=2"]
    full = run(compose_cfg(common), tmp_path / "full")

    # 5 steps per epoch: dies on the 7th step
    first = run_killed_at_loss_call(compose_cfg(common), tmp_path / "killed", monkeypatch, call=7)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.pt"
    assert (first["train_state"]["step"], first["train_state"]["epoch"]) == (5, 1)
    client = mlflow.MlflowClient(tracking_uri=store)
    assert client.get_run(first["mlflow_run_id"]).info.status == "KILLED"

    resumed = run(compose_cfg(common + [f"trainer.resume={ckpt}"]), tmp_path / "elsewhere")
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]
    assert client.get_run(first["mlflow_run_id"]).info.status == "FINISHED"
    assert not (tmp_path / "elsewhere").exists()  # the resumed run writes into the run dir it continues
    end = load_checkpoint(ckpt)
    ref = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    # the schedule continues (no re-warm-up, no re-initialised lr) and lands on the same weights
    assert end["train_state"]["step"] == ref["train_state"]["step"] == 10
    assert end["scheduler"] == ref["scheduler"]
    assert end["optimizer"]["param_groups"][0]["lr"] == ref["optimizer"]["param_groups"][0]["lr"]
    for key, value in ref["model"].items():
        torch.testing.assert_close(end["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert resumed["zeroshot/top1"] == pytest.approx(full["zeroshot/top1"], abs=1e-6)
