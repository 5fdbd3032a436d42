"""Real-layout data sources on generated data: CSV, COCO 2014, class folder, shards (and the
converter between them), bad samples skipped and counted, clear errors before training."""
import json
import os
import subprocess
import time
from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset

from conftest import PYTHON, SHARED_DATA, TINY_CLIP, compose_cfg, load_checkpoint, run_killed_at_loss_call
from datagen import COLOURS, colour_image, jpeg_bytes, make_class_folder, make_coco, make_csv, write_shard
from fastclip.data import make_shards
from fastclip.data.tar_shards import count_samples, expand_shards
from fastclip.tasks.clip import ClipTask
from fastclip.train import run

FAST = TINY_CLIP + ["eval.boundary_picture=false", "trainer.batch_size=8"]
RETRIEVAL = [f"retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]


def shards_of(tmp_path, source, path, **kw):
    out = tmp_path / f"shards_{source}"
    summary = make_shards.main(["--source", source, "--path", str(path), "--out", str(out), "--shard-size", "10",
                                "--image-size", "32"] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])
    return out, summary


@pytest.mark.parametrize("source", ["csv", "coco", "folder"])
def test_converted_shards_train_and_report_retrieval(tmp_path, store, source):
    import shlex
    make = {"csv": make_csv, "coco": make_coco, "folder": make_class_folder}[source]
    path = make(tmp_path / source)
    out, summary = shards_of(tmp_path, source, path, eval_fraction=0.25, val_fraction=0.1)
    expected = {"csv": 4 * 6 * 2, "coco": 4 * 6 * 5, "folder": 4 * 6}[source]
    held, val = summary["eval"]["written"], summary["val"]["written"]
    assert summary["written"] + held + val == expected and held > 0 and val > 0 and summary["skipped"] == {}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == summary["written"] and max(sizes.values()) == 10
    pattern = str(out / ("shard-{000000..%06d}.tar" % (len(sizes) - 1)))
    assert count_samples(expand_shards(pattern)) == summary["written"]
    overrides = [arg for o in summary["overrides"] for arg in shlex.split(o)]  # as bash passes them on
    cfg = compose_cfg(FAST + [f"tracking.uri={store}", "dataset=webdataset", *overrides, "epochs=1"])
    assert cfg.dataset.val_shards  # make_shards --val-fraction's override
    metrics = run(cfg, tmp_path / "run")
    assert set(RETRIEVAL) <= set(metrics) and {f"val/{k.removeprefix('retrieval/')}" for k in RETRIEVAL} <= set(metrics)
    assert metrics["data/skipped"] == 0 and metrics["data/eval_overlap"] == 0
    assert metrics["throughput/train_samples_per_s"] > 0


def test_conversion_is_deterministic_and_resizes(tmp_path):
    path = make_csv(tmp_path / "csv")
    a, _ = shards_of(tmp_path / "a", "csv", path)
    b, _ = shards_of(tmp_path / "b", "csv", path)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    import tarfile
    from PIL import Image
    with tarfile.open(a / "shard-000000.tar") as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        assert min(Image.open(tar.extractfile(jpg)).size) == 32


