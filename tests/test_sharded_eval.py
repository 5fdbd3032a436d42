"""Evaluation sharded over the ranks of a data-parallel run (fastclip/eval/sharded.py): two gloo
processes on CPU, each encoding about half of every set, give exactly one process's numbers; and
evaluation runs under the training precision with eval.num_workers loader workers."""
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from conftest import TINY_CLIP
from fastclip import distributed
from fastclip.data.pairs import RetrievalSet
from fastclip.distributed import RankFailed
from fastclip.eval import sharded
from fastclip.eval.retrieval import retrieval_eval

BROKEN = 7  # the retrieval set's image that "fails to decode"


class IndexedImages(Dataset):
    """A retrieval set's images: (tensor, image index), None for the one that does not decode."""

    def __init__(self, labelled):
        self.labelled = labelled

    def __len__(self):
        return 150

    def __getitem__(self, i):
        return None if i == BROKEN else (self.labelled[i][0], i)


def _evaluate(rank: int, init: str, out):
    from fastclip.config import compose_train_config
    from fastclip.tasks import build_task
    torch.set_num_threads(1)  # both ways of evaluating in the same arithmetic
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    distributed._world, distributed._host_group = distributed.World(rank, 2, rank), dist.group.WORLD
    try:
        torch.manual_seed(0)
        task = build_task(compose_train_config([*TINY_CLIP, "eval.batch_size=32", "eval.num_workers=0"]),
                          torch.device("cpu"), None)
        z = task.data.zeroshot
        retrieval = RetrievalSet(IndexedImages(z.images), [[f"a digit {z.classnames[int(z.images[i][1])]}"] * (1 + i % 3)
                                                           for i in range(150)])

        def numbers():
            return {**task.quality(split="test"), **task.quality(split="val"),
                    **retrieval_eval(task.model, task.tokenizer, retrieval, task.device, batch_size=32)}
        encoded = []
        encode_image = task.model.encode_image
        task.model.encode_image = lambda images, **kw: encoded.append(len(images)) or encode_image(images, **kw)
        shared = sharded.together(numbers, "the test's evaluation")
        mine = sum(encoded)
        encoded.clear()
        alone = numbers()  # outside together(): this rank evaluates every set whole
        failed = []
        for fails in (lambda: 1 / 0 if rank else sharded.gather(1),  # rank 1, before its share is sent
                      lambda: sharded.gather(1) and (1 / 0 if rank == 0 else None)):  # rank 0, after the last
            try:
                sharded.together(fails, "the failing evaluation")
                failed.append(None)
            except (ZeroDivisionError, RankFailed) as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
        out[rank] = {"shared": shared, "alone": alone, "encoded": mine, "whole": sum(encoded), "failed": failed}
    finally:
        distributed.shutdown()


