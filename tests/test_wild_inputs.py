"""Inputs as phones, notebooks, archives and img2dataset leave them, each built here: a portrait
photo stored sideways with an EXIF orientation, hidden and OS folders in a class folder, one image
twice in an evaluation set, shards whose captions are only in their .json. Each is read as a
person looking at the files would read it, through every source and entry point that opens it."""
import io
import re
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import PILToTensor

import fastclip
from conftest import TINY_CLIP, build, compose_cfg, same, tokens
from datagen import (COLOURS, colour_image, jpeg_bytes, make_class_folder, make_coco, make_csv, sideways_photo,
                     write_shard)
from fastclip.data import make_shards
from fastclip.data.captioned import CaptionedImages, LabelledImages
from fastclip.data.coco import build_coco
from fastclip.data.csv_pairs import build_csv
from fastclip.data.image_folder import build_image_folder
from fastclip.data.pairs import ImageFiles, PairDataset, open_rgb
from fastclip.data.shards import ShardSource, ShardStream, build_shards, shard_retrieval_set
from fastclip.infer import main as infer_main
from fastclip.infer import read_images
from fastclip.train import run


def every_image(data) -> dict[str, Image.Image]:
    """file (or shard sample) -> the image as the source hands it to its transform, over the
    training set and every evaluation set (validation and test)."""
    out = {}
    sets = [data.train] + [held.images for split in ("val", "test") for held in data.split(split) if held is not None]
    for ds in sets:
        if isinstance(ds, PairDataset):
            out.update({ds.records[i][0]: ds[i][0] for i in range(len(ds))})
        elif isinstance(ds, CaptionedImages):  # image_folder's decode as they are read
            out.update({str(f): ds[i][0] for i, f in enumerate(ds.files)})
        elif isinstance(ds, LabelledImages):
            out.update({str(f): im for f, im in zip(ds.files, ds.images)})
        elif isinstance(ds, ImageFiles):
            out.update({str(ds.names[i] if ds.names else ds.files[i]): ds[i][0] for i in range(len(ds))})
    return out


def assert_upright(image: Image.Image, what: str = "") -> None:
    """The image of sideways_photo as a viewer shows it: 40 wide, 80 tall, red on top, blue below."""
    assert image.size == (40, 80), f"{what}: {image.size}"
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert np.abs(rgb[:30].mean((0, 1)) - COLOURS["red"]).max() < 12, what
    assert np.abs(rgb[-30:].mean((0, 1)) - COLOURS["blue"]).max() < 12, what


# --- 1. EXIF orientation: read as a viewer shows it, everywhere -----------------------------------

def test_open_rgb_turns_a_sideways_phone_photo_upright(tmp_path):
    path = tmp_path / "portrait.jpg"
    sideways_photo(path)
    assert Image.open(path).size == (80, 40)  # as stored
    assert_upright(open_rgb(path, "file"), "a path")
    assert_upright(open_rgb(path.read_bytes(), "bytes"), "encoded bytes")


def hidden_green_logo(mode: str) -> bytes:
    """A red square on a transparent background whose hidden pixels are stored green (RGBA, or a
    palette image with a transparent index), as a PNG."""
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 1] = 255                     # green, fully transparent
    rgba[4:12, 4:12] = (255, 0, 0, 255)    # the visible logo
    im = Image.fromarray(rgba, "RGBA")
    buf = io.BytesIO()
    if mode == "P":
        palette = Image.new("P", (16, 16))
        palette.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)
        palette.putdata([1 if (4 <= x < 12 and 4 <= y < 12) else 0 for y in range(16) for x in range(16)])
        palette.save(buf, "PNG", transparency=0)
    else:
        im.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_transparent_pixels_are_read_over_white_as_a_viewer_shows_them(mode):
    """Modelled on open_clip#801: convert("RGB") drops the alpha and trains on the hidden colour."""
    pixels = np.asarray(open_rgb(hidden_green_logo(mode), "logo.png"))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[8, 8].tolist() == [255, 0, 0]


