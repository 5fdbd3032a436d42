"""The shared loop's timing: a step's data wait and its compute are told apart, as
open_clip_train's data_time / batch_time, so a slow loader is not read as a slow model."""
import shutil
import time

import pytest
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


def trained_weights(tmp_path, *overrides):
    from conftest import TINY_CLIP
    from fastclip import runtime
    from fastclip.tasks.clip import ClipTask
    cfg = compose_cfg(TINY_CLIP + ["boundary=gumbel", "boundary.apply_to=[image]", "epochs=1",
                                   "trainer.max_steps=3", "trainer.batch_size=64"] + list(overrides))
    runtime.seed_everything(0)
    task = ClipTask(cfg, torch.device("cpu"))
    fit(task, cfg, None, tmp_path / "_".join(overrides), torch.device("cpu"))
    return task.model


def assert_same_weights(a, b, atol):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=atol, rtol=0), name


def test_adamw_kernels_take_the_same_steps(tmp_path):
    fused = trained_weights(tmp_path, "trainer.optimizer_impl=fused")
    loop = trained_weights(tmp_path, "trainer.optimizer_impl=for_loop")
    assert_same_weights(fused, loop, atol=1e-5)
    with pytest.raises(ValueError, match="trainer.optimizer_impl='adam8bit'"):
        trained_weights(tmp_path, "trainer.optimizer_impl=adam8bit")


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_blocks_train_like_eager(tmp_path):
    """trainer.compile: every transformer block compiled, DTP's varying segment count included
    (gumbel image tower), and the same training steps as eager up to float reordering."""
    from open_clip.transformer import ResidualAttentionBlock
    from fastclip.models.packed import packed_block
    compiled = trained_weights(tmp_path, "trainer.compile=true")
    eager = trained_weights(tmp_path, "trainer.compile=false")
    blocks = [m for m in compiled.modules() if isinstance(m, ResidualAttentionBlock)]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert compiled.visual.layout == "packed" and compiled.visual.packed_block is not packed_block
    assert all(m._compiled_call_impl is None for m in eager.modules() if isinstance(m, ResidualAttentionBlock))
    assert_same_weights(compiled, eager, atol=1e-4)


def test_training_steps_read_their_scalars_only_when_the_loop_logs(tmp_path, monkeypatch):
    """On a GPU every tensor -> Python read drains the queue. A step used to make five of them
    (the task's metrics and the NaN check before backward, the loss after); now the loss, lr and
    metrics stay on the device and come over in one transfer per log_every steps."""
    from conftest import TINY_CLIP, count_tensor_reads
    from fastclip import runtime
    from fastclip.tasks.clip import ClipTask
    cfg = compose_cfg(TINY_CLIP + ["epochs=1", "trainer.max_steps=8", "trainer.batch_size=32",
                                   "tracking.log_every=4", "trainer.progress=false"])
    runtime.seed_everything(0)
    task = ClipTask(cfg, torch.device("cpu"))
    task.evaluate = lambda: {}  # evaluation reads its results on purpose; the steps are under test
    loading = {"now": False}
    real_batches = task.train_batches

    def batches(epoch):  # the loader's own reads (sampler, random crops) happen on the host anyway
        loader = real_batches(epoch)

        class Loading:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                it = None
                while True:
                    loading["now"] = True
                    try:
                        it = it or iter(loader)
                        batch = next(it)
                    except StopIteration:
                        return
                    finally:
                        loading["now"] = False
                    yield batch
        return Loading()
    task.train_batches = batches
    reads = count_tensor_reads(monkeypatch, ignore=lambda: loading["now"])
    fit(task, cfg, None, tmp_path / "run", torch.device("cpu"))
    monkeypatch.undo()
    assert reads == {"tolist": 2}  # steps 4 and 8: one transfer each


def test_step_scalars_keep_order_across_devices_and_plain_numbers():
    from fastclip.loop import StepScalars
    scalars = StepScalars()
    scalars.add(0, 0, torch.tensor(True), {"train/loss": torch.tensor(2.5), "train/lr": 0.1})
    scalars.add(1, 0, True, {"train/loss": torch.tensor(float("nan")), "train/lr": 0.2,
                             "train/n": torch.tensor(3, dtype=torch.long)})
    rows = scalars.fetch()
    assert [(s, e, f) for s, e, f, _ in rows] == [(0, 0, True), (1, 0, True)]
    assert rows[0][3] == {"train/loss": 2.5, "train/lr": 0.1}
    assert rows[1][3]["train/lr"] == 0.2 and rows[1][3]["train/n"] == 3.0 and rows[1][3]["train/loss"] != rows[1][3]["train/loss"]
    assert scalars.fetch() == []
