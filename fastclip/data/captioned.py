"""Image-text datasets built from labelled images: class captions drawn from templates for
training, (image, label) pairs for zero-shot evaluation, and a deterministic stratified split."""
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fastclip.data.pairs import Skip, open_rgb
from fastclip.errors import InputError
from fastclip.runtime import seeded
from fastclip.data.shared_state import SharedInt


@dataclass
class ZeroShotSet:
    images: Dataset          # yields (image tensor, class index)
    classnames: list[str]
    templates: list[str]

    def subset(self, keep: list[int]) -> "ZeroShotSet":
        """The same set with only the images at positions `keep` (images: a LabelledImages)."""
        return replace(self, images=self.images.subset(keep))


def split_indices(labels: np.ndarray, holdout_fraction: float, split_seed: int,
                  key: str = "dataset.holdout_fraction", keep_one: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic train/held-out split, independent of the run seed: round(n x
    holdout_fraction) of each class's n images (at least one) held out; keep_one: at most n - 1,
    so that every class keeps a training image (a class of one image then holds none out). key:
    the config key the fraction came from, named in the ValueError a fraction outside (0, 1) raises."""
    if not 0.0 < holdout_fraction < 1.0:
        raise InputError(f"{key}={holdout_fraction}: expected a value in (0, 1)")
    rng = np.random.default_rng(split_seed)
    train, held = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_held = max(1, round(len(idx) * holdout_fraction))
        if keep_one:
            n_held = min(n_held, len(idx) - 1)
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def carve_validation(train_idx: np.ndarray, labels: np.ndarray, val_fraction: float,
                     split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices: `val_fraction` of the training side's images per class
    (split_indices on train_idx alone), so the held-out test split is the one it would be without
    a validation split; every class keeps at least one training image (a class with one image on
    the training side has no validation image)."""
    fit, val = split_indices(labels[train_idx], val_fraction, split_seed, "dataset.val_fraction", keep_one=True)
    return train_idx[fit], train_idx[val]


class CaptionedImages(Dataset):
    """(image, tokens) pairs; the caption template and the image's random crop are drawn from
    (seed, epoch, index), so a resumed run sees the same captions and crops as an uninterrupted one.
    images: decoded images, or image files decoded as they are read (in the loader's workers; a file
    that does not decode yields Skip("undecodable image"), counted in data/skipped)."""

    seed, epoch = SharedInt(), SharedInt()  # set_epoch's: what persistent loader workers read

    def __init__(self, images: list[Image.Image | Path], labels: np.ndarray, caption_tokens: torch.Tensor, transform,
                 files: list | None = None):
        self.images, self.labels = images, labels
        self.caption_tokens = caption_tokens  # [num_classes, num_templates, context]
        self.transform = transform
        self.files = files  # where each image came from (None: generated, as digits)
        self.seed, self.epoch = 0, 0

    def exclude_eval(self, overlap) -> int:
        """Leaves out the images that are evaluation images too (data.overlap) -> how many."""
        if not self.files:
            return 0
        keep = []
        for i, f in enumerate(self.files):
            if overlap.has_path(f) or overlap.has_bytes(Path(f).read_bytes()):
                overlap.found(str(f))  # fails (eval.overlap=fail), or warns and it is left out
            else:
                keep.append(i)
        dropped = len(self.images) - len(keep)
        self.images, self.labels = [self.images[i] for i in keep], self.labels[keep]
        self.files = [self.files[i] for i in keep]
        return dropped

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.seed, self.epoch = seed, epoch

    @property
    def whole_batches(self) -> bool:
        """Whether every sample is made (none skipped): the images are held decoded, none is read from
        a file. Data-parallel, the ranks' batches are then always whole and as many on every rank, so
        they need no per-batch agreement on their sizes (distributed.Lockstep)."""
        return all(isinstance(image, Image.Image) for image in self.images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        template = np.random.default_rng((self.seed, self.epoch, i)).integers(self.caption_tokens.shape[1])
        image = self.images[i]
        if not isinstance(image, Image.Image):
            image = open_rgb(image, str(image))
            if image is None:
                return Skip("undecodable image")
        with seeded(self.seed, self.epoch, i):  # the crop too: a function of (seed, epoch, index)
            image = self.transform(image)
        return image, self.caption_tokens[self.labels[i], template]


class LabelledImages(Dataset):
    def __init__(self, images: list[Image.Image], labels: np.ndarray, transform, files: list | None = None):
        self.images, self.labels, self.transform = images, labels, transform
        self.files = files  # where each image came from (None: generated)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])

    def subset(self, keep: list[int]) -> "LabelledImages":
        return LabelledImages([self.images[i] for i in keep], self.labels[keep], self.transform,
                              [self.files[i] for i in keep] if self.files else None)


def check_unseen_templates(train_templates, eval_templates) -> None:
    """Zero-shot evaluation must use templates training never saw: ValueError naming both keys and
    the shared templates. Compared as the tokenizer sees them (lower case, whitespace collapsed)."""
    def norm(t: str) -> str:
        return " ".join(str(t).lower().split())
    seen = {norm(t) for t in train_templates}
    shared = [t for t in eval_templates if norm(t) in seen]
    if shared:
        raise InputError(f"dataset.train_templates and dataset.eval_templates share {shared}: zero-shot evaluation "
                         f"must use templates training never saw")


def caption_table(classnames, templates, tokenizer) -> torch.Tensor:
    """[num_classes, num_templates, context] tokens of every (class, template) caption."""
    return torch.stack([tokenizer([t.format(c) for t in templates]) for c in classnames])
