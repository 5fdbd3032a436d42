"""What every image-text source shares: decoding that skips bad samples instead of failing,
a collate that counts the skips (they travel with the batch, out of loader workers, into the
`data/skipped` metric), and the held-out retrieval set (several captions per image).

A bad sample (undecodable image, empty caption, missing file) becomes a Skip(reason) in the
worker; the collate drops it and counts it by reason. A batch can therefore be smaller than trainer.batch_size.
"""
import io
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from fastclip.errors import InputError
from fastclip.runtime import seeded
from fastclip.worker_signals import ignore_stop_signals
from fastclip.data.shared_state import SharedInt

log = logging.getLogger(__name__)


# Greyscale modes holding 16-bit values: 0..65535 maps to 0..255 (value / 257). Pillow opens a
# 16-bit PNG / TIFF as I;16*, and a 16-bit PGM / PPM (any maxval) as "I" already scaled to 0..65535.
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
SIXTEEN_BIT_I_FORMATS = {"PNG", "PPM"}


class UnusableImage(ValueError):
    """An image file that cannot be decoded, or whose mode has no defined value range."""


def open_rgb(source: str | Path | bytes, what: str, skip: bool = True) -> Image.Image | None:
    """A decoded 8-bit RGB image as a viewer shows it (turned by its EXIF orientation: upright), or
    None (logged with `what` and the reason) when it cannot be read or its mode has no defined value
    range (32-bit integer "I" from TIFF etc., float "F"). skip=False raises UnusableImage naming
    `what` and the reason instead (a user's own file). Every image fastclip reads (training, evaluation
    sets, make_shards, fastclip.infer) is opened here."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            upright(im, what, in_place=True)  # decodes: a truncated file fails here
            if im.mode in SIXTEEN_BIT_MODES or (im.mode == "I" and im.format in SIXTEEN_BIT_I_FORMATS):
                return sixteen_to_eight_bits(im).convert("RGB")
            if im.mode in ("I", "F"):
                reason = (f"image mode {im.mode!r} ({im.format}) has no defined value range; convert it to 8 or 16 "
                          f"bits per channel")
            else:
                return on_white(im)  # forces the full decode: truncated files fail here
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        reason = f"undecodable image ({type(exc).__name__}: {exc})"
    if not skip:
        raise UnusableImage(f"{what}: {reason}")
    log.warning("skipping %s: %s", what, reason)
    return None


def on_white(image: Image.Image) -> Image.Image:
    """`image` as RGB, its transparent pixels shown over white, as a page shows them. convert("RGB")
    alone drops the alpha channel and brings back whatever colour the hidden pixels hold (a logo's
    transparent background stored as green trains as green). Modes with alpha (RGBA, LA, PA) and
    palette or RGB images with a transparency entry are composited; the others are converted."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def upright(image: Image.Image, what: str = "image", in_place: bool = False) -> Image.Image:
    """`image` as a viewer shows it: rotated / flipped as its EXIF Orientation tag says (a phone
    stores a portrait photo sideways with orientation 6), the tag then removed, so turning it again
    changes nothing (Pillow's ImageOps.exif_transpose). Decodes the image (its errors propagate); EXIF
    that cannot be parsed leaves the pixels as stored, with a warning naming `what`. in_place=False
    returns a new image."""
    image.load()
    try:
        turned = ImageOps.exif_transpose(image, in_place=in_place)
    except Exception as exc:  # a malformed EXIF block: the pixels are still good
        log.warning("%s: unreadable EXIF orientation, read as stored (%s: %s)", what, type(exc).__name__, exc)
        return image if in_place else image.copy()
    return image if in_place else turned


