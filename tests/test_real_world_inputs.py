"""Inputs as they come from the wild, each built here: high-bit-depth and odd-mode images, text
that is not UTF-8, captions with an unquoted separator, templates shared between training and
zero-shot, Karpathy's COCO split file, held-out shards. Nothing may be decoded wrong or cut
without a word: it is converted right, or skipped and counted with a warning naming where, or
it fails before training naming the file, the key and the place."""
import io
import json
import logging
import re
import shlex
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CLIP, compose_cfg
from datagen import grey16_png, make_class_folder, make_coco, make_csv, make_karpathy
from fastclip import CONF_DIR
from fastclip.data import make_shards, text8
from fastclip.data.captioned import check_unseen_templates
from fastclip.data.coco import build_coco, load_coco
from fastclip.data.csv_pairs import build_csv
from fastclip.data.digits import build_digits
from fastclip.data.image_folder import build_image_folder, folder_classnames
from fastclip.data.pairs import open_rgb
from fastclip.data.tar_shards import expand_shards
from fastclip.tasks.clip import ClipTask


def same(image):
    return image


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def tokens(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


def build(builder, overrides):
    """builder(cfg.dataset) with stand-in transforms (PIL image out as is) and tokenizer -> ClipData."""
    return builder(compose_cfg(overrides).dataset, same, same, tokens)


# --- 1. images: high bit depth scaled right, undefined ranges skipped, the rest as before ----------

GRADIENT16 = np.array([[0, 128, 129, 385], [5000, 32896, 65407, 65535]], dtype=np.uint16)


def pgm(values: np.ndarray, maxval: int) -> bytes:
    return f"P5\n{values.shape[1]} {values.shape[0]}\n{maxval}\n".encode() + values.astype(">u2").tobytes()


def saved(tmp_path: Path, name: str, image: Image.Image, **kw) -> Path:
    image.save(tmp_path / name, **kw)
    return tmp_path / name


SIXTEEN_BIT_CASES = {  # name -> (file writer, the mode Pillow opens it as)
    "png I;16": (lambda d: saved(d, "g.png", Image.fromarray(GRADIENT16)), "I;16"),
    "tiff I;16": (lambda d: saved(d, "g.tif", Image.fromarray(GRADIENT16)), "I;16"),
    "tiff I;16B": (lambda d: saved(d, "gb.tif", Image.frombytes("I;16B", (4, 2), GRADIENT16.astype(">u2").tobytes())),
                   "I;16B"),
    "pgm 16-bit (I)": (lambda d: (d / "g.pgm").write_bytes(pgm(GRADIENT16, 65535)) and d / "g.pgm", "I"),
}


@pytest.mark.parametrize("case", list(SIXTEEN_BIT_CASES))
def test_sixteen_bit_greyscale_is_scaled_to_eight_bits(tmp_path, case):
    write, mode = SIXTEEN_BIT_CASES[case]
    path = write(tmp_path)
    assert Image.open(path).mode == mode
    expected = np.rint(GRADIENT16 / 257.0)  # 0 0 1 1 / 19 128 255 255: value / 257, rounded
    for source in (path, path.read_bytes()):  # a file (csv, coco, folder) or shard bytes
        image = open_rgb(source, str(path))
        assert image.mode == "RGB"
        np.testing.assert_array_equal(pixels(image)[..., 0], expected)


def test_sixteen_bit_pgm_with_a_smaller_maxval_keeps_its_range(tmp_path):
    (tmp_path / "g.pgm").write_bytes(pgm(np.array([[0, 511, 1023]]), 1023))  # 10-bit data
    np.testing.assert_allclose(pixels(open_rgb(tmp_path / "g.pgm", "g.pgm"))[0, :, 0], [0, 127.4, 255], atol=1)


@pytest.mark.parametrize("mode, array", [("I", np.full((4, 4), 70000, dtype=np.int32)),
                                         ("F", np.full((4, 4), 0.5, dtype=np.float32))])
def test_modes_without_a_defined_range_are_skipped_naming_file_and_mode(tmp_path, caplog, mode, array):
    path = saved(tmp_path, f"{mode}.tif", Image.fromarray(array))
    assert Image.open(path).mode == mode
    with caplog.at_level(logging.WARNING):
        assert open_rgb(path, str(path)) is None
    assert str(path) in caplog.text and f"mode {mode!r}" in caplog.text


KEPT_CASES = {  # what already worked: name -> (image, save options, expected RGB of pixel (0, 0))
    "CMYK jpeg": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), {"format": "JPEG"}, (255, 0, 0)),
    "palette P": (Image.new("P", (8, 8), 1).copy(), {"format": "PNG"}, None),
    # with alpha: over white, as a page shows them (value x a + 255 x (1 - a)), not the alpha dropped
    "LA": (Image.new("LA", (8, 8), (100, 50)), {"format": "PNG"}, (225, 225, 225)),  # 100 x 50/255 + 255 x 205/255
    "1-bit": (Image.new("1", (8, 8), 1), {"format": "PNG"}, (255, 255, 255)),
    "RGBA": (Image.new("RGBA", (8, 8), (10, 20, 30, 40)), {"format": "PNG"}, (217, 218, 220)),
    "8-bit L": (Image.new("L", (8, 8), 77), {"format": "PNG"}, (77, 77, 77)),
}