def test_every_source_reads_a_sideways_photo_upright(tmp_path):
    root = make_class_folder(tmp_path / "folder", per_colour=3)
    sideways_photo(root / "red" / "portrait.jpg")
    folder = every_image(build(build_image_folder, ["dataset=image_folder", f"dataset.path={root}"]))
    assert_upright(folder[str(root / "red" / "portrait.jpg")], "image_folder")

    csv = make_csv(tmp_path / "csv", per_colour=2, captions_per_image=1)
    sideways_photo(csv.parent / "images" / "portrait.jpg")
    csv.write_text(csv.read_text() + "portrait.jpg,a portrait\n")
    pairs = every_image(build(build_csv, ["dataset=csv", f"dataset.path={csv}", "dataset.eval_fraction=0.2"]))
    assert_upright(pairs[str(csv.parent / "images" / "portrait.jpg")], "csv")

    coco = make_coco(tmp_path / "coco", train_per_colour=2, val_per_colour=2)
    photos = sorted((coco / "train2014").glob("*.jpg"))[:1] + sorted((coco / "val2014").glob("*.jpg"))
    for photo in photos:
        sideways_photo(photo)
    images = every_image(build(build_coco, ["dataset=coco2014", f"dataset.root={coco}",
                                            "dataset.retrieval_images=2", "dataset.val_images=2"]))
    read = [photo for photo in photos if str(photo) in images]
    assert len(read) == 5  # a training image, the 2 test and the 2 validation images
    for photo in read:
        assert_upright(images[str(photo)], f"coco {photo.name}")


def test_shards_make_shards_and_infer_read_a_sideways_photo_upright(tmp_path):
    photo = tmp_path / "portrait.jpg"
    sideways_photo(photo)
    sample = {"__key__": "000000000", "jpg": photo.read_bytes(), "txt": "a portrait"}
    write_shard(tmp_path / "shards" / "shard-000000.tar", [sample])
    stream = ShardStream([ShardSource(str(tmp_path / "shards" / "shard-000000.tar"), 1.0, 1)], same, tokens, 0,
                         False, 1)
    assert_upright(stream.decode({**sample, "__url__": "shard-000000.tar"})[0], "training shard")
    held = shard_retrieval_set(str(tmp_path / "shards" / "shard-000000.tar"), same, None)
    assert_upright(held.images[0][0], "evaluation shard")

    jpeg, why = make_shards.encode(str(photo), 0, 95)  # --image-size 0 keeps the size
    assert why is None
    assert_upright(Image.open(io.BytesIO(jpeg)), "make_shards")

    assert read_images([str(photo)], PILToTensor())[0].shape == (1, 3, 80, 40)  # fastclip.infer's --image


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    home = tmp_path_factory.mktemp("wild")
    run(compose_cfg(TINY_CLIP + ["eval.boundary_picture=false", "trainer.batch_size=8", "trainer.max_steps=2",
                                 "trainer.warmup_steps=1", f"tracking.uri=sqlite:///{home / 'mlflow.db'}"]),
        home / "run")
    return home / "run" / "checkpoints" / "last.pt"


def test_fastclip_load_and_infer_see_a_sideways_photo_as_a_viewer_does(checkpoint, tmp_path, capsys):
    photo = tmp_path / "portrait.jpg"
    sideways_photo(photo)
    turned = tmp_path / "turned.png"  # the stored pixels turned by hand, saved losslessly
    Image.open(photo).convert("RGB").transpose(Image.Transpose.ROTATE_270).save(turned)
    _, preprocess, _ = fastclip.load(checkpoint)
    expected = preprocess(Image.open(turned))
    assert torch.equal(preprocess(Image.open(photo)), expected)  # PIL.Image.open, as the docs show
    assert torch.equal(read_images([str(photo)], preprocess)[0][0], expected)
    infer_main(["--checkpoint", str(checkpoint), "--image", str(photo), "--image", str(turned),
                "--text", "a red square", "--text", "a blue square"])
    probs = [line for line in capsys.readouterr().out.splitlines() if re.match(r"^  [01]\.\d{4}  a ", line)]
    assert len(probs) == 4 and probs[:2] == probs[2:]  # the photo's probabilities are the upright copy's
    # a transparent logo through load's preprocess: over white, as open_rgb reads it (not its hidden green)
    logo = Image.open(io.BytesIO(hidden_green_logo("RGBA")))
    assert torch.equal(preprocess(logo), preprocess(open_rgb(hidden_green_logo("RGBA"), "logo")))


# --- 2. hidden and OS folders are not classes; hidden files are not images --------------------------

APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00" + bytes(74)  # macOS's ._<name> resource-fork file


