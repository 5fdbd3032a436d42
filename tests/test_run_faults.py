"""Runs that must fail loudly and early, and failures that must not lose the work before them:
no sample to train on, evaluation sets that cannot evaluate, a warm-up longer than the run, a
diverging DTP run; and where a run puts its artifacts."""
import json
import math
from collections import Counter

import mlflow
import pytest
import torch

from conftest import TINY_CLIP, compose_cfg, load_checkpoint, store_runs
from datagen import COLOURS, colour_image, jpeg_bytes, make_coco, write_shard
from fastclip.checks import ConfigError
from fastclip.loop import NoTrainingData, TrainingDiverged
from fastclip.tasks.clip import ClipTask
from fastclip.train import run

FAST = TINY_CLIP + ["eval.boundary_picture=false", "trainer.batch_size=8"]


def test_shards_whose_samples_all_lack_a_caption_fail_the_run(tmp_path, store):
    shard = tmp_path / "s" / "shard-000000.tar"
    write_shard(shard, [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(colour_image("red", i))} for i in range(32)])
    (shard.parent / "sizes.json").write_text(json.dumps({shard.name: 32}))
    cfg = compose_cfg(FAST + [f"tracking.uri={store}", "dataset=webdataset", f"dataset.train_shards={shard}",
                              "eval.imagenet_val=null", f"dataset.eval_shards={_good_shard(tmp_path)}",
                              f"dataset.val_shards={_good_shard(tmp_path, 'val')}"])
    with pytest.raises(NoTrainingData, match=r"epoch 1 trained on no sample.*32 (empty|no) caption.*declares 32"):
        run(cfg, tmp_path / "run")
    (failed,) = store_runs(store)
    assert failed.info.status == "FAILED"


def _good_shard(tmp_path, split: str = "eval"):
    """A held-out shard of 8 images no training shard here holds (split eval: the test split's;
    val: another size, so other images again)."""
    path = tmp_path / split / "shard-000000.tar"
    size = {"eval": 56, "val": 60}[split]
    write_shard(path, [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(colour_image(c, i, size=size)), "txt": f"a {c} square"}
                       for i, c in enumerate(list(COLOURS) * 2)])
    return path