@pytest.mark.parametrize("case", list(KEPT_CASES))
def test_other_modes_still_convert_to_rgb(case):
    image, options, expected = KEPT_CASES[case]
    if expected is None:  # palette: entry 1 of the palette
        image.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
        expected = (12, 34, 56)
    buf = io.BytesIO()
    image.save(buf, **options)
    out = open_rgb(buf.getvalue(), case)
    assert out.mode == "RGB" and np.abs(np.subtract(out.getpixel((0, 0)), expected)).max() <= 2


def test_truncated_files_and_decompression_bombs_are_still_skipped(monkeypatch):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    assert open_rgb(buf.getvalue()[: len(buf.getvalue()) // 2], "truncated.jpg") is None
    png16 = io.BytesIO()
    Image.fromarray(np.full((64, 64), 5000, dtype=np.uint16)).save(png16, "PNG")
    assert open_rgb(png16.getvalue()[: len(png16.getvalue()) // 2], "truncated16.png") is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # > 2x the limit: DecompressionBombError
    assert open_rgb(png16.getvalue(), "bomb.png") is None


DARK, DARK_8BIT = 5000, 5000 / 257  # a dark 16-bit image: about 19.5 of 255, not 255


def test_a_dark_16bit_png_comes_out_dark_through_a_folder_a_csv_and_shards(tmp_path):
    for cls, value in (("dark", DARK), ("light", 60000)):
        for i in range(5):
            grey16_png(tmp_path / "folder" / cls / f"{i}.png", value)
    data = build(build_image_folder, ["dataset=image_folder", f"dataset.path={tmp_path / 'folder'}"])
    train, zeroshot, val = data.train, data.zeroshot, data.val_zeroshot
    read = [(train[i][0], train.labels[i]) for i in range(len(train))]  # decoded as the loader reads them
    read += [s[i] for s in (zeroshot.images, val.images) for i in range(len(s))]
    for image, label in read:
        assert pixels(image).mean() == pytest.approx(DARK_8BIT if label == 0 else 60000 / 257, abs=0.5)

    csv = tmp_path / "csv" / "captions.csv"
    csv.parent.mkdir()
    csv.write_text("image,caption\n" + "".join(f"{tmp_path}/folder/dark/{i}.png,a dark square\n" for i in range(5)))
    train = build(build_csv, ["dataset=csv", f"dataset.path={csv}", "dataset.eval_fraction=0.2"]).train
    # 5 images: 1 held out for test, 1 for validation
    assert [pixels(train[i][0]).mean() for i in range(len(train))] == pytest.approx([DARK_8BIT] * 3, abs=0.5)

    out = tmp_path / "shards"
    make_shards.main(["--source", "csv", "--path", str(csv), "--out", str(out), "--image-size", "8"])
    with tarfile.open(out / "shard-000000.tar") as tar:
        jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert len(jpgs) == 5 and all(abs(pixels(Image.open(io.BytesIO(j))).mean() - DARK_8BIT) < 1.5 for j in jpgs)


# --- 2. text that is not UTF-8; 3. rows with the wrong number of fields ----------------------------

def csv_bytes(tmp_path: Path, rows: list[bytes], bom: bool = False) -> Path:
    """make_csv's 8 images (red_0.jpg ... yellow_1.jpg), captions.csv replaced by header + `rows`."""
    path = make_csv(tmp_path / "csv", per_colour=2, captions_per_image=1)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"image,caption\n" + b"".join(r + b"\n" for r in rows))
    return path


GOOD_ROWS = [f"{c}_{i}.jpg,a {c} square".encode() for c in ("red", "green", "blue", "yellow") for i in range(2)]


def test_a_csv_row_that_is_not_utf8_is_skipped_counted_and_named(tmp_path, caplog):
    # line 1 the header (after a BOM), lines 2-9 good, line 10 Windows-1252
    path = csv_bytes(tmp_path, GOOD_ROWS + ["red_0.jpg,un caf\xe9 rouge".encode("cp1252")], bom=True)
    with caplog.at_level(logging.WARNING):
        data = build(build_csv, ["dataset=csv", f"dataset.path={path}", "dataset.eval_fraction=0.25"])
    train, retrieval, val = data.train, data.retrieval, data.val_retrieval
    assert f"{path}:10" in caplog.text and "not UTF-8" in caplog.text
    # one CSV split by image: its bad rows count on the training side
    assert train.skipped == {"CSV row not UTF-8": 1} and retrieval.skipped == 0 and val.skipped == 0
    assert len(train.records) + len(retrieval.captions) + len(val.captions) == 8
    assert not any("caf" in c for _, c in train.records)
    assert not any("caf" in c for cs in retrieval.captions + val.captions for c in cs)
    assert retrieval.description == "csv held-out 25% of images (split_seed=0)"

    clean = csv_bytes(tmp_path / "clean", GOOD_ROWS)
    data = build(build_csv, ["dataset=csv", f"dataset.path={clean}", f"dataset.eval_path={path}"])
    train, retrieval = data.train, data.retrieval
    assert train.skipped == {} and retrieval.skipped == 1 and len(retrieval.captions) == 8
    assert retrieval.description == f"csv eval_path={path}"


def test_a_mostly_undecodable_csv_fails_naming_file_and_byte_offset(tmp_path):
    bad = [f"{c}_0.jpg,caf\xe9 {c}".encode("cp1252") for c in ("red", "green", "blue")]
    path = csv_bytes(tmp_path, GOOD_ROWS[:2] + bad)
    offset = path.read_bytes().index(b"\xe9")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: not UTF-8 \(3 of 5 rows\).* byte offset "
                                         rf"{offset}; re-encode it as UTF-8"):
        build(build_csv, ["dataset=csv", f"dataset.path={path}"])


def test_an_unquoted_separator_in_a_caption_is_a_counted_skip_not_a_truncation(tmp_path, caplog):
    rows = GOOD_ROWS + [b"red_0.jpg,a dog, running",          # line 10: 3 fields
                        b"red_1.jpg",                          # line 11: no caption field
                        b'"red_1.jpg","a cat, sitting"']       # line 12: quoted, kept whole
    path = csv_bytes(tmp_path, rows)
    with caplog.at_level(logging.WARNING):
        data = build(build_csv, ["dataset=csv", f"dataset.path={path}", "dataset.eval_fraction=0.25"])
    train = data.train
    assert f"{path}:10" in caplog.text and f"{path}:11" in caplog.text and f"{path}:12" not in caplog.text
    captions = [c for _, c in train.records] + [c for cs in data.retrieval.captions + data.val_retrieval.captions
                                                for c in cs]
    assert "a dog" not in captions and "a cat, sitting" in captions and len(captions) == 9
    assert train.skipped == {"CSV row with wrong field count": 2}
    task = ClipTask(compose_cfg(TINY_CLIP + ["dataset=csv", f"dataset.path={path}", "dataset.eval_fraction=0.25"]),
                    torch.device("cpu"))
    assert task.build_skipped == {"CSV row with wrong field count": 2}  # what data/skipped starts from


def test_mostly_wrong_field_counts_fail_naming_file_separator_and_first_line(tmp_path):
    path = csv_bytes(tmp_path, GOOD_ROWS[:1] + [b"red_1.jpg,a dog, running", b"blue_0.jpg,sky, sea, sun"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: 2 of 3 rows .*dataset.separator=','; "
                                         r"first at line 3: 'red_1.jpg,a dog, running'"):
        build(build_csv, ["dataset=csv", f"dataset.path={path}"])


def test_make_shards_counts_the_rows_the_reader_skipped(tmp_path, capsys):
    path = csv_bytes(tmp_path, GOOD_ROWS + ["red_0.jpg,caf\xe9".encode("cp1252"), b"red_1.jpg,a dog, running"])
    summary = make_shards.main(["--source", "csv", "--path", str(path), "--out", str(tmp_path / "out"),
                                "--image-size", "8"])
    assert summary["written"] == 8
    assert summary["skipped"] == {"CSV row not UTF-8": 1, "CSV row with wrong field count": 1}
    assert "skipped: 1 CSV row not UTF-8, 1 CSV row with wrong field count" in capsys.readouterr().out


def test_text8_that_is_not_utf8_fails_naming_file_and_byte_offset(tmp_path):
    path = tmp_path / "text8"
    path.write_bytes(b"hello caf\xe9 world")
    for clean in (False, True):
        with pytest.raises(ValueError, match=rf"dataset.path='{re.escape(str(path))}': not UTF-8: first bad byte "
                                             r"0xe9 at byte offset 9"):
            text8.load_text(str(path), clean=clean)
    path.write_bytes(b"\xef\xbb\xbfhello world\n")  # a BOM is not text
    assert text8.load_text(str(path))[0] == "hello world"


def test_coco_json_not_utf8_or_malformed_fails_naming_the_file(tmp_path):
    root = make_coco(tmp_path / "coco", train_per_colour=1, val_per_colour=1)
    ann = root / "annotations" / "captions_val2014.json"
    data = json.loads(ann.read_text())
    data["annotations"][2]["caption"] = "un caf\xe9"
    ann.write_bytes(json.dumps(data, ensure_ascii=False).encode("cp1252"))
    offset = ann.read_bytes().index(b"\xe9")
    with pytest.raises(ValueError, match=rf"{re.escape(str(ann))}: not UTF-8: .* byte offset {offset}"):
        build(build_coco, ["dataset=coco2014", f"dataset.root={root}"])
    ann.write_text(json.dumps(data)[:-20])
    with pytest.raises(ValueError, match=rf"{re.escape(str(ann))}: malformed JSON at line 1"):
        load_coco(root, "val2014")
    ann.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(ann))}: not a COCO captions file"):
        load_coco(root, "val2014")


def test_a_coco_caption_of_an_unknown_image_is_counted(tmp_path):
    root = make_coco(tmp_path / "coco", train_per_colour=1, val_per_colour=1)
    ann = root / "annotations" / "captions_train2014.json"
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 10**6, "image_id": 424242, "caption": "an orphan"})
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no val2014 image is left for validation \(dataset.retrieval_images=5000 "
                                         r"takes all 4 for the test split\)"):
        build(build_coco, ["dataset=coco2014", f"dataset.root={root}"])
    data = build(build_coco, ["dataset=coco2014", f"dataset.root={root}", "dataset.retrieval_images=2"])
    train, retrieval = data.train, data.retrieval
    assert train.skipped == {"COCO caption of an unknown image": 1} and retrieval.skipped == 0 and len(train) == 4


