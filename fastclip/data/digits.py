"""The embedded default: scikit-learn's 1,797 real 8x8 handwritten digits as an image-text set.

Training pairs a digit with a caption from `train_templates`; zero-shot evaluation classifies
the held-out digits with `eval_templates`, which training never saw.
"""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Dataset


@dataclass
class ZeroShotSet:
    images: Dataset          # yields (image tensor, class index)
    classnames: list[str]
    templates: list[str]


def _to_pil(digit: np.ndarray) -> Image.Image:
    # sklearn's digits are 0..16 intensities, ink bright on dark.
    return Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8), mode="L").convert("RGB")


def split_indices(labels: np.ndarray, holdout_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic train/held-out split, independent of the run seed."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"dataset.holdout_fraction={holdout_fraction}: expected a value in (0, 1)")
    rng = np.random.default_rng(split_seed)
    train, held = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_held = max(1, round(len(idx) * holdout_fraction))
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


class CaptionedImages(Dataset):
    """(image, tokens) pairs; the caption template is drawn from (seed, epoch, index), so a
    resumed run sees the same captions as an uninterrupted one."""

    def __init__(self, images: list[Image.Image], labels: np.ndarray, caption_tokens: torch.Tensor, transform):
        self.images, self.labels = images, labels
        self.caption_tokens = caption_tokens  # [num_classes, num_templates, context]
        self.transform = transform
        self.seed, self.epoch = 0, 0

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.seed, self.epoch = seed, epoch

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        template = np.random.default_rng((self.seed, self.epoch, i)).integers(self.caption_tokens.shape[1])
        return self.transform(self.images[i]), self.caption_tokens[self.labels[i], template]


class LabelledImages(Dataset):
    def __init__(self, images: list[Image.Image], labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


def build_digits(cfg, preprocess_train, preprocess_eval, tokenizer) -> tuple[Dataset, ZeroShotSet]:
    digits = load_digits()
    images = [_to_pil(d) for d in digits.images]
    labels = digits.target
    train_idx, held_idx = split_indices(labels, cfg.holdout_fraction, cfg.split_seed)
    classnames = list(cfg.classnames)
    if len(classnames) != 10:
        raise ValueError(f"dataset.classnames has {len(classnames)} names; digits has 10 classes")
    captions = [[t.format(c) for t in cfg.train_templates] for c in classnames]
    tokens = torch.stack([tokenizer(row) for row in captions])
    train = CaptionedImages([images[i] for i in train_idx], labels[train_idx], tokens, preprocess_train)
    held = LabelledImages([images[i] for i in held_idx], labels[held_idx], preprocess_eval)
    return train, ZeroShotSet(held, classnames, list(cfg.eval_templates))