def test_two_ranks_each_encode_half_of_every_set_and_get_one_process_numbers(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_evaluate, args=(f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    for rank in (0, 1):
        got = out[rank]
        assert got["shared"] == out[0]["alone"], rank  # every number, exactly (rank 0's alone: one process's)
        assert set(got["shared"]) >= {"zeroshot/top1", "zeroshot/top5", "val/zeroshot_top1", "retrieval/i2t_r1",
                                      "retrieval/t2i_r5"}
        # the zero-shot classifiers encode no image: a rank's images are its share of the sets
        assert abs(got["encoded"] - got["whole"] / 2) <= 32, (got["encoded"], got["whole"])
    assert out[0]["encoded"] + out[1]["encoded"] == out[0]["whole"]
    assert out[0]["shared"]["retrieval/images"] == 149 and out[0]["shared"]["retrieval/skipped"] == 1
    # a rank that fails raises its error; the others, waiting in an exchange, raise RankFailed naming it
    assert out[1]["failed"][0].startswith("ZeroDivisionError")
    assert out[0]["failed"][0].startswith("RankFailed: the failing evaluation failed on rank 1: ZeroDivisionError")
    assert out[0]["failed"][1].startswith("ZeroDivisionError")
    assert out[1]["failed"][1].startswith("RankFailed: the failing evaluation failed on rank 0: ZeroDivisionError")


def test_evaluation_runs_under_the_training_precision_with_eval_loader_workers(monkeypatch):
    """trainer.precision=bf16: the evaluation's image and text encodings run under bf16 autocast, as
    training's forward does; the zero-shot images come through eval.num_workers loader workers (1 here, where auto gives the in-memory digits none)."""
    from fastclip.config import compose_train_config
    from fastclip.eval import zeroshot
    from fastclip.tasks import build_task
    task = build_task(compose_train_config([*TINY_CLIP, "trainer.precision=bf16", "eval.num_workers=1"]),
                      torch.device("cpu"), None)
    seen, workers = [], []
    encode_image = task.model.encode_image
    task.model.encode_image = lambda images, **kw: seen.append(torch.get_autocast_dtype("cpu")
                                                               if torch.is_autocast_enabled("cpu") else None) \
        or encode_image(images, **kw)
    real = zeroshot.DecodedBatches
    monkeypatch.setattr(zeroshot, "DecodedBatches", lambda images, batch_size, num_workers=0, timeout_s=0:
                        workers.append((num_workers, timeout_s)) or real(images, batch_size))  # read here: a fast test
    task.quality(split="val")
    assert seen and set(seen) == {torch.bfloat16}
    assert workers == [(1, 300)]  # and trainer.loader_timeout_s's default


CLASSNAMES = [f"class {i}" for i in range(25)]  # three batches of 10 classes: rank 0 encodes two, rank 1 one


def _classifier(rank: int, init: str, out):
    from fastclip.config import compose_train_config
    from fastclip.eval.zeroshot import shared_classifier
    from fastclip.models.clip import build_clip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    distributed._world, distributed._host_group = distributed.World(rank, 2, rank), dist.group.WORLD
    try:
        torch.manual_seed(0)
        cfg = compose_train_config(TINY_CLIP)
        model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
        model.eval()
        encoded, encode_text = [], model.encode_text
        model.encode_text = lambda texts, **kw: encoded.append(len(texts)) or encode_text(texts, **kw)
        templates = ["a photo of {}.", "{}"]
        shared = sharded.together(lambda: shared_classifier(model, tokenizer, CLASSNAMES, templates, "cpu"), "test")
        out[rank] = {"shared": shared, "prompts": sum(encoded),
                     "alone": shared_classifier(model, tokenizer, CLASSNAMES, templates, "cpu")}
        # the ImageNet cache seen by rank 0 only (a node-local cache dir): both ranks build, none waits alone
        from fastclip.eval.imagenet import cached_classifier
        cache = Path(init[len("file://"):]).parent / f"cache{rank}"
        with sharded.alone():
            cached_classifier(model, tokenizer, CLASSNAMES, "simple", "cpu", cache if rank == 0 else None)
        out[f"cached {rank}"] = sharded.together(
            lambda: cached_classifier(model, tokenizer, CLASSNAMES, "simple", "cpu", cache)[1], "test")
    finally:
        distributed.shutdown()


def test_the_zero_shot_classifier_is_built_in_shares_and_equals_one_process(tmp_path):
    """Each rank encodes the prompts of every other batch of 10 classes (the ImageNet classifier's 80K
    prompts were encoded whole on every rank); the gathered columns are one process's, in class order."""
    out = mp.Manager().dict()
    mp.spawn(_classifier, args=(f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    assert out[0]["shared"].shape == (32, 25)
    for rank in (0, 1):
        assert torch.equal(out[rank]["shared"], out[0]["alone"]), rank
    assert (out[0]["prompts"], out[1]["prompts"]) == (2 * 15, 2 * 10)  # classes 0-9 and 20-24; 10-19
    assert out["cached 0"] is out["cached 1"] is False  # rank 1 has no cache: neither reads one