def test_a_classnames_file_not_utf8_fails_naming_the_key_and_offset(tmp_path):
    folder = make_class_folder(tmp_path / "folder", per_colour=1)
    names = tmp_path / "names.txt"
    names.write_bytes(b"blue\ngreen\nr\xe9d\nyellow\n")
    cfg = compose_cfg(["dataset=image_folder", f"dataset.path={folder}", f"dataset.classnames={names}"]).dataset
    with pytest.raises(ValueError, match=rf"dataset.classnames='{re.escape(str(names))}': not UTF-8: .* byte offset 12"):
        folder_classnames(cfg)


# --- 4. zero-shot templates disjoint from training templates ----------------------------------------

def test_a_template_in_training_and_zero_shot_fails_naming_both_keys(tmp_path):
    with pytest.raises(ValueError, match=r"dataset.train_templates and dataset.eval_templates share "
                                         r"\['the digit \{\}'\]"):
        build(build_digits, ["dataset.eval_templates=['the digit {}','this is a {}']"])
    folder = make_class_folder(tmp_path / "folder", per_colour=2)
    # as the tokenizer sees it (lower case, whitespace collapsed) it is a training template
    with pytest.raises(ValueError, match=r"share \['A photo of  a \{\}'\]"):
        build(build_image_folder, ["dataset=image_folder", f"dataset.path={folder}",
                                   "dataset.eval_templates=['A photo of  a {}','a close-up of the {}']"])