def test_an_evaluation_set_with_no_usable_image_fails_before_training(tmp_path, store):
    from pathlib import Path
    from fastclip.data.coco import random_val_images
    coco = make_coco(tmp_path / "coco")  # 12 val2014 images: 8 for the test split, the other 4 validate
    cfg = compose_cfg(FAST + [f"tracking.uri={store}", "dataset=coco2014", f"dataset.root={coco}",
                              "dataset.retrieval_images=8"])
    test, _ = random_val_images(cfg.dataset, sorted(str(f) for f in (coco / "val2014").iterdir()))
    saved = {f: Path(f).read_bytes() for f in test}
    for f in test:
        Path(f).unlink()
    with pytest.raises(ValueError, match=r"none of its 8 image files exists \(first: .*val2014"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and store_runs(store) == []
    for f in test[:3]:  # 3 of 8 there: it runs, saying the set is not complete
        Path(f).write_bytes(saved[f])
    task = ClipTask(cfg, torch.device("cpu"))
    assert task.tags["fastclip.retrieval_set"].endswith("5 of its 8 images missing: not the complete set")
    for f in test:  # files that exist but do not decode: named too (distinct bytes: copies would be one image)
        Path(f).write_bytes(b"not a jpeg: " + f.encode())
    with pytest.raises(ValueError, match="none of its 8 images could be decoded"):
        ClipTask(cfg, torch.device("cpu"))


def test_a_failing_evaluation_never_loses_the_training_before_it(tmp_path, store, monkeypatch):
    cfg = compose_cfg(FAST + [f"tracking.uri={store}", "epochs=1", "trainer.max_steps=3", "trainer.warmup_steps=1"])

    def broken(self):
        raise OSError("the evaluation disk went away")
    monkeypatch.setattr(ClipTask, "evaluate", broken)
    with pytest.raises(OSError, match="went away") as err:
        run(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["train_state"]["step"] == 3
    assert any("trainer.resume" in note and str(ckpt) in note for note in err.value.__notes__)
    monkeypatch.undo()  # fixed: resuming evaluates the finished training without training again
    metrics = run(compose_cfg(FAST + [f"tracking.uri={store}", f"trainer.resume={ckpt}", "trainer.warmup_steps=1"]), tmp_path / "run")
    assert "zeroshot/top1" in metrics and load_checkpoint(ckpt)["train_state"]["step"] == 3
    (only,) = store_runs(store)
    assert only.info.status == "FINISHED" and "zeroshot/top1" in only.data.metrics


def test_a_warm_up_longer_than_the_run_is_an_error_and_a_fraction_scales_with_it(tmp_path, store):
    with pytest.raises(ConfigError, match="trainer.warmup_steps=20 is longer than trainer.max_steps=5"):
        run(compose_cfg(FAST + [f"tracking.uri={store}", "trainer.max_steps=5", "trainer.warmup_steps=20"]), tmp_path / "a")
    # digits at batch 128: 10 steps an epoch (1,295 training images), so epochs=1 runs 10 steps (known once the data is read)
    digits = [f"tracking.uri={store}", "epochs=1", "eval.boundary_picture=false", *TINY_CLIP[:-1]]
    with pytest.raises(ValueError, match=r"trainer.warmup_steps=20 is longer than the run \(10 optimizer steps\)"):
        run(compose_cfg(digits + ["trainer.warmup_steps=20"]), tmp_path / "b")
    assert store_runs(store) == [] and not (tmp_path / "b" / "checkpoints").exists()
    from fastclip.loop import Trainer
    task = ClipTask(compose_cfg(digits + ["trainer.warmup_steps=0.3"]), torch.device("cpu"))
    assert Trainer(task, task.cfg, torch.device("cpu")).warmup_steps == 3  # round(0.3 x 10)


def test_a_diverging_dtp_run_stops_as_clearly_as_a_vanilla_one(tmp_path, store):
    """trainer.lr=100: the weights go non-finite; whichever sees it first (the loss guard, the DTP
    tower's boundary count, the checkpoint's weight check) stops the run with TrainingDiverged
    naming the step, and any checkpoint left is finite."""
    cfg = compose_cfg(TINY_CLIP + [f"tracking.uri={store}", "boundary=gumbel", "trainer.lr=100", "epochs=3",
                                   "trainer.batch_size=64", "trainer.ckpt_every_steps=2", "eval.boundary_picture=false"])
    with pytest.raises(TrainingDiverged, match=r"at step \d+ \(epoch \d\); stopping"):
        run(cfg, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]  # step 2's, at least
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    (failed,) = store_runs(store)
    assert failed.info.status == "FAILED"


def test_artifacts_go_beside_a_store_elsewhere_and_vanilla_runs_draw_no_boundaries(tmp_path, monkeypatch):
    launch, elsewhere = tmp_path / "launch", tmp_path / "elsewhere"
    launch.mkdir()
    monkeypatch.chdir(launch)
    uri = f"sqlite:///{elsewhere / 'm.db'}"
    metrics = run(compose_cfg(TINY_CLIP + [f"tracking.uri={uri}", "trainer.max_steps=2", "epochs=1"]), tmp_path / "run")
    client = mlflow.MlflowClient(tracking_uri=uri)
    logged = client.get_run(metrics["mlflow_run_id"])
    assert logged.info.artifact_uri == (elsewhere / "artifacts" / "fastclip" / logged.info.run_id / "artifacts").as_uri()
    assert (elsewhere / "artifacts" / "fastclip" / logged.info.run_id / "artifacts" / "config.yaml").is_file()
    assert not (launch / "mlruns").exists()
    assert "boundaries" not in [a.path for a in client.list_artifacts(logged.info.run_id)]
    assert not (tmp_path / "run" / "boundaries").exists()  # boundary=none pools nothing: no picture
    assert not math.isnan(metrics["zeroshot/top1"])


def test_training_samples_that_are_evaluation_images_are_left_out_and_counted(tmp_path, store):
    """eval.overlap=drop: found by path when the data is built and by content (a copy under another
    name) as it is read; counted in data/eval_overlap. eval.overlap=fail stops at the first one."""
    import shutil
    from datagen import make_csv
    from fastclip.data.overlap import EvalOverlapError
    train = make_csv(tmp_path / "train", per_colour=2)  # 8 images, 2 rows each
    held = make_csv(tmp_path / "held", per_colour=2, first=2)  # 8 other images
    shutil.copy(tmp_path / "train" / "images" / "blue_1.jpg", tmp_path / "held" / "images" / "copy_of_blue.jpg")
    with held.open("a") as f:
        f.write(f"{tmp_path / 'train' / 'images' / 'red_0.jpg'},a red square in the eval set\n"
                "copy_of_blue.jpg,a blue square copied into the eval set\n")
    common = FAST + [f"tracking.uri={store}", "dataset=csv", f"dataset.path={train}", f"dataset.eval_path={held}",
                     "trainer.batch_size=6", "epochs=2", "trainer.warmup_steps=1"]
    # 12 rows left, no remainder: green_0's 2 held out for validation (split_seed=0), red_0's 2 below
    metrics = run(compose_cfg(common), tmp_path / "run")
    # red_0's 2 rows left out once when built; blue_1's 2 rows each epoch as they are read
    assert metrics["data/eval_overlap"] == 2 + 2 * 2 and metrics["data/skipped"] == 6
    with pytest.raises(EvalOverlapError, match="red_0.jpg is also in the evaluation set"):
        ClipTask(compose_cfg(common + ["eval.overlap=fail"]), torch.device("cpu"))

    shard = tmp_path / "shards" / "shard-000000.tar"
    samples = [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(colour_image(c, i)), "txt": f"a {c} square"}
               for i, c in enumerate(list(COLOURS) * 4)]
    write_shard(shard, samples)
    (shard.parent / "sizes.json").write_text(json.dumps({shard.name: 16}))
    held_shard = tmp_path / "held_shards" / "shard-000000.tar"
    write_shard(held_shard, [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(colour_image(c, i, size=48)), "txt": f"a {c}"}
                             for i, c in enumerate(COLOURS)] + [dict(samples[5], __key__="9999")])
    shards = FAST + [f"tracking.uri={store}", "dataset=webdataset", f"dataset.train_shards={shard}",
                     f"dataset.eval_shards={held_shard}", f"dataset.val_shards={_good_shard(tmp_path, 'val')}",
                     "trainer.batch_size=4", "epochs=2", "trainer.warmup_steps=1"]
    assert run(compose_cfg(shards), tmp_path / "shard_run")["data/eval_overlap"] == 2  # one sample, two epochs
    task = ClipTask(compose_cfg(shards + ["eval.overlap=fail"]), torch.device("cpu"))
    with pytest.raises(EvalOverlapError, match="shard-000000.tar:0005 is also in the evaluation set"):
        list(task.train_batches(0))