def litter(root):
    """What a notebook, a Mac and its zip leave in a class folder tree: a checkpoint folder with a
    copy of an image, __MACOSX/ with AppleDouble files, ._ files and .DS_Store beside the images."""
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes((root / "red" / "0.png").read_bytes())
    (root / "__MACOSX" / "red").mkdir(parents=True)
    (root / "__MACOSX" / "red" / "._0.png").write_bytes(APPLEDOUBLE)
    for cls in ("red", "blue"):
        (root / cls / "._0.png").write_bytes(APPLEDOUBLE)
        (root / cls / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")


def test_hidden_and_os_folders_are_not_classes_and_hidden_files_not_images(tmp_path, caplog):
    from fastclip.data.image_folder import folder_classnames
    from fastclip.eval.imagenet import imagenet_files
    root = make_class_folder(tmp_path / "folder", per_colour=3)
    litter(root)
    cfg = compose_cfg(["dataset=image_folder", f"dataset.path={root}"]).dataset
    with caplog.at_level(logging.WARNING):
        data = build_image_folder(cfg, same, same, tokens)
    assert data.zeroshot.classnames == data.val_zeroshot.classnames == sorted(COLOURS) == folder_classnames(cfg)
    files = [str(f) for f in data.train.files + data.zeroshot.images.files + data.val_zeroshot.images.files]
    assert len(files) == 12 and not any("/." in f or "__MACOSX" in f for f in files)
    assert data.train.skipped == {}  # no AppleDouble file read as an undecodable image
    assert ".ipynb_checkpoints __MACOSX" in caplog.text and "4 files in the class folders" in caplog.text

    records, _ = make_shards.records_of(type("Args", (), {"source": "folder", "path": str(root),
                                                          "template": "a photo of a {}."})())
    assert len(records) == 12 and {meta["class"] for _, _, meta in records} == set(COLOURS)
    files, labels = imagenet_files(root, classnames=sorted(COLOURS))  # eval.imagenet_val: 4 classes, not 6
    assert len(files) == 12


def test_a_class_folder_without_an_image_fails_naming_it(tmp_path, caplog):
    root = make_class_folder(tmp_path / "folder", per_colour=3)
    (root / "purple").mkdir()
    (root / "purple" / ".DS_Store").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"dataset.path=.*class folder\(s\) \['purple'\] hold no image"):
        build(build_image_folder, ["dataset=image_folder", f"dataset.path={root}"])
    with pytest.raises(ValueError, match=r"--path=.*\['purple'\] hold no image"):
        make_shards.main(["--source", "folder", "--path", str(root), "--out", str(tmp_path / "shards")])

    (root / "purple").rename(tmp_path / "purple")
    held = make_class_folder(tmp_path / "held", per_colour=2)
    (held / "green").rename(tmp_path / "green_held")
    (held / "green").mkdir()  # an evaluation folder may hold a subset of the classes: a warning
    with caplog.at_level(logging.WARNING):
        data = build(build_image_folder, ["dataset=image_folder", f"dataset.path={root}", f"dataset.eval_path={held}"])
    assert "dataset.eval_path" in caplog.text and "['green'] hold no image" in caplog.text
    assert len(data.zeroshot.images) == 6 and data.zeroshot.classnames == sorted(COLOURS)


# --- 3. one image twice in an evaluation set is one held-out image --------------------------------

def test_csv_retrieval_merges_an_image_listed_under_two_paths_or_copied(tmp_path, caplog):
    from fastclip.data.overlap import merge_eval_duplicates
    csv = make_csv(tmp_path / "train", per_colour=3, captions_per_image=1)
    held = make_csv(tmp_path / "held", per_colour=2, captions_per_image=1, first=10)
    images = held.parent / "images"
    (images / "copy.jpg").write_bytes((images / "green_10.jpg").read_bytes())
    (images / "link.jpg").symlink_to(images / "red_10.jpg")
    held.write_text(held.read_text() + "../images/red_10.jpg,red again\ncopy.jpg,a copied green square\n"
                    "link.jpg,a red square number 0\n")
    data = build(build_csv, ["dataset=csv", f"dataset.path={csv}", f"dataset.eval_path={held}"])
    assert len(data.retrieval.captions) == 8 + 3
    with caplog.at_level(logging.WARNING):
        assert merge_eval_duplicates(data) == 3
    assert "test retrieval set: 3 duplicate images merged" in caplog.text
    files = [str(f) for f in data.retrieval.images.files]
    assert len(files) == 8 and len({str((images / f).resolve()) for f in files}) == 8
    caption = dict(zip(files, data.retrieval.captions))
    assert caption[str(images / "red_10.jpg")] == ["a red square number 0", "red again"]  # each text once
    assert caption[str(images / "green_10.jpg")] == ["a green square number 0", "a copied green square"]
    assert data.retrieval.description.endswith("3 duplicate images merged")


