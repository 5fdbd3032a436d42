"""Reading webdataset tar shards sample by sample, with what a reader must not lose silently: a
sample a shard cannot deliver becomes a LOST stand-in that the training and evaluation readers
count as skipped (fewer samples than sizes.json declares, a shard cut short, members whose key
has a dot so that webdataset merged them); the shard patterns, their declared sizes, and a
sample's caption (.txt, else the .json's caption field)."""
import json
import logging
import os
from pathlib import Path

from webdataset import shardlists, tariterators

from fastclip.errors import InputError, InputNotFound

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern: str, what: str = "dataset.train_shards") -> list[str]:
    urls = shardlists.expand_urls(str(pattern))
    if not urls:
        raise InputError(f"{what}={pattern!r}: the pattern expands to no shards")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise InputNotFound(f"{what}={pattern!r}: {len(missing)} of {len(urls)} shards do not exist, "
                                f"first {missing[0]!r}")
    return urls


def shard_sizes(urls: list[str]) -> dict[str, int] | None:
    """{url: samples} from sizes.json ({shard name: count}) or img2dataset's <shard>_stats.json
    ("successes"); None when some shard has neither."""
    sizes: dict[str, int] = {}
    cache: dict[Path, dict] = {}
    for url in urls:
        path = Path(url)
        sizes_file = path.parent / "sizes.json"
        if sizes_file.is_file():
            known = cache.setdefault(sizes_file, json.loads(sizes_file.read_text()))
            if path.name in known:
                sizes[url] = int(known[path.name])
                continue
        stats = path.with_name(path.name.removesuffix(".tar") + "_stats.json")
        if stats.is_file():
            sizes[url] = int(json.loads(stats.read_text())["successes"])
            continue
        return None
    return sizes


def count_samples(urls: list[str]) -> int | None:
    sizes = shard_sizes(urls)
    return None if sizes is None else sum(sizes.values())


def _warn_and_continue(exc: Exception) -> bool:
    log.warning("skipping unreadable shard data: %s: %s", type(exc).__name__, exc)
    return True


LOST = "__lost__"


def shard_samples(url: str, sizes: dict[str, int]):
    """One shard's samples, with a LOST stand-in (its value the reason) for each sample it cannot
    deliver, so that data/skipped counts them like any other bad sample: fewer than sizes.json
    declares (webdataset's handler drops what it cannot read: a truncated tar, a corrupt member);
    without a sizes file, one for a shard cut short (the loss cannot be counted, only seen); and
    one per image of samples that webdataset merged because their member names have a dot in the
    key (img.0000.jpg: the key is taken up to the first dot)."""
    n = 0
    for sample in tariterators.tarfile_samples([{"url": url}], handler=_warn_and_continue):
        merged = [k for k in sample if not k.startswith("__") and "." in k and k.rsplit(".", 1)[1].lower() in IMAGE_KEYS]
        if merged and not any(k in sample for k in IMAGE_KEYS):  # a sample's own extra fields: key.mask.png beside key.jpg
            log.warning("%s: member names with a dot in their key (%s.%s, ...): webdataset takes a sample's key up to "
                        "the first dot, so %d samples' files merged into one; they count as skipped (rename the "
                        "members without the dot, e.g. %s_%s)", url, sample.get("__key__"), merged[0], len(merged),
                        sample.get("__key__"), merged[0])
            n += len(merged)
            for _ in merged:
                yield {LOST: DOTTED_KEY, "__url__": url}
            continue
        n += 1
        yield sample
    declared = sizes.get(url)
    if declared is not None and n != declared:
        log.warning("%s: %d samples read, its sizes file declares %d%s", url, n, declared,
                    "; the rest count as skipped" if n < declared else "")
        for _ in range(declared - n):
            yield {LOST: True, "__url__": url}
    elif declared is None and cut_short(url):
        log.warning("%s: the shard ends without tar's end-of-archive blocks: it was cut short (a copy or download "
                    "that stopped); %d samples read, the ones after the cut are lost and counted as one skipped sample "
                    "(a sizes.json, which make_shards writes, lets them be counted)", url, n)
        yield {LOST: True, "__url__": url}


DOTTED_KEY = "member names with a dot in the key"


def cut_short(url: str) -> bool:
    """Whether a local tar file lacks the two zero blocks that end every complete tar archive (its
    size a multiple of 512 and its last 1024 bytes zero), i.e. a shard truncated by an interrupted
    copy or download; even at a member boundary, where tar itself reads it as complete. Remote and
    piped shards, and compressed ones (.tar.gz: the end blocks are inside the compressed stream), are
    not checked (False)."""
    path = url.removeprefix("file:")
    if "://" in url or url.startswith("pipe:") or not path.endswith(".tar") or not os.path.isfile(path):
        return False
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return True
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) != bytes(1024)


def read_samples(pattern: str, what: str, limit: int | None):
    """Raw samples of the shards in order (no shuffle), at most `limit`."""
    samples = (s for url in expand_shards(pattern, what) for s in shard_samples(url, {}))
    for i, sample in enumerate(samples):
        if limit is not None and i >= limit:
            return
        yield sample


NOT_UTF8 = "caption not UTF-8"


def caption_of(sample, caption_key: str = "caption", warn: bool = True) -> tuple[str | None, str | None]:
    """(the sample's caption, stripped, None) from its .txt, or, without one, from the `caption_key`
    field of its .json; else (None, why: the Skip reason, named in a warning unless warn=False): bytes
    that are not UTF-8 (never a caption with replacement characters in it), no .txt and no .json, no
    such field, a .json that does not parse."""
    what = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    if "txt" in sample:
        raw = sample["txt"]
        if not isinstance(raw, bytes):
            return str(raw).strip(), None
        try:
            return raw.decode("utf-8").strip(), None
        except UnicodeDecodeError as exc:
            if warn:
                log.warning("skipping %s: caption not UTF-8 (byte 0x%02x at offset %d)", what, raw[exc.start],
                            exc.start)
            return None, NOT_UTF8
    if "json" not in sample:
        why = "no caption: no .txt and no .json"
    else:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, TypeError):  # UnicodeDecodeError is a ValueError
            meta, why = None, "no caption: no .txt and a .json that does not parse"
        if meta is not None:
            value = meta.get(caption_key) if isinstance(meta, dict) else None
            if isinstance(value, str):
                return value.strip(), None
            why = (f"no caption: no .txt and no {caption_key!r} in .json" if value is None else
                   f"no caption: no .txt and a {type(value).__name__} as {caption_key!r} in .json")
    if warn:
        log.warning("skipping %s: %s (dataset.caption_key=%s; the sample has %s)", what, why, caption_key,
                    sorted(k for k in sample if not k.startswith("__")))
    return None, why


