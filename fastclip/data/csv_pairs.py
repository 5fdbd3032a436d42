"""Image-caption pairs from a CSV (Flickr-style `image,caption`, one row per caption): image
paths relative to `dataset.image_root` (default: the CSV's folder, then its images/), several
captions per image allowed. Held out BY IMAGE for retrieval: `eval_fraction` of the images
(seeded), or every image of `eval_path` (another CSV of the same layout)."""
import csv
from pathlib import Path

from fastclip.data.pairs import PairDataset, group_captions, retrieval_set, split_images, training_records


def read_pairs(path: str | Path, image_root: str | Path | None, image_column: str, caption_column: str,
               separator: str) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset.path={str(path)!r}: no such CSV file")
    root = Path(image_root) if image_root else (path.parent / "images" if (path.parent / "images").is_dir() else path.parent)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.image_root={str(root)!r}: no such directory")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        missing = [c for c in (image_column, caption_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {missing} (dataset.image_column / dataset.caption_column); "
                             f"the header has {reader.fieldnames} with dataset.separator={separator!r}")
        rows = [(str(root / row[image_column]), row[caption_column]) for row in reader if row[image_column]]
    if not rows:
        raise ValueError(f"dataset.path={str(path)!r}: no rows")
    return rows


def build_csv(cfg, preprocess_train, preprocess_eval, tokenizer):
    """-> (train PairDataset, RetrievalSet or None)."""
    def read(path):
        return read_pairs(path, cfg.image_root, cfg.image_column, cfg.caption_column, cfg.separator)
    groups = group_captions(read(cfg.path))
    if cfg.eval_path:
        train_images, eval_groups = set(groups), group_captions(read(cfg.eval_path))
        held = set(eval_groups)
    else:
        train_images, held = split_images(list(groups), cfg.eval_fraction, cfg.split_seed)
        eval_groups = groups
    train = PairDataset(training_records(groups, train_images, cfg.pairs, cfg.split_seed), preprocess_train, tokenizer)
    retrieval = retrieval_set(eval_groups, held, preprocess_eval, cfg.captions_per_image) if held else None
    return train, retrieval