def test_the_shipped_template_sets_are_disjoint():
    checked = []
    for yaml in sorted((CONF_DIR / "dataset").glob("*.yaml")):
        ds = compose_cfg([f"dataset={yaml.stem}"]).dataset  # required keys (???) are never read
        if "train_templates" in ds:
            check_unseen_templates(ds.train_templates, ds.eval_templates)
            checked.append(yaml.stem)
    assert checked == ["digits", "image_folder"]


# --- 5. COCO: Karpathy's split file ----------------------------------------------------------------

def test_coco_with_karpathys_split_trains_on_train_restval_and_retrieves_on_test(tmp_path, caplog):
    root = make_coco(tmp_path / "coco", train_per_colour=2, val_per_colour=3)  # 8 train2014, 12 val2014 images
    split_file = make_karpathy(root, tmp_path / "dataset_coco.json")
    entries = json.loads(split_file.read_text())["images"]
    by_split = {s: {str(root / e["filepath"] / e["filename"]) for e in entries if e["split"] == s}
                for s in ("train", "restval", "val", "test")}
    assert [len(by_split[s]) for s in ("train", "restval", "val", "test")] == [8, 4, 4, 4]  # make_karpathy's split
    with caplog.at_level(logging.WARNING):
        data = build(build_coco, ["dataset=coco2014", f"dataset.root={root}", f"dataset.split_file={split_file}"])
    train, retrieval = data.train, data.retrieval
    assert "retrieval_images" not in caplog.text  # left at its default: nothing to warn about
    assert {im for im, _ in train.records} == by_split["train"] | by_split["restval"] and len(train) == 12
    assert set(map(str, retrieval.images.files)) == by_split["test"]
    assert all(len(cs) == 5 and all(c.endswith("(karpathy)") for c in cs) for cs in retrieval.captions)
    assert all(c.endswith("(karpathy)") for _, c in train.records)
    assert retrieval.description == "coco2014 karpathy test split (4 images)"
    assert set(map(str, data.val_retrieval.images.files)) == by_split["val"]  # validation: Karpathy's val, parsed and used
    assert all(c.endswith("(karpathy)") for cs in data.val_retrieval.captions for c in cs)
    with caplog.at_level(logging.WARNING):
        build(build_coco, ["dataset=coco2014", f"dataset.root={root}", f"dataset.split_file={split_file}",
                           "dataset.retrieval_images=8"])
    assert "dataset.retrieval_images=8 is ignored" in caplog.text

    data = build(build_coco, ["dataset=coco2014", f"dataset.root={root}", "dataset.retrieval_images=8"])
    train, retrieval = data.train, data.retrieval
    assert len(train) == 8 and len(retrieval.captions) == 8  # unchanged without split_file
    # validation: the 4 val2014 images outside the test draw
    val2014 = by_split["restval"] | by_split["val"] | by_split["test"]
    assert set(map(str, data.val_retrieval.images.files)) == val2014 - set(map(str, retrieval.images.files))
    assert retrieval.description == "coco2014 val2014, 8 random images (split_seed=0)"


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ('{"images": {}}', "not a Karpathy split file"),
    ('[1, 2]', "not a Karpathy split file"),
    ('{"dataset": "flickr30k", "images": []}', "the split file of dataset 'flickr30k'"),
    ('{"images": [{"filename": "a.jpg", "split": "test"}]}', r"image 0 is not \{filepath"),
    ('{"images": [{"filepath": "v", "filename": "a.jpg", "split": "dev", "sentences": []}]}', "split 'dev'"),
    ('{"images": [{"filepath": "v", "filename": "a.jpg", "split": "train", "sentences": []}]}', "no image has split 'test'"),
    ('{"images": [', "malformed JSON"),
])
def test_a_bad_split_file_fails_naming_dataset_split_file(tmp_path, content, message):
    root = make_coco(tmp_path / "coco", train_per_colour=1, val_per_colour=1)
    split_file = tmp_path / "dataset_coco.json"
    if content is not None:
        split_file.write_text(content)
    with pytest.raises((FileNotFoundError, ValueError), match=rf"dataset.split_file='{re.escape(str(split_file))}'"
                                                              rf": .*{message}"):
        build(build_coco, ["dataset=coco2014", f"dataset.root={root}", f"dataset.split_file={split_file}"])