@pytest.mark.parametrize("overrides, message", [
    (["dataset=webdataset", "dataset.train_shards=/data/laion/0.tar"], "brings no evaluation set as configured: set "
                                                                       "dataset.eval_shards"),
    (["dataset=csv"], r"dataset.path is required"),
    (["boundary=whitespace", "boundary.apply_to=[image]"], "boundary=whitespace has no meaning on the image tower"),
    (["task=lm", "encoder=vit_tiny"], "task=lm needs a char LM encoder"),
    (["eval.placement_control=true", "boundary=fixed"], "eval.placement_control=true compares learned image"),
])
def test_config_mistakes_fail_before_torch_data_or_mlflow_load(tmp_path, cli_env, overrides, message):
    """In a fresh interpreter: run() raises ConfigError, and neither torch, open_clip nor mlflow was
    imported (a second, not the ~20 s a run takes to reach its data)."""
    import subprocess
    import sys
    code = ("import sys\nfrom fastclip.config import compose_train_config\nfrom fastclip.train import run\n"
            f"cfg = compose_train_config({overrides!r})\n"
            "try:\n    run(cfg, 'run')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
            "print(sorted(m for m in ('torch', 'open_clip', 'mlflow') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env, capture_output=True, text=True,
                          timeout=120)
    out = done.stdout.splitlines()
    assert out[0].startswith("ConfigError") and __import__("re").search(message, out[0]), done.stdout + done.stderr
    assert out[-1] == "[]"


def test_samples_a_truncated_shard_cannot_deliver_count_as_skipped(tmp_path):
    """webdataset's handler drops what it cannot read; the shortfall against sizes.json is counted
    (data/skipped), not lost without a word."""
    shard = tmp_path / "s" / "shard-000000.tar"
    write_shard(shard, [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(colour_image(c, i)), "txt": f"a {c} square"}
                        for i, c in enumerate(list(COLOURS) * 4)])
    (shard.parent / "sizes.json").write_text(json.dumps({shard.name: 16}))
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])  # a copy cut off halfway
    cfg = compose_cfg(FAST + ["dataset=webdataset", f"dataset.train_shards={shard}", "trainer.batch_size=4",
                              f"dataset.eval_shards={_good_shard(tmp_path)}", f"dataset.val_shards={_good_shard(tmp_path, 'val')}",
                              "dataset.shuffle_buffer=0"])
    task = ClipTask(cfg, torch.device("cpu"))
    outs = [task.loss(batch) for batch in task.train_batches(0)]
    trained, skipped = sum(o.samples for o in outs), sum((Counter(o.skipped) for o in outs), Counter())
    # the cut sample's caption is gone (empty caption); the samples after it count as unreadable
    assert 0 < trained < 16 and skipped["unreadable in its shard"] > 0 and trained + sum(skipped.values()) == 16


