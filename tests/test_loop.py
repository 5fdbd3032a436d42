"""The shared loop's timing: a step's data wait and its compute are told apart, as
open_clip_train's data_time / batch_time, so a slow loader is not read as a slow model."""
import time

import torch

from conftest import compose_cfg
from fastclip.loop import fit


class SleepyTask:
    """Batches arrive after `load_s`; each loss takes `compute_s`."""

    def __init__(self, load_s: float, compute_s: float, n_batches: int = 6):
        self.model = torch.nn.Linear(2, 1)
        self.load_s, self.compute_s, self.n = load_s, compute_s, n_batches

    def train_batches(self, epoch):
        task = self

        class Batches:
            def __len__(self):
                return task.n

            def __iter__(self):
                for _ in range(task.n):
                    time.sleep(task.load_s)
                    yield torch.ones(4, 2)
        return Batches()

    def loss(self, batch):
        time.sleep(self.compute_s)
        return self.model(batch).square().mean(), {}, batch.shape[0]

    def evaluate(self):
        return {}


def test_step_time_splits_into_data_wait_and_compute(tmp_path):
    cfg = compose_cfg(["epochs=1", "trainer.progress=false"])
    slow_loader = fit(SleepyTask(load_s=0.05, compute_s=0.0), cfg, None, tmp_path / "a", torch.device("cpu"))
    slow_model = fit(SleepyTask(load_s=0.0, compute_s=0.05), cfg, None, tmp_path / "b", torch.device("cpu"))
    for m in (slow_loader, slow_model):
        assert m["time/step_median_s"] >= 0.05
        assert abs(m["time/data_median_s"] + m["time/compute_median_s"] - m["time/step_median_s"]) < 0.02
    assert slow_loader["time/data_median_s"] >= 0.05 > slow_loader["time/compute_median_s"]
    assert slow_model["time/compute_median_s"] >= 0.05 > slow_model["time/data_median_s"]
