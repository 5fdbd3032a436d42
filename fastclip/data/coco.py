"""COCO 2014 captions: `dataset.root` holding annotations/captions_{train,val}2014.json and the
train2014/ val2014/ image folders.

Without `dataset.split_file`: training pairs come from train2014 (pairs=one_per_image: one
caption per image drawn with split_seed = the seed's 82,783 pairs; pairs=all: ~414K); retrieval
runs on `retrieval_images` val2014 images (5000, drawn with split_seed; the rest give validation) with
their first `captions_per_image` captions. Random images: not comparable to published numbers.

With `dataset.split_file` = Karpathy's dataset_coco.json (the usual retrieval protocol):
training on its "train" + "restval" images (113,287), retrieval on its "test" images (the 5k),
captions from sentences[].raw, images at root/filepath/filename; retrieval_images is ignored.

Validation (per-epoch retrieval, the sweep objective), at most `val_images` images: Karpathy's "val"
split (5000) with a split file; without one, val2014 images outside the test draw, drawn with
split_seed (training keeps every train2014 image either way)."""
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from fastclip.data.pairs import PairDataset, group_captions, retrieval_set, training_records
from fastclip.data.splits import ClipData, require_disjoint
from fastclip.data.textfile import read_json
from fastclip.errors import InputError, InputNotFound
from fastclip.schema.data import Coco

log = logging.getLogger(__name__)
RETRIEVAL_IMAGES_DEFAULT = 5000  # conf/dataset/coco2014.yaml
KARPATHY_SPLITS = ("train", "restval", "val", "test")
UNKNOWN_IMAGE = "COCO caption of an unknown image"


