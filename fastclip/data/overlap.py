"""Training samples that are also evaluation images, found by path or by content (SHA-1 of the
encoded file bytes, so a copy under another name is found too): eval.overlap=drop (default)
leaves them out of training, counted in data/eval_overlap (and data/skipped); eval.overlap=fail
stops the run at the first one, naming it. ImageNet val (eval.imagenet_val) is not compared.

Map-style sources are compared when they are built (paths) and as their samples are read (the
bytes are read for decoding anyway); a stream's samples as they are read.

The same rule (one resolved path, or one content key) finds an image that is in one evaluation set
twice: merge_eval_duplicates keeps it once, counted in data/eval_duplicates.
"""
import hashlib
import logging
from dataclasses import replace
from pathlib import Path

from fastclip.data.pairs import Skip
from fastclip.errors import InputError

log = logging.getLogger(__name__)
EVAL_OVERLAP = "eval overlap"
MODES = ("drop", "fail")


class EvalOverlapError(InputError):
    pass


def content_key(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


class FileKeys(dict):
    """Resolved path -> content key of the files read while the data is built, so that each
    evaluation file is read once for the duplicate and the overlap checks together."""

    def of(self, path: Path) -> bytes | None:
        """The content key of an existing file (None: it does not exist)."""
        resolved = str(path.resolve())
        if resolved not in self and path.is_file():
            self[resolved] = content_key(path.read_bytes())
        return self.get(resolved)


class EvalOverlap:
    """The evaluation images' paths and content keys, and what to do with a training sample among them."""

    def __init__(self, mode: str = "drop", files: FileKeys | None = None):
        if mode not in MODES:
            raise InputError(f"eval.overlap={mode!r}: expected one of {', '.join(MODES)}")
        self.mode, self.paths, self.keys = mode, set(), set()
        self.files = files if files is not None else FileKeys()
        self._warned = 0

    def add(self, source) -> None:
        """An evaluation image: a file path (path and content) or its encoded bytes."""
        if isinstance(source, bytes):
            self.keys.add(content_key(source))
            return
        path = Path(source)
        if path.is_file():
            self.paths.add(str(path.resolve()))
            self.keys.add(self.files.of(path))

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


def eval_overlap_of(data, mode: str, splits=("test", "val"), into: EvalOverlap | None = None,
                    files: FileKeys | None = None) -> EvalOverlap:
    """The fingerprints of a ClipData's evaluation images (of `splits`: test, val) that come from
    files or encoded bytes, added to `into` (None: a new EvalOverlap reading files' keys through `files`)."""
    overlap = into if into is not None else EvalOverlap(mode, files)
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
                test.has_path(f) or test.files.of(Path(f)) in test.keys)
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


def image_keys(images, files: FileKeys) -> list[tuple]:
    """Per image of an evaluation set, what identifies it: (resolved path, content key) of a file
    (key None: missing), (None, key) of encoded bytes or of an in-memory image's pixels (digits)."""
    sources = getattr(images, "files", None)
    if sources:
        return [(None, content_key(f)) if isinstance(f, bytes) else (str(Path(f).resolve()), files.of(Path(f)))
                for f in sources]
    decoded = getattr(images, "images", None) or []
    return [(None, content_key(f"{im.mode} {im.size}".encode() + im.tobytes())) for im in decoded]


def duplicate_groups(keys: list[tuple]) -> list[list[int]]:
    """Positions grouped by identity: two images are one when they share the resolved path or the
    content key. Groups in first-seen order, each led by its first position (the one kept)."""
    owner: dict = {}  # path or content key -> its group's index
    groups: list[list[int]] = []
    for i, (path, key) in enumerate(keys):
        found = next((owner[k] for k in (("path", path), ("key", key)) if k[1] is not None and k in owner), None)
        if found is None:
            found, groups = len(groups), groups + [[]]
        groups[found].append(i)
        for k in (("path", path), ("key", key)):
            if k[1] is not None:
                owner.setdefault(k, found)
    return groups


def _name(images, i: int) -> str:
    names = getattr(images, "names", None) or getattr(images, "files", None)
    return str(names[i]) if names else f"image {i}"


def merge_eval_duplicates(data, files: FileKeys | None = None) -> int:
    """Keeps each image of every evaluation set (test and validation, zero-shot and retrieval) once:
    one file under two paths, or byte-identical copies (content_key, as the overlap check), would
    count as two held-out images, and retrieval would rank an identical picture as a wrong answer.
    A retrieval set's duplicates become one image with the captions of all of them (each caption
    text once); a zero-shot set keeps the first (another class on a copy is named in a warning).
    Each set with duplicates is named in a warning. -> how many images were merged away, in all."""
    files = files if files is not None else FileKeys()
    merged = 0
    for split in ("test", "val"):
        for field, held in zip(("zeroshot", "retrieval"), data.split(split)):
            images = getattr(held, "images", None)
            if images is None or not (getattr(images, "files", None) or getattr(images, "images", None)):
                continue
            groups = duplicate_groups(image_keys(images, files))
            if len(groups) == len(images):
                continue
            keep = [g[0] for g in groups]
            if field == "retrieval":
                # the kept image's captions as they were, then the copies' (each text once)
                captions = [held.captions[g[0]] + list(dict.fromkeys(c for i in g[1:] for c in held.captions[i]
                                                                     if c not in held.captions[g[0]]))
                            for g in groups]
                held = replace(held.subset(keep), captions=captions, description=held.description and (
                    f"{held.description}, {len(images) - len(keep)} duplicate images merged"))
            else:
                labels = getattr(images, "labels", None)
                for g in groups:
                    if labels is not None and len({int(labels[i]) for i in g}) > 1:
                        log.warning("%s zero-shot set: %s is also %s, under another class (%s): kept as the first",
                                    split, _name(images, g[0]), ", ".join(_name(images, i) for i in g[1:]),
                                    ", ".join(held.classnames[int(labels[i])] for i in g))
                held = held.subset(keep)
            first = next(g for g in groups if len(g) > 1)
            log.warning("%s %s set: %d duplicate images merged (the same file under another path, or a byte-identical "
                        "copy), %d images left; first: %s = %s", split, field.replace("zeroshot", "zero-shot"),
                        len(images) - len(keep), len(keep),
                        _name(images, first[0]), _name(images, first[1]))
            merged += len(images) - len(keep)
            setattr(data, field if split == "test" else f"val_{field}", held)
    return merged


def settle_eval_overlap(data, rule: str) -> tuple[int, bool, int]:
    """The splits made disjoint as a run makes them before training (in place): an image twice in an
    evaluation set merged, validation images that are test images left out of validation, training
    images that are evaluation images dropped (eval.overlap=`rule`: drop, or fail naming one)
    -> (evaluation duplicates merged, whether training was checked, training images dropped)."""
    files = FileKeys()  # each evaluation file read once for both checks
    # an image twice in an evaluation set (two paths, a copy) is one held-out image: data/eval_duplicates
    duplicates = merge_eval_duplicates(data, files)
    overlap = eval_overlap_of(data, rule, ("test",), files=files)
    # validation images that are test images (a separate eval_path listing a training-side file, a copy)
    leave_test_images_out_of_validation(data, overlap)
    eval_overlap_of(data, rule, ("val",), into=overlap)  # test and validation: never trained on
    checked = bool(overlap) and hasattr(data.train, "exclude_eval")
    return duplicates, checked, data.train.exclude_eval(overlap) if checked else 0