def sixteen_to_eight_bits(im: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (values 0..65535) as mode L, value / 257 rounded; convert("L")
    would clip every value above 255 instead. Forces the decode."""
    values = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))  # 2-D uint8: mode L


def clean_caption(caption, what: str) -> str | None:
    text = "" if caption is None else str(caption).strip()
    if not text:
        log.warning("skipping %s: empty caption", what)
        return None
    return text


@dataclass(frozen=True)
class Skip:
    """What a dataset yields for a sample it leaves out: the reason, counted per reason in
    data/skipped (a bare None counts as "bad sample")."""
    reason: str


@dataclass
class Batch:
    images: torch.Tensor | None
    tokens: torch.Tensor | None
    skipped: dict[str, int]           # reason -> samples of this batch left out

    def __iter__(self):  # `images, texts = batch`, as open_clip_train.train_one_epoch unpacks it (bench/overhead)
        return iter((self.images, self.tokens))

    def pin_memory(self) -> "Batch":
        """The DataLoader's pin_memory hook: page-locked tensors copy to the GPU asynchronously
        (from pageable memory a non_blocking copy still makes the host wait)."""
        pin = (lambda t: None if t is None else t.pin_memory())  # noqa: E731
        return Batch(pin(self.images), pin(self.tokens), self.skipped)


def collate_skipping(samples: list) -> Batch:
    kept = [s for s in samples if s is not None and not isinstance(s, Skip)]
    skipped = Counter(s.reason if isinstance(s, Skip) else "bad sample" for s in samples
                      if s is None or isinstance(s, Skip))
    if not kept:
        return Batch(None, None, dict(skipped))
    return Batch(torch.stack([s[0] for s in kept]), torch.stack([s[1] for s in kept]), dict(skipped))


class PairDataset(Dataset):
    """(image file, caption) records -> (image tensor, tokens), or None for a bad record."""

    seed, epoch = SharedInt(), SharedInt()  # set_epoch's: what persistent loader workers read

    def __init__(self, records: list[tuple[str, str]], transform, tokenizer):
        self.records, self.transform, self.tokenizer = records, transform, tokenizer
        self.overlap = None  # evaluation images' fingerprints (data.overlap), once exclude_eval has run
        self.seed, self.epoch = 0, 0

    def set_epoch(self, seed: int, epoch: int) -> None:
        """A sample's random crop is drawn from (seed, epoch, index): the same in a resumed run."""
        self.seed, self.epoch = seed, epoch

    def __len__(self):
        return len(self.records)

    def exclude_eval(self, overlap) -> int:
        """Leaves out the records whose image file is an evaluation image (by path now, by content
        as they are read) -> how many were left out now."""
        keep = []
        for record in self.records:
            if overlap.has_path(record[0]):
                overlap.found(record[0])  # fails (eval.overlap=fail), or warns and it is left out
            else:
                keep.append(record)
        dropped, self.records, self.overlap = len(self.records) - len(keep), keep, overlap
        return dropped

    def __getitem__(self, i):
        path, caption = self.records[i]
        caption = clean_caption(caption, path)
        if caption is None:
            return Skip("empty caption")
        if not Path(path).is_file():
            log.warning("skipping %s: missing file", path)
            return Skip("missing file")
        data = Path(path).read_bytes()
        if self.overlap and self.overlap.has_bytes(data):
            return self.overlap.found(path)
        image = open_rgb(data, path)
        if image is None:
            return Skip("undecodable image")
        with seeded(self.seed, self.epoch, i):
            image = self.transform(image)
        return image, self.tokenizer([caption])[0]


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

    def subset(self, keep: list[int]) -> "ImageFiles":
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        return ImageFiles(pick(self.files), self.transform, pick(self.labels), pick(self.names))


def collate_labelled(samples: list):
    """(images, labels, skipped) for evaluation sets built on ImageFiles."""
    kept = [s for s in samples if s is not None]
    images = torch.stack([s[0] for s in kept]) if kept else None
    return images, torch.tensor([s[1] for s in kept], dtype=torch.long), len(samples) - len(kept)


class DecodedBatches:
    """(images, labels) batches of an ImageFiles set in order, without the images that failed to
    decode; `skipped` counts those once iteration is done."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int = 0, timeout_s: float = 0):
        """timeout_s: with workers, a worker silent this long raises (trainer.loader_timeout_s) instead of
        hanging the run; 0 waits forever."""
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                 collate_fn=collate_labelled, timeout=timeout_s if num_workers else 0,
                                 worker_init_fn=ignore_stop_signals)  # evaluation's workers get a job's signals too
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
    skipped: int = 0              # caption rows / samples left out while reading it: retrieval/skipped_rows
    description: str = ""         # which split the numbers come from: "coco2014 karpathy test split (5000 images)"

    def subset(self, keep: list[int]) -> "RetrievalSet":
        """The same set with only the images (and their captions) at positions `keep` (images: an ImageFiles)."""
        return replace(self, images=self.images.subset(keep), captions=[self.captions[i] for i in keep])


def require_usable(images: Dataset, what: str) -> int:
    """Before training: an evaluation set at least one of whose images exists and decodes; else
    ValueError naming `what`. Decodes images in order until one works (usually the first).
    -> how many of its image files do not exist (named in a warning; evaluation counts them)."""
    if len(images) == 0:
        raise InputError(f"{what}: no image to evaluate on")
    files = getattr(images, "files", None)
    if files is not None and not isinstance(files[0], bytes):
        missing = [f for f in files if not Path(f).is_file()]
        if len(missing) == len(files):
            raise InputError(f"{what}: none of its {len(files)} image files exists (first: {missing[0]})")
        if missing:
            log.warning("%s: %d of %d image files do not exist (first: %s); evaluation leaves them out and "
                        "counts them", what, len(missing), len(files), missing[0])
    else:
        missing = []
    for i in range(len(images)):
        if images[i] is not None:
            return len(missing)
    raise InputError(f"{what}: none of its {len(images)} images could be decoded (the warnings above say why)")


def group_captions(records: list[tuple[str, str]]) -> dict[str, list[str]]:
    """image -> its captions (stripped; empty ones kept, so that training skips AND counts them),
    images in first-seen order."""
    groups: dict[str, list[str]] = {}
    for image, caption in records:
        groups.setdefault(image, []).append("" if caption is None else str(caption).strip())
    return groups


def split_images(images: list[str], eval_fraction: float, split_seed: int, key: str = "dataset.eval_fraction",
                 max_images: int | None = None) -> tuple[set, set]:
    """Deterministic train / held-out split BY IMAGE, so no held-out image is trained on: round(n x
    eval_fraction) of the n images held out, at most max_images (None: no cap). key: the config key
    the fraction came from, named in the ValueError a fraction outside [0, 1) raises."""
    if not 0.0 <= eval_fraction < 1.0:
        raise InputError(f"{key}={eval_fraction}: expected a value in [0, 1)")
    order = np.random.default_rng(split_seed).permutation(len(images))
    n_eval = round(len(images) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and len(images) > 1:
        n_eval = 1  # a fraction too small for this few images still holds one out, rather than none
    if max_images is not None:
        n_eval = min(n_eval, max_images)
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
    raise InputError(f"dataset.pairs={pairs!r}: expected all or one_per_image")


def retrieval_set(groups: dict[str, list[str]], images, transform, captions_per_image: int | None) -> RetrievalSet:
    """Held-out images that exist, decode-checked lazily, each with (at most N of) its captions."""
    usable = {im: [c for c in groups[im] if c] for im in groups if im in images}
    kept = [im for im in usable if usable[im]]
    caps = [usable[im][:captions_per_image] if captions_per_image else usable[im] for im in kept]
    return RetrievalSet(ImageFiles(kept, transform), caps)