def test_converter_skips_and_summarises_bad_records(tmp_path):
    path = make_csv(tmp_path / "csv", per_colour=2, captions_per_image=1)
    (tmp_path / "csv" / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with path.open("a") as f:
        f.write("broken.jpg,a broken image\nnowhere.jpg,a missing file\nred_0.jpg,\n")
    _, summary = shards_of(tmp_path, "csv", path)
    assert summary["written"] == 8
    assert summary["skipped"] == {"undecodable image": 1, "missing file": 1, "empty caption": 1}


def bad_shard(tmp_path, shade: int = 0):
    """16 samples: 13 good, a corrupt JPEG, an empty caption and a sample without its image;
    another `shade` gives other images (a held-out shard)."""
    samples = []
    for i in range(16):
        name = list(COLOURS)[i % 4]
        samples.append({"__key__": f"{i:05d}", "jpg": jpeg_bytes(colour_image(name, i, size=40 + 8 * shade)),
                        "txt": f"a {name} square"})
    samples[3]["jpg"] = b"\xff\xd8\xff\xe0 truncated garbage"
    samples[7]["txt"] = "   "
    del samples[11]["jpg"]
    samples[11]["json"] = "{}"
    path = tmp_path / "bad" / "shard-000000.tar"
    write_shard(path, samples)
    (path.parent / "sizes.json").write_text(json.dumps({path.name: 16}))
    return path


def test_a_shard_with_bad_samples_trains_and_counts_its_skips(tmp_path, store):
    shard = bad_shard(tmp_path)
    cfg = compose_cfg(FAST + [f"tracking.uri={store}", "dataset=webdataset", f"dataset.train_shards={shard}",
                              f"dataset.eval_shards={bad_shard(tmp_path / 'eval', shade=1)}",
                              f"dataset.val_shards={bad_shard(tmp_path / 'val', shade=4)}", "epochs=2",
                              "dataset.shuffle_buffer=4"])
    metrics = run(cfg, tmp_path / "run")
    assert metrics["data/skipped"] == 6  # 3 bad samples in each of 2 epochs
    assert metrics["retrieval/images"] == 13  # eval: 2 unusable samples dropped, the corrupt JPEG fails to decode
    assert metrics["retrieval/skipped"] == 1  # the corrupt JPEG, at decoding
    assert metrics["retrieval/skipped_rows"] == 2  # the samples without image or caption, when read
    import mlflow
    history = mlflow.MlflowClient(tracking_uri=store).get_metric_history(metrics["mlflow_run_id"], "data/skipped")
    assert [m.value for m in history] == [3, 6]


def test_csv_and_coco_train_directly_with_retrieval(tmp_path, store):
    csv = make_csv(tmp_path / "csv")
    cfg = compose_cfg(FAST + [f"tracking.uri={store}", "dataset=csv", f"dataset.path={csv}", "dataset.eval_fraction=0.25",
                              "epochs=1"])
    task = ClipTask(cfg, torch.device("cpu"))
    held = len(task.data.retrieval.captions)
    assert held == 6 and all(len(c) == 2 for c in task.data.retrieval.captions)
    train_images = {r[0] for r in task.data.train.records}
    assert not train_images & {str(f) for f in task.data.retrieval.images.files}  # split by image
    metrics = run(cfg, tmp_path / "csv_run")
    assert set(RETRIEVAL) <= set(metrics)
    coco = make_coco(tmp_path / "coco")
    cfg = compose_cfg(FAST + [f"tracking.uri={store}", "dataset=coco2014", f"dataset.root={coco}", "epochs=1",
                              "dataset.retrieval_images=8"])
    task = ClipTask(cfg, torch.device("cpu"))
    assert len(task.data.train) == 24  # one caption per train image
    assert len(task.data.retrieval.captions) == 8 and all(len(c) == 5 for c in task.data.retrieval.captions)
    cfg.dataset.pairs = "all"
    assert len(ClipTask(cfg, torch.device("cpu")).data.train) == 120
    assert set(RETRIEVAL) <= set(run(cfg, tmp_path / "coco_run"))


def test_csv_bad_rows_are_counted_in_training(tmp_path):
    csv = make_csv(tmp_path / "csv", per_colour=2, captions_per_image=2)  # 16 rows
    (tmp_path / "csv" / "images" / "broken.jpg").write_bytes(b"junk")
    with csv.open("a") as f:  # 4 more rows, 3 bad: 20 rows, no held-out split
        f.write("broken.jpg,a broken one\nnowhere.jpg,a missing one\nred_1.jpg,\nred_1.jpg,a red square again\n")
    cfg = compose_cfg(FAST + ["dataset=csv", f"dataset.path={csv}", "dataset.eval_fraction=0.0",
                              "eval.imagenet_val=null", "trainer.batch_size=6"])
    with pytest.raises(ValueError, match="no evaluation set"):
        ClipTask(cfg, torch.device("cpu"))
    cfg.dataset.eval_path = str(make_csv(tmp_path / "held_out", per_colour=2, first=2))
    task = ClipTask(cfg, torch.device("cpu"))
    total, skipped = 0, Counter()
    for batch in task.train_batches(0):
        out = task.loss(batch)
        total += out.samples
        skipped.update(out.skipped)
    # blue_0's 2 rows are held out for validation (split_seed=0): 18 rows, 3 of them bad
    assert skipped == {"undecodable image": 1, "missing file": 1, "empty caption": 1} and total == 15


@pytest.mark.parametrize("overrides, message", [
    (["dataset=csv", "dataset.path=/nonexistent/captions.csv"], "dataset.path='/nonexistent/captions.csv'"),
    (["dataset=coco2014", "dataset.root=/nonexistent/coco"], "dataset.root='/nonexistent/coco'"),
    (["dataset=webdataset", "dataset.train_shards='/nonexistent/s-{000..003}.tar'", "dataset.eval_shards=/x.tar"],
     "4 of 4 shards do not exist"),
    (["dataset=webdataset", "dataset.train_shards=[]", "dataset.eval_shards=/x.tar"], "empty list"),
    (["dataset=image_folder", "dataset.path=/nonexistent/folder"], "dataset.path='/nonexistent/folder'"),
])
def test_missing_data_fails_before_training_naming_it(tmp_path, store, overrides, message):
    cfg = compose_cfg(FAST + [f"tracking.uri={store}"] + overrides)
    with pytest.raises((FileNotFoundError, ValueError), match=message.replace("{", r"\{").replace("}", r"\}")):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_weighted_resampled_sources_mix_by_weight(tmp_path):
    for colour in ("red", "blue"):
        write_shard(tmp_path / colour / "s-0.tar", [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(colour_image(colour, i)),
                                                     "txt": f"a {colour} square"} for i in range(20)])
    sources = (f"[{{shards: '{tmp_path}/red/s-0.tar', weight: 3, num_samples: 20}},"
               f"{{shards: '{tmp_path}/blue/s-0.tar', weight: 1, num_samples: 20}}]")
    cfg = compose_cfg(FAST + ["dataset=webdataset", f"dataset.train_shards={sources}", "dataset.resampled=true",
                              f"dataset.eval_shards={bad_shard(tmp_path / 'eval', shade=1)}",
                              f"dataset.val_shards={bad_shard(tmp_path / 'val', shade=4)}"])
    task = ClipTask(cfg, torch.device("cpu"))
    stream, red_tokens = task.data.train, task.tokenizer(["a red square"])[0]
    stream.set_epoch(0, 0)
    assert len(list(stream)) == 40  # an epoch is the sources' 20 + 20 samples
    stream.num_samples = 400
    tokens = [s[1] for s in stream]
    red = sum(torch.equal(t, red_tokens) for t in tokens)
    assert len(tokens) == 400 and 0.65 < red / 400 < 0.85  # weights 3:1 -> 0.75
    again = [s[1] for s in stream]
    assert all(torch.equal(a, b) for a, b in zip(tokens, again))  # same (seed, epoch): the same stream
    stream.set_epoch(0, 1)
    assert not all(torch.equal(a, b) for a, b in zip(tokens, (s[1] for s in stream)))


