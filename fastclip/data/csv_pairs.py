"""Image-caption pairs from a CSV (Flickr-style `image,caption`, one row per caption): image
paths relative to `dataset.image_root` (default: the CSV's folder, then its images/), several
captions per image allowed. Held out BY IMAGE for retrieval: `eval_fraction` of the images
(seeded), or every image of `eval_path` (another CSV of the same layout): the test split. Per-epoch
validation: `val_fraction` of the remaining images (at most `val_max_images`), carved from the
training side by image, so the test split does not depend on it.

The file must be UTF-8 (a BOM is fine). A row that is not, or that has more or fewer fields than
the header (an unquoted separator inside a caption), is skipped and counted, never truncated;
when more than half the rows are like that the file fails before training."""
import csv
import io
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from fastclip.data.pairs import PairDataset, group_captions, retrieval_set, split_images, training_records
from fastclip.data.splits import ClipData, require_disjoint
from fastclip.data.textfile import decode_lenient, first_bad_byte, has_undecodable, not_utf8, undecoded_repr
from fastclip.errors import InputError, InputNotFound
from fastclip.schema.data import Csv

log = logging.getLogger(__name__)
NOT_UTF8, FIELD_COUNT, NO_IMAGE = "CSV row not UTF-8", "CSV row with wrong field count", "CSV row without image"
WARN_ROWS = 20  # bad rows warned one by one per file; the rest are only counted (and summarised)


def _numbered(reader, path: Path):
    """(line the row starts on, fields) of each CSV row; csv.Error -> ValueError naming file:line."""
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InputError(f"{path}:{start}: unreadable CSV row ({exc})") from None
        yield start, row