def test_coco_test_and_validation_sets_merge_byte_identical_copies(tmp_path):
    from datagen import make_karpathy
    from fastclip.data.overlap import merge_eval_duplicates
    coco = make_coco(tmp_path / "coco", train_per_colour=1, val_per_colour=3)
    split_file = make_karpathy(coco, tmp_path / "dataset_coco.json")
    val2014 = coco / "val2014"
    for i in (1, 2):  # red_i onto green_i: i=1 is in Karpathy's val split, i=2 in its test split
        (val2014 / f"COCO_val2014_{1000 + i:012d}.jpg").write_bytes((val2014 / f"COCO_val2014_{i:012d}.jpg").read_bytes())
    data = build(build_coco, ["dataset=coco2014", f"dataset.root={coco}", f"dataset.split_file={split_file}"])
    assert len(data.retrieval.captions) == len(data.val_retrieval.captions) == 4
    assert merge_eval_duplicates(data) == 2
    for held in (data.retrieval, data.val_retrieval):
        assert len(held.captions) == len(held.images) == 3
        assert sorted(len(c) for c in held.captions) == [5, 5, 10]  # the red and the green image's captions


def test_shard_and_folder_evaluation_sets_merge_duplicates(tmp_path, caplog):
    from fastclip.data.captioned import ZeroShotSet
    from fastclip.data.overlap import merge_eval_duplicates
    red, blue = jpeg_bytes(colour_image("red", 0)), jpeg_bytes(colour_image("blue", 0))
    write_shard(tmp_path / "eval" / "e-0.tar", [{"__key__": "a", "jpg": red, "txt": "a red square"},
                                                 {"__key__": "b", "jpg": blue, "txt": "a blue square"},
                                                 {"__key__": "c", "jpg": red, "txt": "red, once more"}])
    write_shard(tmp_path / "train" / "t-0.tar", [{"__key__": f"{i}", "jpg": blue, "txt": "blue"} for i in range(2)])
    write_shard(tmp_path / "train" / "t-1.tar", [{"__key__": "v", "jpg": red, "txt": "red"},
                                                  {"__key__": "w", "jpg": red, "txt": "red as well"}])
    data = build(build_shards, ["dataset=webdataset", f"dataset.train_shards='{tmp_path}/train/t-{{0..1}}.tar'",
                                f"dataset.eval_shards={tmp_path}/eval/e-0.tar", "dataset.num_samples=2"])
    assert merge_eval_duplicates(data) == 2  # the test shard's red twice, the held-out last shard's red twice
    assert data.retrieval.captions == [["a red square", "red, once more"], ["a blue square"]]
    assert data.val_retrieval.captions == [["red", "red as well"]]

    root = make_class_folder(tmp_path / "folder", per_colour=3)
    held = make_class_folder(tmp_path / "held", per_colour=2)
    (held / "red" / "again.png").write_bytes((held / "red" / "0.png").read_bytes())
    (held / "blue" / "red.png").write_bytes((held / "red" / "0.png").read_bytes())  # under another class too
    data = build(build_image_folder, ["dataset=image_folder", f"dataset.path={root}", f"dataset.eval_path={held}"])
    val = data.val_zeroshot.images  # validation: the same picture twice, one of them a renamed copy
    data.val_zeroshot = ZeroShotSet(val.subset([0, 0, 1]), data.val_zeroshot.classnames, data.val_zeroshot.templates)
    with caplog.at_level(logging.WARNING):
        assert merge_eval_duplicates(data) == 2 + 1
    assert len(data.zeroshot.images) == 8 and len(data.val_zeroshot.images) == 2
    kept = {str(held / c / f"{i}.png") for c in COLOURS for i in range(2)} - {str(held / "red" / "0.png")}
    assert set(map(str, data.zeroshot.images.files)) == kept | {str(held / "blue" / "red.png")}  # the first listed
    assert f"{held / 'blue' / 'red.png'} is also {held / 'red' / '0.png'}, {held / 'red' / 'again.png'}, under " \
           f"another class (blue, red, red)" in caplog.text
    assert "test zero-shot set: 2 duplicate images merged" in caplog.text
    assert "val zero-shot set: 1 duplicate images merged" in caplog.text


