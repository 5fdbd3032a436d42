"""The training loader's workers persist across epochs (trainer.num_workers > 0): the same worker
processes serve every epoch, yet each epoch's batches (order, crops, captions) are those a loader built
for that epoch gives, for a map-style source and a shard stream, from an epoch's start and from a
resumed batch; the task's close() ends the workers."""
import multiprocessing as mp

import pytest
import torch

from conftest import TINY_CLIP, compose_cfg
from datagen import make_csv
from fastclip.data.epoch_order import SupersededEpoch
from fastclip.tasks.clip import ClipTask
from test_shard_split import shard_task

EPOCHS = ((0, 0), (1, 0), (2, 1), (3, 0))  # (epoch, first batch): one resumed mid-epoch


def csv_task(tmp_path, extra) -> ClipTask:
    # textured: a crop of a plain colour is the same wherever it falls, and would not show a stale epoch
    train = make_csv(tmp_path / "train", per_colour=4, textured=True)
    held = make_csv(tmp_path / "held", per_colour=1, first=4)
    return ClipTask(compose_cfg(TINY_CLIP + ["eval.boundary_picture=false", "dataset=csv", f"dataset.path={train}",
                                             f"dataset.eval_path={held}", *extra]), torch.device("cpu"))


def contents(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(b.images.clone(), b.tokens.clone()) for b in batches]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("source", ["csv", "shards"])
def test_persistent_workers_serve_every_epoch_with_that_epochs_batches(tmp_path, monkeypatch, source):
    extra = ["trainer.num_workers=2", "trainer.batch_size=2"]
    build = (lambda d: csv_task(tmp_path / d, extra)) if source == "csv" else \
        (lambda d: shard_task(tmp_path / d, monkeypatch, 0, 1, extra))
    task, workers, seen = build("persistent"), set(), []
    for epoch, start in EPOCHS:
        batches = contents(task.train_batches(epoch, start))
        workers.add(frozenset(p.pid for p in mp.active_children()))
        fresh = build(f"fresh{epoch}")  # a loader built for this epoch alone: its own workers
        assert same(batches, contents(fresh.train_batches(epoch, start))), (epoch, start)
        fresh.close()
        seen.append(batches)
    assert not same(seen[0], seen[1])  # the epochs differ: a worker that kept epoch 0 would be caught
    first = next(iter(workers))
    assert len(first) >= 2 and all(first <= w for w in workers)  # the same two workers in every epoch
    task.close()
    assert not first & {p.pid for p in mp.active_children()}


def test_an_epochs_batches_read_after_a_later_call_raise_instead_of_mixing_epochs(tmp_path):
    task = csv_task(tmp_path, ["trainer.num_workers=1", "trainer.batch_size=2"])
    old = iter(task.train_batches(0))
    next(old)
    assert len(task.train_batches(1)) > 0  # even a length read moves the shared state
    with pytest.raises(SupersededEpoch, match="read after a later train_batches call"):
        next(old)
    assert len(list(task.train_batches(2))) == len(task.train_batches(2))
    task.close()
