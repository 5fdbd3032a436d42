"""Shards dealt out to (rank, loader worker): with W simulated ranks each sample is read by one rank's
one worker (reads counted, not decodes), every rank makes the same number of batches with the rest
counted as left out, a mid-epoch resume with workers is exact, and what cannot split fails before
training naming the key and the counts."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_CLIP, compose_cfg
from datagen import colour_image, jpeg_bytes, write_shard
from fastclip import distributed
from fastclip.data import shards as shards_module
from fastclip.data.shard_split import LEFT_OUT, taken_in_turn
from fastclip.data.shards import ShardSource, ShardStream
from fastclip.tasks.clip import ClipTask

SIZES = [9, 12, 5, 16, 8, 11, 7]  # unequal shards: no rank's share is a whole number of batches


def write_shards(root, sizes=SIZES, with_sizes=True, colour="red") -> str:
    names = {}
    for s, n in enumerate(sizes):
        path = root / f"shard-{s:06d}.tar"
        write_shard(path, [{"__key__": f"{s}-{i}", "jpg": jpeg_bytes(colour_image(colour, i, size=36)),
                            "txt": f"shard {s} sample {i}"} for i in range(n)])
        names[path.name] = n
    if with_sizes:
        (root / "sizes.json").write_text(json.dumps(names))
    return str(root / f"shard-{{000000..{len(sizes) - 1:06d}}}.tar")


def read_by_each(monkeypatch, pattern, world: int, workers: int, batch: int, resampled=False):
    """{(rank, worker): keys of the samples it read from its shards}, {(rank, worker): keys it decoded},
    each (rank, worker) run in this process as the loader's worker would run it."""
    reads, decoded, who = {}, {}, {}
    real = shards_module.shard_samples

    def counted(url, sizes):
        for sample in real(url, sizes):
            reads.setdefault(who["now"], []).append(sample.get("__key__"))
            yield sample
    monkeypatch.setattr(shards_module, "shard_samples", counted)
    source = ShardSource(pattern, 1.0, None)
    for rank in range(world):
        for worker in range(workers):
            who["now"] = (rank, worker)
            monkeypatch.setattr(shards_module, "get_worker_info",
                                lambda w=worker: SimpleNamespace(id=w, num_workers=workers))
            stream = ShardStream([source], lambda image: torch.zeros(1), lambda texts: texts, 0, resampled,
                                 60 if resampled else None)
            stream.set_epoch(3, 1, batch_size=batch, rank=rank, world_size=world)
            decoded[(rank, worker)] = [caption for _, caption in stream]
    return reads, decoded


@pytest.mark.parametrize("world, workers", [(1, 2), (2, 1), (3, 2)])
def test_each_sample_is_read_by_exactly_one_rank_and_worker(tmp_path, monkeypatch, world, workers):
    reads, decoded = read_by_each(monkeypatch, write_shards(tmp_path), world, workers, batch=2)
    keys = [k for part in reads.values() for k in part]
    assert len(keys) == len(set(keys))  # read once at most, whichever rank and worker
    per_rank = [sum(len(decoded[(r, w)]) for w in range(workers)) for r in range(world)]
    assert len(set(per_rank)) == 1 and per_rank[0] > 0  # the same samples (steps) on every rank
    # what is read is what is decoded, bar a worker's last partial batch: nothing read for another rank
    for part, captions in decoded.items():
        assert len(reads.get(part, [])) - len(captions) < 2
    if world == 1:  # one process reads every shard, as before
        assert len(keys) == sum(SIZES)


def test_resampled_ranks_draw_their_own_shards_and_make_equal_batches(tmp_path, monkeypatch):
    reads, decoded = read_by_each(monkeypatch, write_shards(tmp_path), 2, 2, batch=4, resampled=True)
    assert [len(decoded[(r, 0)]) + len(decoded[(r, 1)]) for r in range(2)] == [28, 28]  # 60 // (4 x 2) batches
    assert decoded[(0, 0)] != decoded[(1, 0)]  # each rank its own draw
    assert read_by_each(monkeypatch, write_shards(tmp_path), 2, 2, batch=4, resampled=True)[1] == decoded


