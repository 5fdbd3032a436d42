"""What every image-text source shares: decoding that skips bad samples instead of failing,
a collate that counts the skips (they travel with the batch, out of loader workers, into the
`data/skipped` metric), and the held-out retrieval set (several captions per image).

A bad sample (undecodable image, empty caption, missing file) becomes None in the worker;
the collate drops it. A batch can therefore be smaller than trainer.batch_size.
"""
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)


def open_rgb(source: str | Path | bytes, what: str) -> Image.Image | None:
    """A decoded RGB image, or None (logged with `what` and the reason) when it cannot be read."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.convert("RGB")  # forces the full decode: truncated files fail here
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        log.warning("skipping %s: undecodable image (%s: %s)", what, type(exc).__name__, exc)
        return None


def clean_caption(caption, what: str) -> str | None:
    text = "" if caption is None else str(caption).strip()
    if not text:
        log.warning("skipping %s: empty caption", what)
        return None
    return text


@dataclass
class Batch:
    images: torch.Tensor | None
    tokens: torch.Tensor | None
    skipped: int

    def __iter__(self):  # `images, texts = batch`, as open_clip_train.train_one_epoch unpacks it (bench/overhead)
        return iter((self.images, self.tokens))

    def pin_memory(self) -> "Batch":
        """The DataLoader's pin_memory hook: page-locked tensors copy to the GPU asynchronously
        (from pageable memory a non_blocking copy still makes the host wait)."""
        pin = (lambda t: None if t is None else t.pin_memory())  # noqa: E731
        return Batch(pin(self.images), pin(self.tokens), self.skipped)


def collate_skipping(samples: list) -> Batch:
    kept = [s for s in samples if s is not None]
    if not kept:
        return Batch(None, None, len(samples))
    return Batch(torch.stack([s[0] for s in kept]), torch.stack([s[1] for s in kept]), len(samples) - len(kept))


class PairDataset(Dataset):
    """(image file, caption) records -> (image tensor, tokens), or None for a bad record."""

    def __init__(self, records: list[tuple[str, str]], transform, tokenizer):
        self.records, self.transform, self.tokenizer = records, transform, tokenizer

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        path, caption = self.records[i]
        caption = clean_caption(caption, path)
        if caption is None:
            return None
        if not Path(path).is_file():
            log.warning("skipping %s: missing file", path)
            return None
        image = open_rgb(path, path)
        if image is None:
            return None
        return self.transform(image), self.tokenizer([caption])[0]


class ImageFiles(Dataset):
    """Image tensors of a list of files (evaluation sets); a bad file yields None."""

    def __init__(self, files: list, transform, labels=None, names: list[str] | None = None):
        self.files, self.transform, self.labels = files, transform, labels  # files: paths or encoded bytes
        self.names = names

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        image = open_rgb(self.files[i], self.names[i] if self.names else str(self.files[i]))
        if image is None:
            return None
        x = self.transform(image)
        return (x, int(self.labels[i])) if self.labels is not None else (x, i)


def collate_labelled(samples: list):
    """(images, labels, skipped) for evaluation sets built on ImageFiles."""
    kept = [s for s in samples if s is not None]
    images = torch.stack([s[0] for s in kept]) if kept else None
    return images, torch.tensor([s[1] for s in kept], dtype=torch.long), len(samples) - len(kept)


class DecodedBatches:
    """(images, labels) batches of an ImageFiles set in order, without the images that failed to
    decode; `skipped` counts those once iteration is done."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int = 0):
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                 collate_fn=collate_labelled)
        self.skipped = 0

    def __iter__(self):
        for images, labels, bad in self.loader:
            self.skipped += bad
            if images is not None:
                yield images, labels


@dataclass
class RetrievalSet:
    images: Dataset               # ImageFiles (or any dataset of (tensor, index))
    captions: list[list[str]]     # captions[i] belong to image i


def group_captions(records: list[tuple[str, str]]) -> dict[str, list[str]]:
    """image -> its captions (stripped; empty ones kept, so that training skips AND counts them),
    images in first-seen order."""
    groups: dict[str, list[str]] = {}
    for image, caption in records:
        groups.setdefault(image, []).append("" if caption is None else str(caption).strip())
    return groups


def split_images(images: list[str], eval_fraction: float, split_seed: int) -> tuple[set, set]:
    """Deterministic train / held-out split BY IMAGE, so no held-out image is trained on."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"dataset.eval_fraction={eval_fraction}: expected a value in [0, 1)")
    order = np.random.default_rng(split_seed).permutation(len(images))
    n_eval = round(len(images) * eval_fraction)
    held = {images[i] for i in order[:n_eval]}
    return {im for im in images if im not in held}, held


def training_records(groups: dict[str, list[str]], images, pairs: str, seed: int) -> list[tuple[str, str]]:
    """pairs=all: every (image, caption); pairs=one_per_image: one caption per image drawn with
    `seed` (the seed's COCO protocol: 82,783 train pairs)."""
    images = [im for im in groups if im in images]
    if pairs == "all":
        return [(im, c) for im in images for c in groups[im] or [""]]
    if pairs == "one_per_image":
        rng = np.random.default_rng(seed)
        usable = {im: [c for c in groups[im] if c] for im in images}
        return [(im, usable[im][rng.integers(len(usable[im]))] if usable[im] else "") for im in images]
    raise ValueError(f"dataset.pairs={pairs!r}: expected all or one_per_image")


def retrieval_set(groups: dict[str, list[str]], images, transform, captions_per_image: int | None) -> RetrievalSet:
    """Held-out images that exist, decode-checked lazily, each with (at most N of) its captions."""
    usable = {im: [c for c in groups[im] if c] for im in groups if im in images}
    kept = [im for im in usable if usable[im]]
    caps = [usable[im][:captions_per_image] if captions_per_image else usable[im] for im in kept]
    return RetrievalSet(ImageFiles(kept, transform), caps)