def load_pairs(path: str | Path, image_root: str | Path | None, image_column: str, caption_column: str,
               separator: str) -> tuple[list[tuple[str, str]], Counter]:
    """([(image path, caption)], rows skipped by reason). Raises FileNotFoundError / ValueError
    naming the file, the key and the line before training (missing columns, mostly bad rows)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"dataset.path={str(path)!r}: no such CSV file")
    root = Path(image_root) if image_root else (path.parent / "images" if (path.parent / "images").is_dir() else path.parent)
    if not root.is_dir():
        raise InputNotFound(f"dataset.image_root={str(root)!r}: no such directory")
    data = path.read_bytes()
    rows_in = _numbered(csv.reader(io.StringIO(decode_lenient(data), newline=""), delimiter=separator), path)
    header = next(rows_in, (1, []))[1]
    if has_undecodable("".join(header)):
        raise not_utf8(str(path), data, first_bad_byte(data), " (in the header)")
    missing = [c for c in (image_column, caption_column) if c not in header]
    if missing:
        raise InputError(f"{path}: no column {missing} (dataset.image_column / dataset.caption_column); "
                         f"the header has {header} with dataset.separator={separator!r}")
    image_at, caption_at = header.index(image_column), header.index(caption_column)
    rows, skipped, first_bad, total = [], Counter(), {}, 0
    for line, row in rows_in:
        if not row:
            continue  # a blank line
        total += 1
        why = (NOT_UTF8 if has_undecodable("".join(row)) else FIELD_COUNT if len(row) != len(header)
               else NO_IMAGE if not row[image_at] else None)
        if why is None:
            rows.append((str(root / row[image_at]), row[caption_at]))
            continue
        skipped[why] += 1
        first_bad.setdefault(why, (line, row))
        if sum(skipped.values()) <= WARN_ROWS:
            log.warning("skipping %s:%d: %s", path, line, _row_problem(why, row, header, separator))
    _fail_if_mostly_bad(path, data, separator, skipped, first_bad, total)
    if skipped:
        log.warning("%s: skipped %d of %d rows (%s)", path, sum(skipped.values()), total,
                    ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    if not rows:
        raise InputError(f"dataset.path={str(path)!r}: no rows")
    return rows, skipped


def _row_problem(why: str, row: list[str], header: list[str], separator: str) -> str:
    if why == NOT_UTF8:
        return f"bytes that are not UTF-8 in {undecoded_repr(separator.join(row))!r}"
    if why == FIELD_COUNT:
        return (f"{len(row)} fields where the header has {len(header)} (dataset.separator={separator!r}; "
                f"a caption containing it must be quoted): {separator.join(row)!r}")
    return "empty image field"


def _fail_if_mostly_bad(path: Path, data: bytes, separator: str, skipped: Counter, first_bad: dict, total: int):
    """More than half the rows undecodable or split wrong: the file's encoding or
    dataset.separator is wrong, so training on the rest would be misleading."""
    if 2 * skipped[NOT_UTF8] > total:
        raise not_utf8(str(path), data, first_bad_byte(data), f" ({skipped[NOT_UTF8]} of {total} rows)")
    if 2 * skipped[FIELD_COUNT] > total:
        line, row = first_bad[FIELD_COUNT]
        raise InputError(f"{path}: {skipped[FIELD_COUNT]} of {total} rows do not have the header's field count "
                         f"with dataset.separator={separator!r}; first at line {line}: {separator.join(row)!r}. "
                         f"Check dataset.separator, or quote captions that contain it")


@dataclass
class CsvSplit:
    """dataset.path's images split three ways: training, validation (carved from the training side)
    and test (held out by eval_fraction, or eval_path's images)."""
    groups: dict[str, list[str]]  # dataset.path: image -> its captions
    skipped: dict[str, int]  # dataset.path's rows skipped, by reason
    train_images: set[str]
    val_images: set[str]
    held: set[str]  # the test split's images (of eval_groups)
    eval_groups: dict[str, list[str]]  # where the test images' captions are: eval_path's, or dataset.path's
    eval_skipped: dict[str, int]
    description: str  # the test split's


def split_csv(cfg) -> CsvSplit:
    """Reads dataset.path (and eval_path) and splits the images. Raises as load_pairs, and ValueError
    naming dataset.eval_fraction / dataset.val_fraction when a fraction is outside [0, 1)."""
    def read(path):
        rows, skipped = load_pairs(path, cfg.image_root, cfg.image_column, cfg.caption_column, cfg.separator)
        return group_captions(rows), dict(skipped)
    groups, train_skipped = read(cfg.path)
    if cfg.eval_path:
        train_images, (eval_groups, eval_skipped) = set(groups), read(cfg.eval_path)
        held, description = set(eval_groups), f"csv eval_path={cfg.eval_path}"
    else:
        train_images, held = split_images(list(groups), cfg.eval_fraction, cfg.split_seed)
        eval_groups, eval_skipped = groups, {}
        description = f"csv held-out {cfg.eval_fraction * 100:g}% of images (split_seed={cfg.split_seed})"
    train_images, val_images = split_images([im for im in groups if im in train_images], cfg.val_fraction,
                                            cfg.split_seed, "dataset.val_fraction", cfg.val_max_images)
    return CsvSplit(groups, train_skipped, train_images, val_images, held, eval_groups, eval_skipped, description)


def training_pairs(cfg) -> list[tuple[str, str]]:
    """The (image, caption) pairs the training set keeps (dataset.pairs of the training images; never
    a validation or test image's): the unigram caption corpus."""
    split = split_csv(cfg)
    return training_records(split.groups, split.train_images, cfg.pairs, cfg.split_seed)


def build_csv(cfg: Csv, preprocess_train, preprocess_eval, tokenizer) -> ClipData:
    """-> ClipData(train PairDataset, retrieval=test RetrievalSet or None, val_retrieval=validation),
    each with `skipped` = rows of its CSV skipped while reading (the training set's by reason) (one
    CSV split into train and held-out images counts them on the training side)."""
    split = split_csv(cfg)
    groups, train_skipped, train_images, val_images = split.groups, split.skipped, split.train_images, split.val_images
    held, eval_groups, eval_skipped, description = split.held, split.eval_groups, split.eval_skipped, split.description
    # held out by this function; an eval_path CSV naming a training image is eval.overlap's (ClipTask)
    require_disjoint(f"dataset=csv path={cfg.path}", train=train_images, val=val_images,
                     **({} if cfg.eval_path else {"test": held}))
    train = PairDataset(training_records(groups, train_images, cfg.pairs, cfg.split_seed), preprocess_train, tokenizer)
    train.skipped = train_skipped
    val = replace(retrieval_set(groups, val_images, preprocess_eval, cfg.captions_per_image),
                  description=f"csv validation: {len(val_images)} images of dataset.path held out from training "
                              f"(val_fraction={cfg.val_fraction:g}, split_seed={cfg.split_seed})")
    if not held:
        return ClipData(train, val_retrieval=val)
    retrieval = retrieval_set(eval_groups, held, preprocess_eval, cfg.captions_per_image)
    return ClipData(train, retrieval=replace(retrieval, skipped=sum(eval_skipped.values()), description=description),
                    val_retrieval=val)