def test_batches_are_taken_from_the_workers_in_turn():
    assert taken_in_turn([3, 1, 2], 6) == [3, 1, 2]
    assert taken_in_turn([3, 1, 2], 4) == [2, 1, 1]  # round 2 cut after its first part
    assert taken_in_turn([3, 1, 2], 5) == [2, 1, 2]
    assert taken_in_turn([0, 4], 3) == [0, 3]


def shard_task(tmp_path, monkeypatch, rank: int, world: int, extra=()) -> ClipTask:
    monkeypatch.setattr(distributed, "_world", distributed.World(rank, world, rank))
    monkeypatch.setattr(distributed, "host_min", list)  # one rank alone here: the others' batch sizes agree
    held = [write_shards(tmp_path / name, [6], colour=name) for name in ("blue", "green")]
    return ClipTask(compose_cfg(TINY_CLIP + [
        "eval.boundary_picture=false", "trainer.batch_size=4", "dataset=webdataset", "dataset.shuffle_buffer=4",
        f"dataset.train_shards='{write_shards(tmp_path / 'train')}'", f"dataset.eval_shards='{held[0]}'",
        f"dataset.val_shards='{held[1]}'", *extra]), torch.device("cpu"))


def keys_of(batches) -> list[list[tuple]]:
    return [[tuple(t.tolist()) for t in batch.tokens] for batch in batches]


def test_ranks_with_workers_take_equal_steps_and_resume_exactly(tmp_path, monkeypatch):
    """3 simulated ranks, 2 real loader workers each: the same number of batches on every rank (the
    loader's length says it), disjoint samples, the rest counted as left out once an epoch; a resume
    at any batch gives the rest of the epoch (workers passing over their share, or this process
    reading past where a worker has run out)."""
    world, seen, left, steps = 3, [], 0, set()
    for rank in range(world):
        task = shard_task(tmp_path, monkeypatch, rank, world, ["trainer.num_workers=2", "trainer.batch_size=2"])
        loader = task.train_batches(1)
        batches = list(loader)
        assert len(batches) == len(loader) > 0
        steps.add(len(batches))
        assert all(b.images.shape[0] == 2 for b in batches)
        left += batches[0].skipped.get(LEFT_OUT, 0)
        assert all(LEFT_OUT not in b.skipped for b in batches[1:])
        seen += [k for batch in keys_of(batches) for k in batch]
        for start in range(1, len(batches)):
            resumed = task.train_batches(1, start)
            assert len(resumed) == len(batches)
            assert keys_of(resumed) == keys_of(batches[start:]), start
            assert all(LEFT_OUT not in b.skipped for b in resumed)  # counted when the epoch started
    assert len(steps) == 1  # every rank the same steps
    assert len(seen) == len(set(seen)) == world * 2 * steps.pop()
    assert 0 < left <= sum(SIZES) - len(seen)  # 7 shards over 3 ranks: one rank has more than it takes


def test_a_split_that_cannot_give_every_rank_equal_steps_fails_before_training(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"dataset.train_shards=.*: 7 training shards for 8 ranks"):
        shard_task(tmp_path / "a", monkeypatch, 0, 8)
    shard_task(tmp_path / "b", monkeypatch, 0, 8, ["dataset.resampled=true", "dataset.num_samples=64"])  # draws
    root = tmp_path / "c"
    pattern = write_shards(root / "train", with_sizes=False)
    held = [write_shards(root / name, [6], colour=name) for name in ("blue", "green")]
    monkeypatch.setattr(distributed, "_world", distributed.World(0, 2, 0))
    with pytest.raises(ValueError, match=r"dataset.resampled=false with 2 ranks needs each shard's sample count"):
        ClipTask(compose_cfg(TINY_CLIP + ["dataset=webdataset", f"dataset.train_shards='{pattern}'",
                                          "dataset.num_samples=60", f"dataset.eval_shards='{held[0]}'",
                                          f"dataset.val_shards='{held[1]}'"]), torch.device("cpu"))