# --- 6. make_shards --eval-fraction: held-out shards and overrides to paste ------------------------

def shard_sources(pattern: str) -> list[str]:
    sources = []
    for url in expand_shards(pattern):
        with tarfile.open(url) as tar:
            sources += [json.loads(tar.extractfile(m).read())["source"] for m in tar.getmembers()
                        if m.name.endswith(".json")]
    return sources


def test_make_shards_holds_out_images_and_prints_overrides_that_paste(tmp_path, capsys):
    csv = make_csv(tmp_path / "csv", per_colour=4, captions_per_image=2)  # 16 images, 32 rows
    out = tmp_path / "it's my shards"  # a space and a quote: the overrides must still survive the paste
    summary = make_shards.main(["--source", "csv", "--path", str(csv), "--out", str(out), "--shard-size", "5",
                                "--image-size", "8", "--eval-fraction", "0.25", "--split-seed", "3"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("overrides: ")
    pasted = line.removeprefix("overrides: ")
    overrides = shlex.split(pasted)
    bash = subprocess.run(["bash", "-c", f"printf '%s\\0' {pasted}"], capture_output=True, text=True, check=True)
    assert bash.stdout.split("\0")[:-1] == overrides  # what bash passes on is what shlex read
    assert [o.split("=", 1)[0] for o in overrides] == ["dataset.train_shards", "dataset.eval_shards"]
    cfg = compose_cfg(["dataset=webdataset", *overrides])
    train_urls = expand_shards(cfg.dataset.train_shards)
    eval_urls = expand_shards(cfg.dataset.eval_shards, "dataset.eval_shards")
    assert all(Path(u).parent == out.resolve() for u in train_urls) and len(train_urls) == summary["shards"] == 5
    assert all(Path(u).parent == out.resolve() / "eval" for u in eval_urls) and len(eval_urls) == 2
    assert (out / "sizes.json").is_file() and (out / "eval" / "sizes.json").is_file()
    train_sources, eval_sources = shard_sources(cfg.dataset.train_shards), shard_sources(cfg.dataset.eval_shards)
    assert len(train_sources) == 24 and len(eval_sources) == 8  # 12 + 4 images, 2 captions each
    assert not set(train_sources) & set(eval_sources) and len(set(eval_sources)) == 4
    assert sorted(json.loads((out / "eval" / "sizes.json").read_text()).values()) == [3, 5]

    again = make_shards.main(["--source", "csv", "--path", str(csv), "--out", str(tmp_path / "b"), "--image-size", "8",
                              "--eval-fraction", "0.25", "--split-seed", "3"])
    assert set(shard_sources(str(tmp_path / "b" / "eval" / "shard-000000.tar"))) == set(eval_sources)  # deterministic
    assert again["eval"]["written"] == 8
