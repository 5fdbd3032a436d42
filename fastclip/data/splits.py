"""What every image-text source yields: a training set and two held-out splits, each disjoint from
the others. Validation is what per-epoch evaluation and a sweep's objective read (metrics under
`val/`); test is read once, at the end of the run, for the numbers a run reports (`zeroshot/top1`,
`retrieval/*`, `zeroshot/imagenet_*`). Choosing a configuration on the test split would make its
best number an optimistically biased estimate of that configuration's quality.

Validation comes from the source's own validation split where it has one (Karpathy's `val` for
COCO) and is carved from the training side otherwise, so the test split stays what it was."""
from collections.abc import Iterable
from dataclasses import dataclass

from torch.utils.data import Dataset

from fastclip.data.captioned import ZeroShotSet
from fastclip.data.pairs import RetrievalSet
from fastclip.errors import InputError

SPLITS = ("val", "test")


@dataclass
class ClipData:
    train: Dataset                            # yields (image, tokens), or a Skip for a bad sample
    zeroshot: ZeroShotSet | None = None       # test: class-captioned sources' held-out images, unseen templates
    retrieval: RetrievalSet | None = None     # test: held-out images with their captions
    val_zeroshot: ZeroShotSet | None = None   # validation, disjoint from training and test
    val_retrieval: RetrievalSet | None = None

    def split(self, name: str) -> tuple[ZeroShotSet | None, RetrievalSet | None]:
        """(zero-shot set, retrieval set) of split `name` (val or test); ValueError otherwise."""
        if name == "val":
            return self.val_zeroshot, self.val_retrieval
        if name == "test":
            return self.zeroshot, self.retrieval
        raise InputError(f"split={name!r}: expected one of {', '.join(SPLITS)}")


def require_disjoint(what: str, **splits: Iterable) -> None:
    """Raises ValueError naming the two splits of `what` that share an item, and one such item.
    splits: name -> the items identifying its samples (indices, resolved paths, shard URLs)."""
    seen: dict = {}
    for name, items in splits.items():
        for item in items:
            other = seen.setdefault(item, name)
            if other != name:
                raise InputError(f"{what}: {item!r} is in both the {other} and the {name} split; the splits must be "
                                 f"disjoint (a validation or test number on a training sample is no estimate)")