def test_non_finite_boundary_logits_in_a_step_end_the_run_naming_tower_and_step(tmp_path, store, monkeypatch):
    """The tower's check (models.dtp.NonFiniteBoundaries, raised before any loss exists) reaches the
    loop as TrainingDiverged naming the tower and the step, with the last good checkpoint kept."""
    cfg = compose_cfg(FAST + [f"tracking.uri={store}", "boundary=gumbel", "boundary.apply_to=[image]", "epochs=3",
                              "trainer.batch_size=256", "trainer.warmup_steps=1"])
    real_loss, calls = ClipTask.loss, {"n": 0}

    def poisoned(self, batch):  # 5 steps an epoch: the 8th forward meets NaN predictor weights
        calls["n"] += 1
        if calls["n"] == 8:
            with torch.no_grad():
                self.model.visual.predictor.mlp[0].weight.fill_(float("nan"))
        return real_loss(self, batch)
    monkeypatch.setattr(ClipTask, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"DTP image tower: the boundary predictor's logits are not finite .* "
                                               r"at step 7 \(epoch 2\); stopping; last good checkpoint kept"):
        run(cfg, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["train_state"]["step"] == 5


def test_a_checkpoint_is_never_written_over_with_non_finite_weights(tmp_path, store, monkeypatch):
    """The last step of epoch 1 leaves a weight NaN after a finite loss: the loss guard cannot see it
    before the epoch's checkpoint, the checkpoint's weight check does."""
    cfg = compose_cfg(FAST + [f"tracking.uri={store}", "epochs=3", "trainer.batch_size=256", "trainer.warmup_steps=1"])
    real_loss, calls = ClipTask.loss, {"n": 0}

    def poisoned(self, batch):  # 5 steps an epoch
        out = real_loss(self, batch)
        calls["n"] += 1
        if calls["n"] == 10:
            with torch.no_grad():
                self.model.logit_scale.fill_(float("nan"))
        return out
    monkeypatch.setattr(ClipTask, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"the weights are not finite after step 10; stopping; last good checkpoint"):
        run(cfg, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["train_state"]["step"] == 5 and torch.isfinite(state["model"]["logit_scale"])


def test_a_shard_caption_that_is_not_utf8_is_skipped_not_garbled(tmp_path, caplog):
    """Shard captions used to be decoded with replacement characters; now the sample is skipped,
    counted and named (shard, key, byte offset)."""
    shard = tmp_path / "s" / "shard-000000.tar"
    samples = [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(colour_image(c, i)), "txt": f"a {c} square"}
               for i, c in enumerate(list(COLOURS) * 2)]
    samples[3]["txt"] = "un caf\xe9 rouge".encode("cp1252")
    write_shard(shard, samples)
    (shard.parent / "sizes.json").write_text(json.dumps({shard.name: 8}))
    cfg = compose_cfg(FAST + ["dataset=webdataset", f"dataset.train_shards={shard}", "trainer.batch_size=8",
                              f"dataset.eval_shards={_good_shard(tmp_path)}", f"dataset.val_shards={_good_shard(tmp_path, 'val')}",
                              "dataset.shuffle_buffer=0", "trainer.num_workers=0"])  # the log line in this process
    task = ClipTask(cfg, torch.device("cpu"))
    (out,) = [task.loss(batch) for batch in task.train_batches(0)]
    assert out.samples == 7 and out.skipped == {"caption not UTF-8": 1}
    assert "shard-000000.tar:0003: caption not UTF-8 (byte 0xe9 at offset 6)" in caplog.text


def test_a_config_mistake_on_the_command_line_creates_no_store(tmp_path, cli_env):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "fastclip.train", "trainer.lr=-1"], cwd=tmp_path, env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "trainer.lr=-1.0: expected > 0" in done.stderr
    assert "Traceback" not in done.stderr  # a config mistake is a message, not a stack trace
    assert not (tmp_path / "outputs" / "mlflow.db").exists()


