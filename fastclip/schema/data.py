"""Schemas of the dataset group's options (fastclip.data reads them)."""
from dataclasses import dataclass
from typing import Any, List, Optional

from fastclip.schema.errors import ConfigError
from fastclip.schema.fields import at_least, frozen, runtime


def _fraction(key: str, value: float, low_open: bool = True) -> None:
    if not (0 < value < 1 if low_open else 0 <= value < 1):
        raise ConfigError(f"{key}={value}: expected a value in {'(0, 1)' if low_open else '[0, 1)'}"
                          + (" (the share of the training side held out for validation)" if key.endswith("val_fraction")
                             else ""))


@dataclass
class Dataset:
    name: str = frozen()
    cache_dir: Optional[str] = runtime()


@dataclass
class Captioned(Dataset):
    """Class-labelled images captioned from templates (zero-shot top-1 on the held-out classes' prompts)."""
    holdout_fraction: float = frozen()
    val_fraction: float = frozen()
    split_seed: int = frozen()
    classnames: Any = frozen()  # the class names, or (image_folder) a file of them, one per line; null: the folders
    train_templates: List[str] = frozen()
    eval_templates: List[str] = frozen()

    def __post_init__(self):
        _fraction("dataset.holdout_fraction", self.holdout_fraction)
        _fraction("dataset.val_fraction", self.val_fraction)


@dataclass
class Digits(Captioned):
    pass


@dataclass
class ImageFolder(Captioned):
    path: str = frozen()
    eval_path: Optional[str] = frozen()


@dataclass
class Csv(Dataset):
    path: str = frozen()
    image_root: Optional[str] = frozen()
    image_column: str = frozen()
    caption_column: str = frozen()
    separator: str = frozen()
    pairs: str = frozen()
    eval_path: Optional[str] = frozen()
    eval_fraction: float = frozen()
    val_fraction: float = frozen()
    val_max_images: Optional[int] = frozen()
    split_seed: int = frozen()
    captions_per_image: Optional[int] = frozen()

    def __post_init__(self):
        _fraction("dataset.val_fraction", self.val_fraction)
        at_least("dataset.val_max_images", self.val_max_images, 1, ">= 1, or null for no cap")
        at_least("dataset.captions_per_image", self.captions_per_image, 1, ">= 1, or null for all")


@dataclass
class Coco(Dataset):
    root: str = frozen()
    split_file: Optional[str] = frozen()
    pairs: str = frozen()
    split_seed: int = frozen()
    retrieval_images: Optional[int] = frozen()  # null: ignored with split_file (older runs wrote it so)
    val_images: Optional[int] = frozen()
    captions_per_image: Optional[int] = frozen()

    def __post_init__(self):
        at_least("dataset.val_images", self.val_images, 1, ">= 1, or null for no cap")
        at_least("dataset.retrieval_images", self.retrieval_images, 1)
        if self.retrieval_images is None and not self.split_file:  # all val2014 would leave none for validation
            raise ConfigError("dataset.retrieval_images=null takes every val2014 image for retrieval and leaves none "
                              "for validation: give a count (5000), or dataset.split_file (Karpathy's splits)")
        at_least("dataset.captions_per_image", self.captions_per_image, 1, ">= 1, or null for all")


@dataclass
class WebDataset(Dataset):
    train_shards: Any = frozen()  # a brace pattern, a list of them, or weighted sources [{shards, weight, num_samples}]
    num_samples: Optional[int] = frozen()
    resampled: bool = frozen()
    caption_key: str = frozen()
    shuffle_buffer: int = frozen()
    eval_shards: Any = frozen()
    eval_max_images: Optional[int] = frozen()
    val_shards: Any = frozen()
    val_max_images: Optional[int] = frozen()

    def __post_init__(self):
        at_least("dataset.val_max_images", self.val_max_images, 1, ">= 1, or null for no cap")


@dataclass
class Text8(Dataset):
    path: Optional[str] = frozen()
    clean: bool = frozen()
    split: List[float] = frozen()

    def __post_init__(self):
        fractions = list(self.split)
        if len(fractions) != 3 or any(f <= 0 for f in fractions):
            raise ConfigError(f"dataset.split={fractions}: expected three fractions > 0 (train, valid, test): valid "
                              f"serves per-epoch evaluation and a sweep's objective (val/bpc), test the final "
                              f"lm/test_bpc")
