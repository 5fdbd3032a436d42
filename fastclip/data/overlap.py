"""Training samples that are also evaluation images, found by path or by content (SHA-1 of the
encoded file bytes, so a copy under another name is found too): eval.overlap=drop (default)
leaves them out of training, counted in data/eval_overlap (and data/skipped); eval.overlap=fail
stops the run at the first one, naming it. ImageNet val (eval.imagenet_val) is not compared.

Map-style sources are compared when they are built (paths) and as their samples are read (the
bytes are read for decoding anyway); a stream's samples as they are read.
"""
import hashlib
import logging
from pathlib import Path

from fastclip.data.pairs import Skip

log = logging.getLogger(__name__)
EVAL_OVERLAP = "eval overlap"
MODES = ("drop", "fail")


class EvalOverlapError(ValueError):
    pass


def content_key(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


class EvalOverlap:
    """The evaluation images' paths and content keys, and what to do with a training sample among them."""

    def __init__(self, mode: str = "drop"):
        if mode not in MODES:
            raise ValueError(f"eval.overlap={mode!r}: expected one of {', '.join(MODES)}")
        self.mode, self.paths, self.keys = mode, set(), set()
        self._warned = 0

    def add(self, source) -> None:
        """An evaluation image: a file path (path and content) or its encoded bytes."""
        if isinstance(source, bytes):
            self.keys.add(content_key(source))
            return
        path = Path(source)
        if path.is_file():
            self.paths.add(str(path.resolve()))
            self.keys.add(content_key(path.read_bytes()))

    def __bool__(self) -> bool:
        return bool(self.keys)

    def has_path(self, path) -> bool:
        return str(Path(path).resolve()) in self.paths

    def has_bytes(self, data: bytes) -> bool:
        return content_key(data) in self.keys

    def found(self, what: str, side: str = "training") -> Skip:
        """A `side` (training, validation) sample `what` that is an evaluation image: fails (mode
        fail) or is left out."""
        if self.mode == "fail":
            raise EvalOverlapError(f"{what} is also in the evaluation set (eval.overlap=fail); remove it from the "
                                   f"{side} data, or set eval.overlap=drop to leave such samples out and count them")
        if self._warned < 10:
            self._warned += 1
            log.warning("leaving %s out of %s: it is also an evaluation image (eval.overlap=drop)", what, side)
        return Skip(EVAL_OVERLAP)


def eval_overlap_of(data, mode: str, splits=("test", "val"), into: EvalOverlap | None = None) -> EvalOverlap:
    """The fingerprints of a ClipData's evaluation images (of `splits`: test, val) that come from
    files or encoded bytes, added to `into` (None: a new EvalOverlap)."""
    overlap = into if into is not None else EvalOverlap(mode)
    for split in splits:
        for held in data.split(split):
            for source in getattr(getattr(held, "images", None), "files", None) or []:
                overlap.add(source)
    return overlap


def leave_test_images_out_of_validation(data, test: EvalOverlap) -> int:
    """Validation images that are test images (by path or content: an eval_path set naming a file of
    the training side, a copy) are left out of validation with a warning (eval.overlap=drop) or fail
    (fail): a configuration chosen on them would be chosen on the test split. -> how many left out."""
    if not test:
        return 0
    dropped = 0
    for field in ("val_zeroshot", "val_retrieval"):
        held = getattr(data, field)
        files = getattr(getattr(held, "images", None), "files", None)
        if not files:
            continue
        keep = []
        for i, f in enumerate(files):
            shared = test.has_bytes(f) if isinstance(f, bytes) else (
                test.has_path(f) or (Path(f).is_file() and test.has_bytes(Path(f).read_bytes())))
            if shared:
                test.found(str(f) if not isinstance(f, bytes) else f"image {i}", "validation")
            else:
                keep.append(i)
        if len(keep) < len(files):
            dropped += len(files) - len(keep)
            setattr(data, field, held.subset(keep))
    if dropped:
        log.warning("%d validation images left out: they are test images too (eval.overlap=drop)", dropped)
    return dropped