def test_an_eval_folder_with_a_subset_of_the_classes_is_labelled_by_class_name(tmp_path):
    """Its labels are the training classes' indices of its folders' names (they were its own sorted
    folder index: an eval set of 'white' alone scored against 'grey')."""
    from PIL import Image
    from fastclip.data.image_folder import build_image_folder
    for root, classes in (("train", ("black", "grey", "white")), ("eval", ("white",)), ("odd", ("pink",))):
        for c in classes:
            (tmp_path / root / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), {"black": 0, "grey": 128, "white": 255, "pink": 200}[c]).save(
                    tmp_path / root / c / f"{i}.png")
    cfg = compose_cfg(["dataset=image_folder", f"dataset.path={tmp_path / 'train'}", f"dataset.eval_path={tmp_path / 'eval'}"])
    zeroshot = build_image_folder(cfg.dataset, lambda im: im, lambda im: im,
                                  lambda texts: torch.zeros(len(texts), 4)).zeroshot
    assert zeroshot.classnames == ["black", "grey", "white"] and list(zeroshot.images.labels) == [2, 2, 2]
    cfg.dataset.eval_path = str(tmp_path / "odd")
    with pytest.raises(ValueError, match=r"dataset.eval_path has class folders training \(dataset.path\) has not: \['pink'\]"):
        build_image_folder(cfg.dataset, lambda im: im, lambda im: im, lambda texts: torch.zeros(len(texts), 4))


def test_an_mlflow_server_that_does_not_answer_fails_fast_naming_it(tmp_path):
    import socket
    import time
    from fastclip.store import TrackingStoreError
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(TrackingStoreError, match=rf"tracking.uri='http://127.0.0.1:{port}': the MLflow server does not answer"):
        run(compose_cfg(TINY_CLIP + [f"tracking.uri=http://127.0.0.1:{port}"]), tmp_path / "run")
    assert time.perf_counter() - t0 < 60  # not MLflow's minutes of retries


def test_a_directory_store_is_refused_in_one_line_by_runs_grids_and_readers(tmp_path, cli_env, monkeypatch):
    """MLflow 3 refuses a `file:` or plain-path store unless MLFLOW_ALLOW_FILE_STORE is set, with a stack
    trace from deep in a run's start; in a grid Hydra only warned (its sweep-start callback failed) and
    each job then failed alone. One rule (store.refuse_file_store) for runs, grids and readers."""
    import subprocess
    import sys
    from fastclip.store import TrackingStoreError, refuse_file_store, require_store
    env = {k: v for k, v in cli_env.items() if k != "MLFLOW_ALLOW_FILE_STORE"}
    said = ("is a directory store, which this MLflow keeps only for migration: use "
            f"sqlite:///{tmp_path / 'mlflow.db'} (`mlflow migrate-filestore` moves an existing one there), or set "
            "MLFLOW_ALLOW_FILE_STORE=true")
    for args in (["tracking.uri=./mlruns"], ["-m", "trainer.lr=1e-3,5e-4", f"tracking.uri=file:{tmp_path / 'mlruns'}"]):
        done = subprocess.run([sys.executable, "-m", "fastclip.train", *args, "trainer.max_steps=1"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and done.stderr.strip().splitlines()[-1].endswith(said), done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "mlruns").exists() and not (tmp_path / "outputs" / "mlflow.db").exists()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TrackingStoreError, match="--uri or"):
        require_store(str(tmp_path / "mlruns"))  # make report / ui / infer's runs:/
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "yes")  # not a value MLflow reads: named, not a stack trace
    with pytest.raises(TrackingStoreError, match="MLFLOW_ALLOW_FILE_STORE='yes': expected true or false"):
        refuse_file_store("./mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    refuse_file_store(str(tmp_path / "mlruns"))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", "databricks", "databricks-uc", "uc", "http://host:5000"):
        refuse_file_store(uri)  # stores MLflow routes by scheme or by name
    from fastclip.store import check_writable
    (tmp_path / "notes.db").write_text("not a database")
    with pytest.raises(TrackingStoreError, match=r"notes.db is not an MLflow store SQLite can read \(file is not a"):
        check_writable(f"sqlite:///{tmp_path / 'notes.db'}")  # MLflow: a trace in every job of a grid
    with pytest.raises(TrackingStoreError, match=r"'http://\[::1' is not a URI MLflow can read"):
        check_writable("http://[::1")