def test_a_run_logs_how_many_evaluation_images_were_duplicates(tmp_path):
    from fastclip.loop import TrainState, data_metrics
    from fastclip.tasks.clip import ClipTask
    csv = make_csv(tmp_path / "train", per_colour=3, captions_per_image=1)
    held = make_csv(tmp_path / "held", per_colour=2, captions_per_image=1, first=10)
    held.write_text(held.read_text() + "../images/red_10.jpg,one more red square\n")
    task = ClipTask(compose_cfg(TINY_CLIP + ["dataset=csv", f"dataset.path={csv}", f"dataset.eval_path={held}",
                                             f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]), torch.device("cpu"))
    assert task.sizes()["retrieval images"] == 8
    assert data_metrics(task, TrainState())["data/eval_duplicates"] == 1


# --- 4. captions only in a shard's .json (img2dataset's caption field) -----------------------------

def img2dataset_shard(path, n: int = 8, first: int = 0, size: int = 40, **fields) -> None:
    """A shard as img2dataset writes it with its text only in the metadata: key.jpg + key.json
    {"caption": ..., "url": ..., "key": ...} (no .txt). `fields` replace the json's caption field."""
    colours = list(COLOURS)
    write_shard(path, [{"__key__": f"{first + i:09d}", "jpg": jpeg_bytes(colour_image(colours[i % 4], first + i, size)),
                        "json": json.dumps({"url": f"http://example.com/{first + i}.jpg", "key": f"{first + i:09d}",
                                            **(fields or {"caption": f"a {colours[i % 4]} square"})})}
                       for i in range(n)])
    (path.parent / "sizes.json").write_text(json.dumps({path.name: n}))


def test_shard_captions_are_read_from_the_json_where_there_is_no_txt(tmp_path):
    from fastclip.tasks.clip import training_captions
    train, held, val = (tmp_path / d / "shard-000000.tar" for d in ("train", "eval", "val"))
    img2dataset_shard(train)
    img2dataset_shard(held, first=100, size=56)
    img2dataset_shard(val, first=200, size=60)
    stream = ShardStream([ShardSource(str(train), 1.0, 8)], same, tokens, 0, False, 8)
    decoded = [stream.decode(s) for s in _samples(train)]
    assert [getattr(d, "reason", None) for d in decoded] == [None] * 8  # no Skip: every sample trains
    overrides = ["dataset=webdataset", f"dataset.train_shards={train}", f"dataset.eval_shards={held}",
                 f"dataset.val_shards={val}", "dataset.shuffle_buffer=0"]
    data = build(build_shards, overrides)
    assert sorted(data.retrieval.captions) == sorted([[f"a {c} square"] for c in COLOURS] * 2)
    assert len(data.val_retrieval.captions) == 8
    assert training_captions(compose_cfg(overrides).dataset) == [f"a {c} square" for c in COLOURS] * 2  # unigram

    for shard, first, size in ((train, 0, 40), (held, 100, 56), (val, 200, 60)):  # dataset.caption_key names another
        img2dataset_shard(shard, first=first, size=size, text="a red square")
    data = build(build_shards, overrides + ["dataset.caption_key=text"])
    assert all(not hasattr(data.train.decode(s), "reason") for s in _samples(train))
    assert data.retrieval.captions == [["a red square"]] * 8


def _samples(shard):
    from webdataset import tariterators
    return list(tariterators.tarfile_samples([{"url": str(shard)}]))


