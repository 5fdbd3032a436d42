"""COCO 2014 captions: `dataset.root` holding annotations/captions_{train,val}2014.json and the
train2014/ val2014/ image folders. Training pairs come from train2014 (pairs=one_per_image:
one caption per image drawn with split_seed = the seed's 82,783 pairs; pairs=all: ~414K);
retrieval runs on `retrieval_images` val2014 images (5000 = COCO 5k, drawn with split_seed;
null = all 40,504) with their first `captions_per_image` captions."""
import json
from pathlib import Path

import numpy as np

from fastclip.data.pairs import PairDataset, group_captions, retrieval_set, training_records


def read_coco(root: Path, split: str) -> dict[str, list[str]]:
    ann = root / "annotations" / f"captions_{split}.json"
    if not ann.is_file():
        raise FileNotFoundError(f"dataset.root={str(root)!r}: no {ann.relative_to(root)} (COCO captions JSON)")
    images_dir = root / split
    if not images_dir.is_dir():
        raise FileNotFoundError(f"dataset.root={str(root)!r}: no image folder {split}/")
    data = json.loads(ann.read_text())
    files = {im["id"]: str(images_dir / im["file_name"]) for im in data["images"]}
    records = [(files[a["image_id"]], a["caption"]) for a in sorted(data["annotations"], key=lambda a: a["id"])]
    groups = group_captions(records)
    for image_file in sorted(files.values()):  # images without captions still count (and are skipped)
        groups.setdefault(image_file, [])
    return {k: groups[k] for k in sorted(groups)}


def build_coco(cfg, preprocess_train, preprocess_eval, tokenizer):
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.root={str(root)!r}: no such directory")
    train_groups = read_coco(root, "train2014")
    train = PairDataset(training_records(train_groups, set(train_groups), cfg.pairs, cfg.split_seed),
                        preprocess_train, tokenizer)
    val_groups = read_coco(root, "val2014")
    val_images = sorted(val_groups)
    if cfg.retrieval_images and cfg.retrieval_images < len(val_images):
        pick = np.random.default_rng(cfg.split_seed).choice(len(val_images), cfg.retrieval_images, replace=False)
        val_images = [val_images[i] for i in sorted(pick)]
    return train, retrieval_set(val_groups, set(val_images), preprocess_eval, cfg.captions_per_image)