def load_coco(root: Path, split: str) -> tuple[dict[str, list[str]], Counter]:
    """({image path: captions}, captions skipped by reason) of captions_<split>.json, images sorted;
    an image without captions is kept with none (training skips and counts it). A file that is
    not UTF-8 or not COCO's JSON fails naming it."""
    ann = root / "annotations" / f"captions_{split}.json"
    if not ann.is_file():
        raise InputNotFound(f"dataset.root={str(root)!r}: no {ann.relative_to(root)} (COCO captions JSON)")
    images_dir = root / split
    if not images_dir.is_dir():
        raise InputNotFound(f"dataset.root={str(root)!r}: no image folder {split}/")
    data = read_json(ann, str(ann))
    records, skipped = [], Counter()
    try:
        files = {im["id"]: str(images_dir / im["file_name"]) for im in data["images"]}
        for a in sorted(data["annotations"], key=lambda a: a["id"]):
            if a["image_id"] in files:
                records.append((files[a["image_id"]], a.get("caption")))
                continue
            skipped[UNKNOWN_IMAGE] += 1
            log.warning("skipping %s: caption id %s names image_id %s, which is not in its images",
                        ann, a["id"], a["image_id"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{ann}: not a COCO captions file (expected {{'images': [{{'id', 'file_name'}}], "
                         f"'annotations': [{{'id', 'image_id', 'caption'}}]}}; {type(exc).__name__}: {exc})") from None
    groups = group_captions(records)
    for image_file in files.values():  # images without captions still count (and are skipped)
        groups.setdefault(image_file, [])
    return {k: groups[k] for k in sorted(groups)}, skipped


def read_coco(root: Path, split: str) -> dict[str, list[str]]:
    """load_coco's captions alone (callers that do not count skips: the unigram caption corpus)."""
    return load_coco(root, split)[0]


def read_karpathy(split_file: str | Path, root: Path) -> dict[str, dict[str, list[str]]]:
    """Karpathy's dataset_coco.json -> {split: {image path: raw captions}} for the splits train,
    restval, val, test; image paths root/filepath/filename, sorted. Errors name dataset.split_file."""
    path = Path(split_file)
    key = f"dataset.split_file={str(split_file)!r}"
    if not path.is_file():
        raise InputNotFound(f"{key}: no such file (Karpathy's dataset_coco.json)")
    data = read_json(path, key)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{key}: not a Karpathy split file: expected {{'dataset': 'coco', 'images': "
                         f"[{{'filepath', 'filename', 'split', 'sentences': [{{'raw'}}]}}]}}")
    if data.get("dataset", "coco") != "coco":
        raise InputError(f"{key}: the split file of dataset {data['dataset']!r}, not coco")
    records = {split: [] for split in KARPATHY_SPLITS}
    for i, im in enumerate(data["images"]):
        try:
            file, split = str(root / im["filepath"] / im["filename"]), im["split"]
            captions = [s["raw"] for s in im["sentences"]]
        except (KeyError, TypeError) as exc:
            raise InputError(f"{key}: image {i} is not {{filepath, filename, split, sentences: [{{raw}}]}} "
                             f"({type(exc).__name__}: {exc})") from None
        if split not in records:
            raise InputError(f"{key}: image {i} ({im['filename']}) has split {split!r}; expected one of "
                             f"{list(KARPATHY_SPLITS)}")
        records[split] += [(file, c) for c in captions] or [(file, "")]  # no sentences: kept, counted as bad
    if not records["test"]:
        raise InputError(f"{key}: no image has split 'test' (the retrieval images)")
    return {split: dict(sorted(group_captions(r).items())) for split, r in records.items()}


def random_val_images(cfg, val_images: list[str]) -> tuple[list[str], str]:
    """(`retrieval_images` val2014 images drawn with split_seed, or all where there are no more; its description)."""
    n = cfg.retrieval_images
    if n and n < len(val_images):
        pick = np.random.default_rng(cfg.split_seed).choice(len(val_images), n, replace=False)
        return [val_images[i] for i in sorted(pick)], f"coco2014 val2014, {n} random images (split_seed={cfg.split_seed})"
    return val_images, f"coco2014 val2014, all {len(val_images)} images"


def validation_images(cfg, candidates: list[str], test_images: list[str], source: str) -> tuple[list[str], str]:
    """(at most `val_images` of the candidates that are not test images, drawn with split_seed, in
    their order; its description). ValueError naming the keys when none is left."""
    test = set(test_images)
    pool = [im for im in candidates if im not in test]
    if not pool:
        raise InputError(f"dataset=coco2014: no {source} image is left for validation (dataset.retrieval_images="
                         f"{cfg.retrieval_images} takes all {len(candidates)} for the test split): set "
                         f"dataset.retrieval_images below {len(candidates)}, or dataset.split_file (Karpathy's val)")
    n = cfg.val_images
    if n and n < len(pool):
        # a stream of its own: the test draw (random_val_images) used default_rng(split_seed)
        pick = np.random.default_rng([cfg.split_seed, 1]).choice(len(pool), n, replace=False)
        pool = [pool[i] for i in sorted(pick)]
    return pool, f"coco2014 {source}, {len(pool)} images (validation, split_seed={cfg.split_seed})"


def training_captions(cfg) -> list[str]:
    """Every caption training reads (train2014, or the split file's train + restval): the unigram
    text-boundary corpus."""
    root = Path(cfg.root)
    if cfg.split_file:
        splits = read_karpathy(cfg.split_file, root)
        groups = {**splits["train"], **splits["restval"]}
    else:
        groups = read_coco(root, "train2014")
    return [c for caps in groups.values() for c in caps if c]


def build_coco(cfg: Coco, preprocess_train, preprocess_eval, tokenizer) -> ClipData:
    """-> ClipData(train PairDataset, retrieval=test RetrievalSet, val_retrieval=validation), each with
    `skipped` = captions skipped while reading, the retrieval sets with a `description` of their split;
    the three splits' images checked disjoint."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise InputNotFound(f"dataset.root={str(root)!r}: no such directory")
    if cfg.split_file:
        if cfg.retrieval_images != RETRIEVAL_IMAGES_DEFAULT:
            log.warning("dataset.retrieval_images=%s is ignored: with dataset.split_file retrieval runs on the "
                        "split's test images", cfg.retrieval_images)
        splits = read_karpathy(cfg.split_file, root)
        train_groups, train_skipped = {**splits["train"], **splits["restval"]}, Counter()
        test_groups, test_skipped = splits["test"], Counter()
        test_images, description = list(test_groups), f"coco2014 karpathy test split ({len(test_groups)} images)"
        if not splits["val"]:
            raise InputError(f"dataset.split_file={str(cfg.split_file)!r}: no image has split 'val' (the validation "
                             f"images)")
        val_groups = splits["val"]
        val_images, val_description = validation_images(cfg, list(val_groups), [], "karpathy val split")
    else:
        train_groups, train_skipped = load_coco(root, "train2014")
        test_groups, test_skipped = load_coco(root, "val2014")
        test_images, description = random_val_images(cfg, sorted(test_groups))
        val_groups = test_groups
        val_images, val_description = validation_images(cfg, sorted(test_groups), test_images, "val2014")
    require_disjoint(f"dataset=coco2014 root={cfg.root}", train=train_groups, val=val_images, test=test_images)
    train = PairDataset(training_records(train_groups, set(train_groups), cfg.pairs, cfg.split_seed),
                        preprocess_train, tokenizer)
    train.skipped = dict(train_skipped)  # reason -> n, into data/skipped
    retrieval = retrieval_set(test_groups, set(test_images), preprocess_eval, cfg.captions_per_image)
    val = retrieval_set(val_groups, set(val_images), preprocess_eval, cfg.captions_per_image)
    return ClipData(train, retrieval=replace(retrieval, skipped=sum(test_skipped.values()), description=description),
                    val_retrieval=replace(val, description=val_description))