def test_a_shard_sample_without_a_caption_is_skipped_naming_the_true_reason(tmp_path, caplog):
    shard = tmp_path / "train" / "shard-000000.tar"
    img2dataset_shard(shard, n=4, text="the caption under another name")
    stream = ShardStream([ShardSource(str(shard), 1.0, 4)], same, tokens, 0, False, 4)
    with caplog.at_level(logging.WARNING):
        skips = [stream.decode(s).reason for s in _samples(shard)]
    assert skips == ["no caption: no .txt and no 'caption' in .json"] * 4
    assert "dataset.caption_key=caption; the sample has ['jpg', 'json']" in caplog.text
    write_shard(shard, [{"__key__": "a", "jpg": jpeg_bytes(colour_image("red", 0))},
                        {"__key__": "b", "jpg": jpeg_bytes(colour_image("red", 1)), "json": b"{not json"},
                        {"__key__": "c", "jpg": jpeg_bytes(colour_image("red", 2)), "json": json.dumps({"caption": 3})},
                        {"__key__": "d", "jpg": jpeg_bytes(colour_image("red", 3)), "json": "{}", "txt": " "}])
    assert [stream.decode(s).reason for s in _samples(shard)] == [
        "no caption: no .txt and no .json", "no caption: no .txt and a .json that does not parse",
        "no caption: no .txt and a int as 'caption' in .json", "empty caption"]
    val = tmp_path / "val" / "shard-000000.tar"
    val.parent.mkdir()
    val.write_bytes(shard.read_bytes())
    with pytest.raises(ValueError, match=r"dataset.val_shards=.*: no usable sample \(1 empty caption, 1 no caption: "
                                         r"no .txt and a .json that does not parse, .*\)"):
        build(build_shards, ["dataset=webdataset", f"dataset.train_shards={shard}", f"dataset.val_shards={val}"])
    with pytest.raises(ValueError, match="dataset.caption_key=''"):
        build(build_shards, ["dataset=webdataset", f"dataset.train_shards={shard}", f"dataset.val_shards={val}",
                             "dataset.caption_key=''"])


def test_a_shard_cut_short_without_a_sizes_file_is_named_and_counted(tmp_path, caplog):
    """Modelled on wenet#981 (a tar cut short by an interrupted copy): cut at a member boundary, tar
    reads it as complete and 6 of 16 samples were lost without a word; cut inside a member, the
    warning named no loss and the skip count stayed 0."""
    from fastclip.data.tar_shards import shard_samples, cut_short
    whole = tmp_path / "whole.tar"
    write_shard(whole, [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(colour_image("red", i)), "txt": "a red square"}
                        for i in range(16)])
    assert not cut_short(str(whole))
    with tarfile.open(whole) as tar:
        boundary = tar.getmembers()[20].offset  # the 11th sample's first member: 10 samples left whole
    data = whole.read_bytes()
    for name, cut, whole_samples in (("at_boundary.tar", boundary, 10), ("mid_member.tar", boundary + 700, 10)):
        (tmp_path / name).write_bytes(data[:cut])
        with caplog.at_level(logging.WARNING):
            samples = list(shard_samples(str(tmp_path / name), {}))
        assert cut_short(str(tmp_path / name))
        assert sum("__lost__" not in s for s in samples) == whole_samples
        assert sum("__lost__" in s for s in samples) == 1  # the loss is seen and counted (exactly: with sizes.json)
        assert f"{name}: the shard ends without tar's end-of-archive blocks: it was cut short" in caplog.text


def test_member_names_with_a_dot_in_the_key_are_named_not_merged_silently(tmp_path, caplog):
    """Modelled on webdataset#237: img.0000.jpg / img.0000.txt make webdataset's key 'img' for every
    member, so a shard of 16 samples became one sample with 32 files, and the run said only that it
    trained on no sample."""
    shard = tmp_path / "train" / "shard-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i in range(16):
            for ext, payload in (("jpg", jpeg_bytes(colour_image("red", i))), ("txt", b"a red square")):
                info = tarfile.TarInfo(f"img.{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    stream = ShardStream([ShardSource(str(shard), 1.0, 16)], same, tokens, 0, False, 16)
    with caplog.at_level(logging.WARNING):
        skips = [stream.decode(s).reason for s in stream._samples(stream.sources[0], 0)]
    assert skips == ["member names with a dot in the key"] * 16
    assert "member names with a dot in their key (img.0000.jpg, ...)" in caplog.text and "img_0000.jpg" in caplog.text
    # a sample's own extra fields with a dot (key.mask.png beside key.jpg) are not a merge; nor is a .tar.gz's end
    write_shard(shard, [{"__key__": f"{i:04d}", "jpg": jpeg_bytes(colour_image("red", i)), "txt": "a red square",
                         "mask.png": jpeg_bytes(colour_image("blue", i))} for i in range(4)])
    assert all(not hasattr(stream.decode(s), "reason") for s in stream._samples(stream.sources[0], 0))
    from fastclip.data.tar_shards import cut_short
    import gzip
    (tmp_path / "shard.tar.gz").write_bytes(gzip.compress(shard.read_bytes()))
    assert not cut_short(str(tmp_path / "shard.tar.gz"))
