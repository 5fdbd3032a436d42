"""Model selection reads a validation split, never the test split: every source holds one out,
disjoint from training and test (checked when it is built); per-epoch evaluation logs it under
val/, the test numbers keep their names and are measured once, at the end; the entrypoint returns
(and a sweep optimises) the validation metric, and the run's last console line names it."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CLIP, build, compose_cfg, record_calls
from datagen import COLOURS, colour_image, jpeg_bytes, make_class_folder, make_coco, make_csv, make_karpathy, write_shard
from fastclip.checks import ConfigError, check_config
from fastclip.data import make_shards, text8
from fastclip.data.coco import build_coco
from fastclip.data.csv_pairs import build_csv
from fastclip.data.digits import build_digits
from fastclip.data.image_folder import build_image_folder
from fastclip.data.pairs import split_images
from fastclip.data.shards import build_shards
from fastclip.data.splits import require_disjoint


def files(held) -> set[str]:
    return set(map(str, held.images.files))


def test_digits_validation_is_carved_from_training_and_leaves_the_test_split_as_it_was():
    data = build(build_digits, [])
    content = {split: {image.tobytes() for image in images} for split, images in (
        ("train", data.train.images), ("val", data.val_zeroshot.images.images), ("test", data.zeroshot.images.images))}
    assert sum(map(len, content.values())) == 1797  # every digit once (the 1,797 are distinct images)
    assert not (content["train"] & content["val"] or content["train"] & content["test"]
                or content["val"] & content["test"])
    assert len(content["test"]) == 359 and len(content["val"]) == 143  # 20% per class, then 10% of the rest
    wider = build(build_digits, ["dataset.val_fraction=0.3"])
    assert {im.tobytes() for im in wider.zeroshot.images.images} == content["test"]  # test does not move
    assert len(wider.val_zeroshot.images) > 3 * 143 - 10 and data.val_zeroshot.templates == list(
        compose_cfg([]).dataset.eval_templates)


def test_class_folder_csv_coco_and_shards_hold_out_validation_disjoint_from_training_and_test(tmp_path):
    folder = build(build_image_folder, ["dataset=image_folder", f"dataset.path={make_class_folder(tmp_path / 'f')}"])
    train = set(map(str, folder.train.files))
    assert train and files(folder.val_zeroshot) and files(folder.zeroshot)
    assert not (train & files(folder.val_zeroshot) or train & files(folder.zeroshot)
                or files(folder.val_zeroshot) & files(folder.zeroshot))

    csv = build(build_csv, ["dataset=csv", f"dataset.path={make_csv(tmp_path / 'c', per_colour=5)}",
                            "dataset.eval_fraction=0.2", "dataset.val_fraction=0.25"])
    train = {im for im, _ in csv.train.records}
    val, test = files(csv.val_retrieval), files(csv.retrieval)
    assert (len(train), len(val), len(test)) == (12, 4, 4)  # 20 images: 4 test, a quarter of the other 16 validation
    assert not (train & val or train & test or val & test)
    capped = build(build_csv, ["dataset=csv", f"dataset.path={make_csv(tmp_path / 'c', per_colour=5)}",
                               "dataset.eval_fraction=0.2", "dataset.val_fraction=0.25", "dataset.val_max_images=2"])
    assert len(capped.val_retrieval.captions) == 2 and files(capped.retrieval) == test

    root = make_coco(tmp_path / "coco", train_per_colour=2, val_per_colour=3)
    coco = build(build_coco, ["dataset=coco2014", f"dataset.root={root}", "dataset.retrieval_images=8"])
    train = {im for im, _ in coco.train.records}
    assert len(files(coco.val_retrieval)) == 4 and len(files(coco.retrieval)) == 8
    assert not (train & files(coco.val_retrieval) or files(coco.val_retrieval) & files(coco.retrieval))
    karpathy = build(build_coco, ["dataset=coco2014", f"dataset.root={root}",
                                  f"dataset.split_file={make_karpathy(root, tmp_path / 'k.json')}", "dataset.val_images=3"])
    entries = json.loads((tmp_path / "k.json").read_text())["images"]
    val_split = {str(root / e["filepath"] / e["filename"]) for e in entries if e["split"] == "val"}
    assert files(karpathy.val_retrieval) < val_split and len(files(karpathy.val_retrieval)) == 3  # capped
    assert not files(karpathy.val_retrieval) & ({im for im, _ in karpathy.train.records} | files(karpathy.retrieval))


def shard(path, shade: int, n: int = 8):
    write_shard(path, [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(colour_image(c, i, size=32 + 4 * shade)),
                        "txt": f"a {c} square"} for i, c in enumerate((list(COLOURS) * n)[:n])])
    sizes = path.parent / "sizes.json"
    known = json.loads(sizes.read_text()) if sizes.is_file() else {}
    sizes.write_text(json.dumps({**known, path.name: n}))
    return path


def test_shards_hold_out_the_last_training_shard_unless_val_shards_is_given(tmp_path):
    for i in range(3):
        shard(tmp_path / "train" / f"s-{i}.tar", shade=i)
    pattern = f"'{tmp_path}/train/s-{{0..2}}.tar'"
    data = build(build_shards, ["dataset=webdataset", f"dataset.train_shards={pattern}"])
    assert data.train.sources[0].urls == [str(tmp_path / "train" / f"s-{i}.tar") for i in range(2)]
    assert len(data.train) == 16 and len(data.val_retrieval.captions) == 8 and data.retrieval is None
    assert "the last training shard" in data.val_retrieval.description and "s-2.tar" in data.val_retrieval.description
    given = build(build_shards, ["dataset=webdataset", f"dataset.train_shards={pattern}",
                                 f"dataset.val_shards={shard(tmp_path / 'val' / 's-0.tar', shade=5)}"])
    assert len(given.train) == 24 and len(given.val_retrieval.captions) == 8
    with pytest.raises(ValueError, match=r"dataset.val_shards is null and dataset.train_shards=.* has one shard"):
        build(build_shards, ["dataset=webdataset", f"dataset.train_shards={tmp_path}/train/s-0.tar"])
    with pytest.raises(ValueError, match=r"s-1.tar' is in both the train and the val split"):
        build(build_shards, ["dataset=webdataset", f"dataset.train_shards={pattern}",
                             f"dataset.val_shards={tmp_path}/train/s-1.tar"])


def test_make_shards_writes_validation_shards_and_their_override(tmp_path, capsys):
    csv = make_csv(tmp_path / "csv", per_colour=5, captions_per_image=2)  # 20 images, 40 rows
    summary = make_shards.main(["--source", "csv", "--path", str(csv), "--out", str(tmp_path / "out"), "--image-size",
                                "8", "--eval-fraction", "0.2", "--val-fraction", "0.25"])
    assert (summary["written"], summary["eval"]["written"], summary["val"]["written"]) == (24, 8, 8)
    assert [o.split("=", 1)[0].strip('"') for o in summary["overrides"]] == [
        "dataset.train_shards", "dataset.eval_shards", "dataset.val_shards"]
    sources = {}
    for part in ("", "eval", "val"):
        for path in (tmp_path / "out" / part).glob("*.tar"):
            import tarfile
            with tarfile.open(path) as tar:
                sources.setdefault(part, set()).update(json.loads(tar.extractfile(m).read())["source"]
                                                       for m in tar.getmembers() if m.name.endswith(".json"))
    assert [len(sources[p]) for p in ("", "eval", "val")] == [12, 4, 4]  # by image: both captions on one side
    assert not (sources[""] & sources["val"] or sources[""] & sources["eval"] or sources["val"] & sources["eval"])


def test_text8s_valid_split_lies_between_train_and_test_and_must_not_be_empty():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, valid, test = text8.split(text, (0.9, 0.05, 0.05))
    assert train + valid + test == text and (len(train), len(valid), len(test)) == (900, 50, 50)
    with pytest.raises(ValueError, match=r"dataset.split=\[0.999, 0.0005, 0.0005\]: the valid and test split"):
        text8.split(text, (0.999, 0.0005, 0.0005))
    with pytest.raises(ConfigError, match=r"dataset.split=\[0.95, 0.0, 0.05\]: expected three fractions > 0"):
        check_config(compose_cfg(["task=lm", "dataset.split=[0.95,0.0,0.05]"]))


@pytest.mark.parametrize("overrides, message", [
    (["dataset.val_fraction=0"], r"dataset.val_fraction=0.0: expected a value in \(0, 1\)"),
    (["dataset=csv", "dataset.path=x.csv", "dataset.val_fraction=1.0"], r"dataset.val_fraction=1.0: expected"),
    (["dataset=csv", "dataset.path=x.csv", "dataset.val_max_images=0"], r"dataset.val_max_images=0: expected >= 1"),
    (["dataset=coco2014", "dataset.root=/c", "dataset.val_images=0"], r"dataset.val_images=0: expected >= 1"),
])
def test_a_validation_split_that_would_be_empty_fails_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_cfg(overrides))


def test_require_disjoint_names_both_splits_and_a_shared_item():
    require_disjoint("x", train=[1, 2], val=[3], test=[4])
    with pytest.raises(ValueError, match=r"x: 3 is in both the val and the test split"):
        require_disjoint("x", train=[1, 2], val=[3], test=[4, 3])


def test_a_validation_image_that_a_separate_test_csv_names_is_left_out_of_validation(tmp_path):
    """eval_path (the test split) naming a file of dataset.path: left out of training (as before) and out
    of validation (eval.overlap=drop), or the run fails (fail): no configuration is chosen on a test image."""
    from fastclip.data.overlap import EvalOverlapError
    from fastclip.tasks.clip import ClipTask
    train = make_csv(tmp_path / "train", per_colour=2)
    images = list(dict.fromkeys(line.split(",")[0] for line in train.read_text().splitlines()[1:]))
    _, val = split_images(images, 0.5, 0, "dataset.val_fraction")
    shared = str(tmp_path / "train" / "images" / sorted(val)[0])
    held = make_csv(tmp_path / "held", per_colour=2, first=2)
    with held.open("a") as f:
        f.write(f"{shared},a square the training side holds too\n")
    common = TINY_CLIP + ["dataset=csv", f"dataset.path={train}", f"dataset.eval_path={held}", "dataset.val_fraction=0.5",
                          "eval.boundary_picture=false"]
    task = ClipTask(compose_cfg(common), torch.device("cpu"))
    assert len(task.data.val_retrieval.captions) == len(val) - 1 and shared not in files(task.data.val_retrieval)
    assert shared in files(task.data.retrieval)
    with pytest.raises(EvalOverlapError, match="is also in the evaluation set .* from the validation data"):
        ClipTask(compose_cfg(common + ["eval.overlap=fail"]), torch.device("cpu"))


def test_per_epoch_evaluation_reads_validation_and_the_final_one_reads_test(monkeypatch):
    from fastclip.tasks import clip
    task = clip.ClipTask(compose_cfg(TINY_CLIP + ["eval.boundary_picture=false"]), torch.device("cpu"))
    calls = record_calls(monkeypatch, clip, "zero_shot_eval")
    per_epoch = task.evaluate()
    assert {"val/zeroshot_top1", "val/zeroshot_top5"} <= set(per_epoch)
    assert not [k for k in per_epoch if not k.startswith(("val/", "efficiency/", "boundary/"))]
    assert calls[-1][0][2] is task.data.val_zeroshot.images
    final = task.final_evaluate()
    assert calls[-1][0][2] is task.data.zeroshot.images
    assert {k for k in final if not k.startswith("efficiency/")} == {"zeroshot/top1", "zeroshot/top5", "zeroshot/classes"}
    assert final["zeroshot/classes"] == len(task.data.zeroshot.classnames)  # the report's chance line: K / classes
    assert len(calls) == 2


def test_the_final_efficiency_numbers_are_measured_on_test_images(monkeypatch):
    """efficiency/* printed and reported beside test accuracy come from the test split's eval batch;
    the per-epoch ones from the validation split's."""
    from fastclip.tasks import clip
    task = clip.ClipTask(compose_cfg(TINY_CLIP + ["eval.boundary_picture=false", "boundary=fixed"]),
                         torch.device("cpu"))
    measured = record_calls(monkeypatch, task.compression, "efficiency")
    task.evaluate()
    final = task.final_evaluate()
    assert len(measured) == 2
    (_, val_images, _), _, _ = measured[0]
    (_, test_images, test_tokens), _, test_numbers = measured[1]
    expected_images, expected_tokens = task.eval_batch(split="test")
    assert torch.equal(test_images, expected_images) and torch.equal(test_tokens, expected_tokens)
    assert torch.equal(val_images, task.eval_batch(split="val")[0]) and not torch.equal(val_images, test_images)
    for key in ("efficiency/image_gflops", "efficiency/text_gflops", "efficiency/compression_image",
                "efficiency/compression_text"):
        assert final[key] == test_numbers[key]


def test_retrieval_sources_log_validation_under_val_and_test_under_retrieval(tmp_path):
    from fastclip.tasks.clip import ClipTask
    task = ClipTask(compose_cfg(TINY_CLIP + ["dataset=csv", f"dataset.path={make_csv(tmp_path / 'c')}",
                                             "dataset.eval_fraction=0.25", "eval.boundary_picture=false"]),
                    torch.device("cpu"))  # 24 images: 6 test, 2 validation
    per_epoch, final = task.evaluate(), task.final_evaluate()
    assert {f"val/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} <= set(per_epoch)
    assert per_epoch["val/images"] == len(task.data.val_retrieval.captions)
    assert not any(k.startswith("retrieval/") for k in per_epoch)
    assert final["retrieval/images"] == len(task.data.retrieval.captions) != per_epoch["val/images"]


def test_the_objective_is_the_validation_metric_and_the_last_console_line_says_so(tmp_path, store, caplog):
    import logging
    from fastclip.train import objective, objective_line, run
    with caplog.at_level(logging.INFO, logger="fastclip"):
        metrics = run(compose_cfg(TINY_CLIP + [f"tracking.uri={store}", "trainer.max_steps=2",
                                               "eval.boundary_picture=false"]), tmp_path / "run")
    assert objective(metrics) == ("val/zeroshot_top1", metrics["val/zeroshot_top1"])
    assert metrics["val/zeroshot_top1"] != metrics["zeroshot/top1"]  # two splits, two numbers
    last = [r.getMessage() for r in caplog.records if r.name == "fastclip"][-1]
    assert last == objective_line(metrics) and last.startswith(
        f"objective val/zeroshot_top1 = {metrics['val/zeroshot_top1']:.4f} (validation split")
    assert objective({"val/i2t_r1": 0.2, "retrieval/i2t_r1": 0.3, "zeroshot/imagenet_top1": 0.1}) == ("val/i2t_r1", 0.2)
    assert objective({"val/bpc": 2.1, "lm/test_bpc": 2.0}) == ("val/bpc", 2.1)
    assert objective({"zeroshot/top1": 0.5, "lm/test_bpc": 2.0}) is None  # a test number is never the objective
    assert "the trained model's, before compression=quant" in objective_line(metrics, "quant")


def test_a_separate_eval_path_sharing_files_with_the_training_folder_is_left_to_eval_overlap(tmp_path):
    """eval.overlap drops training images that are also evaluation images (or fails, as asked) once the
    task is built: the builder must not refuse an eval_path whose files are the training folder's."""
    make_class_folder(tmp_path / "folder", per_colour=6)
    for cls in (tmp_path / "folder").iterdir():
        (tmp_path / "eval" / cls.name).mkdir(parents=True)
        first = sorted(cls.iterdir())[0]
        (tmp_path / "eval" / cls.name / first.name).symlink_to(first)
    data = build(build_image_folder, ["dataset=image_folder", f"dataset.path={tmp_path / 'folder'}",
                                      f"dataset.eval_path={tmp_path / 'eval'}"])
    shared = {str(p.resolve()) for p in (tmp_path / "eval").rglob("*.png")}
    assert {str(Path(f).resolve()) for f in data.train.files} & shared  # eval.overlap's to drop


def test_the_validation_carve_leaves_every_class_a_training_image():
    from fastclip.data.captioned import carve_validation
    labels = np.arange(5)  # a class of 2 images: 1 held out for test, 1 left on the training side
    fit, val = carve_validation(np.arange(5), labels, 0.1, 0)
    assert sorted(labels[fit]) == [0, 1, 2, 3, 4] and len(val) == 0  # it took that one: training had none
    labels = np.repeat(np.arange(3), 20)
    fit, val = carve_validation(np.arange(60), labels, 0.1, 0)
    assert len(val) == 6 and sorted(set(labels[val])) == [0, 1, 2]  # round(20 x 0.1) each, as before


def test_the_eval_batch_that_efficiency_is_counted_on_spans_a_class_sorted_split(tmp_path):
    """An image folder's splits are sorted by class: the eval batch once took the first n images, one
    class's, so a learned tower's logged compression and GFLOPs described that class. It is spread
    evenly over the split now: every class is in it."""
    from fastclip.models.clip import decode_tokens
    from fastclip.tasks.clip import ClipTask
    folder = make_class_folder(tmp_path / "f", per_colour=16)
    task = ClipTask(compose_cfg([*TINY_CLIP, "dataset=image_folder", f"dataset.path={folder}",
                                 "dataset.val_fraction=0.4", "eval.boundary_picture=false"]), torch.device("cpu"))
    for split in ("val", "test"):
        z, _ = task.data.split(split)
        labels = [int(z.images[i][1]) for i in range(len(z.images))]
        assert labels == sorted(labels) and len(z.images) >= 8  # class-sorted: the first 4 are one class
        _, tokens = task.eval_batch(n=4, split=split)
        named = {c for row in tokens for c in COLOURS if c in decode_tokens(task.tokenizer, row)}
        assert named == set(COLOURS), (split, named)