class _DiesInWorker(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        os._exit(3)


class _HangsInWorker(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        time.sleep(8)  # > loader_timeout_s; bounded, as the loader's SIGTERM only starts a worker's grace


def test_a_hung_worker_does_not_hold_the_process_at_exit(tmp_path, cli_env):
    """The loader ends a worker it gave up on with SIGTERM; a worker that waits out a scheduler's
    SIGTERM (ignore_stop_signals) still leaves at once when its own training process sends it."""
    script = tmp_path / "hang.py"
    script.write_text(
        "import time, torch\n"
        "from torch.utils.data import DataLoader, Dataset\n"
        "from fastclip.worker_signals import ignore_stop_signals\n"
        "class Hangs(Dataset):\n"
        "    def __len__(self): return 4\n"
        "    def __getitem__(self, i): time.sleep(600)\n"
        "try:\n"
        "    next(iter(DataLoader(Hangs(), num_workers=1, timeout=2, worker_init_fn=ignore_stop_signals)))\n"
        "except RuntimeError as exc:\n"
        "    print('raised', exc)\n")
    t0 = time.time()
    done = subprocess.run([PYTHON, str(script)], env=cli_env, capture_output=True, text=True, timeout=120)
    assert "raised" in done.stdout and "timed out" in done.stdout, done.stderr[-2000:]
    assert time.time() - t0 < 60  # not the 600 s the worker sleeps, nor its 60 s grace


@pytest.mark.parametrize("dataset, error", [(_DiesInWorker, "exited unexpectedly"), (_HangsInWorker, "timed out")])
def test_a_broken_loader_worker_raises_instead_of_hanging(dataset, error):
    cfg = compose_cfg(FAST + ["trainer.num_workers=1", "trainer.loader_timeout_s=3"])
    task = ClipTask(cfg, torch.device("cpu"))
    task.data.train = dataset()
    t0 = time.time()
    with pytest.raises(RuntimeError, match=error):
        next(iter(task.train_batches(0)))
    assert time.time() - t0 < 60


def test_a_hung_evaluation_worker_raises_after_the_same_timeout():
    """trainer.loader_timeout_s once reached only the training loader: a stuck evaluation worker (zero-shot,
    retrieval, ImageNet) held the run forever."""
    cfg = compose_cfg(FAST + ["eval.num_workers=1", "trainer.loader_timeout_s=3"])
    task = ClipTask(cfg, torch.device("cpu"))
    task.data.split("val")[0].images = _HangsInWorker()
    t0 = time.time()
    with pytest.raises(RuntimeError, match="timed out"):
        task.quality(split="val")
    assert time.time() - t0 < 60


@pytest.mark.skipif(not (SHARED_DATA / "flickr8k-1k" / "captions.csv").is_file(), reason="../shared/data/flickr8k-1k absent")
def test_flickr8k_converts_trains_and_logs_retrieval(tmp_path, store):
    rows = (SHARED_DATA / "flickr8k-1k" / "captions.csv").read_text().splitlines()
    images = sorted({r.split(",", 1)[0] for r in rows[1:]})
    held = set(images[:100])
    for name, keep in (("train", lambda im: im not in held), ("eval", lambda im: im in held)):
        (tmp_path / f"{name}.csv").write_text("\n".join([rows[0]] + [r for r in rows[1:] if keep(r.split(",", 1)[0])]))
        make_shards.main(["--source", "csv", "--path", str(tmp_path / f"{name}.csv"), "--image-root",
                          str(SHARED_DATA / "flickr8k-1k" / "images"), "--out", str(tmp_path / name), "--image-size", "32"])
    cfg = compose_cfg(FAST + [f"tracking.uri={store}", "dataset=webdataset",
                              f"dataset.train_shards='{tmp_path}/train/shard-{{000000..000004}}.tar'",
                              f"dataset.eval_shards={tmp_path}/eval/shard-000000.tar",
                              "trainer.max_steps=5", "epochs=1", "trainer.batch_size=32"])
    metrics = run(cfg, tmp_path / "run")
    assert set(RETRIEVAL) <= set(metrics) and metrics["retrieval/images"] == 100  # 5 captions each, regrouped by source image


@pytest.mark.parametrize("shards, workers, in_workers", [(1, 0, True), (2, 2, True), (1, 2, False)])
def test_a_killed_shard_run_resumes_mid_epoch_on_the_same_stream(tmp_path, store, monkeypatch, shards, workers,
                                                                  in_workers):
    """Exact, whether each loader worker passes over its share of the trained batches itself (while
    every worker still has data) or this process reads past them (2 workers, 1 shard: one runs dry)."""
    paths = [bad_shard(tmp_path / f"s{i}", shade=2 + i) for i in range(shards)]
    pattern = str(paths[0]) if shards == 1 else str(tmp_path / "{s0,s1}" / "bad" / "shard-000000.tar")
    common = FAST + [f"tracking.uri={store}", "dataset=webdataset", f"dataset.train_shards='{pattern}'",
                     f"dataset.eval_shards={bad_shard(tmp_path / 'eval', shade=1)}",
                     f"dataset.val_shards={bad_shard(tmp_path / 'val', shade=4)}", "epochs=2", "trainer.batch_size=4",
                     "trainer.ckpt_every_steps=1", "dataset.shuffle_buffer=8", f"trainer.num_workers={workers}"]
    full = run(compose_cfg(common), tmp_path / "full")
    per_epoch = 4 * shards  # batches of 4 an epoch: dies on the 4th batch of epoch 2 (an odd 3 trained)
    state = run_killed_at_loss_call(compose_cfg(common), tmp_path / "killed", monkeypatch, call=per_epoch + 4)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.pt"
    assert (state["train_state"]["epoch"], state["train_state"]["batch_in_epoch"]) == (1, 3)
    stream = ClipTask(compose_cfg(common), torch.device("cpu")).data.train
    assert stream.skips_in_workers(3, 4, workers) == in_workers
    resumed = run(compose_cfg(common + [f"trainer.resume={ckpt}"]), tmp_path / "resumed")
    end = load_checkpoint(ckpt)
    ref = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    for key, value in ref["model"].items():
        assert torch.equal(end["model"][key], value), key
    # the count survives the kill, nothing twice
    assert resumed["data/skipped"] == full["data/skipped"] == 6 * shards


def test_batches_pin_through_the_loaders_hook_for_asynchronous_gpu_copies(monkeypatch):
    """On CUDA the loader pins (pin_memory=True): a non_blocking copy from pageable memory still
    makes the host wait. Pinning itself needs CUDA, so Tensor.pin_memory is stood in for here."""
    from torch.utils.data._utils.pin_memory import pin_memory
    from fastclip.data.pairs import Batch, Skip, collate_skipping
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(tuple(self.shape)) or self)
    batch = pin_memory(collate_skipping([(torch.zeros(3, 2, 2), torch.zeros(5, dtype=torch.long)), None]))
    assert isinstance(batch, Batch) and batch.skipped == {"bad sample": 1} and pinned == [(1, 3, 2, 2), (1, 5)]
    empty = pin_memory(collate_skipping([None, Skip("empty caption")]))
    assert empty.images is None and empty.skipped == {"bad sample": 1, "empty caption": 1}
