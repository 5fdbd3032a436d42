"""Image-text datasets built from labelled images: class captions drawn from templates for
training, (image, label) pairs for zero-shot evaluation, and a deterministic stratified split."""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


@dataclass
class ZeroShotSet:
    images: Dataset          # yields (image tensor, class index)
    classnames: list[str]
    templates: list[str]


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


def caption_table(classnames, templates, tokenizer) -> torch.Tensor:
    """[num_classes, num_templates, context] tokens of every (class, template) caption."""
    return torch.stack([tokenizer([t.format(c) for t in templates]) for c in classnames])
