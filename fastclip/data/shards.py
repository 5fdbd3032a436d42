"""webdataset shards in img2dataset's layout (key.jpg|png|webp + key.txt [+ key.json]). A sample
without .txt takes its caption from the `dataset.caption_key` field of its .json (img2dataset
writes the caption there too; some pipelines only there).

`dataset.train_shards`: a brace pattern ("/data/laion/{00000..00099}.tar"; "::" joins patterns)
or a list of sources {shards, weight} mixed at random in proportion to their weights.
Samples per epoch: `dataset.num_samples`, else read from sizes.json (webdataset's convention)
or img2dataset's <shard>_stats.json beside the shards.

The stream is deterministic per (seed, epoch, rank, worker): shard order, the shuffle buffer and the
source mixing all draw from seeded generators, so a resumed run replays the same epoch.
Without resampling an epoch is one pass over the shards, dealt out to (rank, loader worker) so
that each sample is read by one worker of one rank: the epoch's shard order (the same on every
rank) goes rank by rank, then each rank's worker by worker (the split of webdataset's
split_by_node then split_by_worker, with the rank given, not read from the environment, and the
workers' parts turned on a resume). With `resampled: true` every worker of every rank draws its
own shards with replacement and an epoch is num_samples over all ranks.

Every rank makes the same number of batches (DDP steps in lockstep): resampled, num_samples over
ranks; otherwise the fewest that any rank's shards make (from the shard sizes), each rank's
further batches left out and counted as skipped (LEFT_OUT). Several ranks without resampling need
the shard sizes and at least one shard a rank (ShardStream.check_split).

Held out: `eval_shards` (the test split, read at the end of a run) and `val_shards` (per-epoch
validation, at most `val_max_images` images); `val_shards: null` holds out the last shard of
train_shards (of its first source) for validation, which training then never reads.
"""
import itertools
import json
import logging
import random
from dataclasses import replace

from torch.utils.data import IterableDataset, get_worker_info
from webdataset import filters

from fastclip.errors import InputError
from fastclip.data.pairs import ImageFiles, RetrievalSet, Skip, clean_caption, open_rgb
from fastclip.data.shard_split import taken_in_turn
from fastclip.data.splits import ClipData, require_disjoint
from fastclip.data.tar_shards import (IMAGE_KEYS, LOST, caption_of, expand_shards, read_samples, shard_samples,
                                      shard_sizes)
from fastclip.runtime import seeded
from fastclip.schema.data import WebDataset
from fastclip.data.shared_state import SharedInt

log = logging.getLogger(__name__)


class ShardSource:
    """One source: its shard list, weight, sample count and (when known) each shard's size."""

    def __init__(self, pattern: str, weight: float, num_samples: int | None):
        self.pattern, self.weight = pattern, float(weight)
        self.urls = expand_shards(pattern)
        self.sizes = shard_sizes(self.urls) or {}
        self.declared = num_samples  # the config's count; None: the shards' sizes say
        self.num_samples = num_samples or (sum(self.sizes.values()) if self.sizes else None)

    def hold_out_last(self) -> str:
        """Takes the last shard out of this source (for validation) -> its URL. ValueError naming
        dataset.val_shards when the source has a single shard."""
        if len(self.urls) < 2:
            raise InputError(f"dataset.val_shards is null and dataset.train_shards={self.pattern!r} has one shard: "
                             f"none can be held out for validation; set dataset.val_shards (held-out shards: "
                             f"`make_shards --val-fraction` writes them)")
        url = self.urls.pop()
        self.sizes.pop(url, None)
        self.num_samples = self.declared or (sum(self.sizes.values()) if self.sizes else None)
        return url


def build_sources(cfg) -> list[ShardSource]:
    spec = cfg.train_shards
    if spec is None or spec == "":
        raise InputError("dataset.train_shards is empty: give a brace pattern or a list of {shards, weight}")
    if isinstance(spec, str):
        sources = [ShardSource(spec, 1.0, None)]
    else:
        if len(spec) == 0:
            raise InputError("dataset.train_shards is an empty list")
        sources = [ShardSource(s["shards"], s.get("weight", 1.0), s.get("num_samples")) for s in spec]
    if any(s.weight <= 0 for s in sources):
        raise InputError(f"dataset.train_shards: weights must be > 0, got {[s.weight for s in sources]}")
    return sources


class ShardStream(IterableDataset):
    """Decoded (image tensor, tokens) samples, or Skip(reason) for a bad one (counted by the collate)."""

    # set_epoch's: what persistent loader workers read as each epoch starts
    seed, epoch, skip_batches, batch_size = SharedInt(), SharedInt(), SharedInt(), SharedInt()
    rank, world_size = SharedInt(), SharedInt()

    def __init__(self, sources: list[ShardSource], transform, tokenizer, shuffle_buffer: int, resampled: bool,
                 num_samples: int | None, caption_key: str = "caption"):
        self.sources, self.transform, self.tokenizer = sources, transform, tokenizer
        self.caption_key = caption_key  # the .json field a sample without .txt takes its caption from
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        known = [s.num_samples for s in sources]
        self.num_samples = num_samples or (sum(known) if all(n is not None for n in known) else None)
        if self.num_samples is None:
            raise InputError("dataset.num_samples is unset and some shards have neither sizes.json nor "
                             "<shard>_stats.json: set dataset.num_samples")
        if len(sources) > 1 and not resampled:
            raise InputError("dataset.train_shards lists several weighted sources: mixing by weight needs "
                             "dataset.resampled=true")
        self.seed, self.epoch, self.skip_batches, self.batch_size = 0, 0, 0, 1
        self.rank, self.world_size = 0, 1
        self.overlap = None  # evaluation images' fingerprints (data.overlap)

    def set_epoch(self, seed: int, epoch: int, skip_batches: int = 0, batch_size: int = 1, rank: int = 0,
                  world_size: int = 1) -> None:
        """The epoch to stream, and how many of its loader batches (of batch_size samples) a resumed
        run has already trained on: each worker passes over its share of them without decoding
        (only where skips_in_workers says that is exact). rank / world_size: data-parallel training,
        where this rank reads its own shards only (or, resampled, its own draw) and makes
        epoch_batches() batches, as every other rank does."""
        self.seed, self.epoch, self.skip_batches, self.batch_size = seed, epoch, skip_batches, batch_size
        self.rank, self.world_size = rank, world_size

    def skips_in_workers(self, start: int, batch_size: int, workers: int) -> bool:
        """Whether each loader worker can pass over its share of the epoch's first `start` batches
        itself: exactly when every worker still makes batches through them (the loader takes one
        from each worker in turn, and only from the others once one has run out)."""
        counts = self._worker_batches(max(1, workers), batch_size)
        return counts is not None and start <= min(counts) * len(counts)

    def epoch_batches(self, batch_size: int, workers: int) -> int:
        """Batches of batch_size this rank makes this epoch with `workers` loader workers (0: in this
        process), the same number on every rank; where the shard sizes are unknown, num_samples over
        the ranks' batches (the shards may end the epoch sooner)."""
        counts = self._worker_batches(max(1, workers), batch_size)
        return self.num_samples // (batch_size * self.world_size) if counts is None else sum(counts)

    def left_out(self, batch_size: int, workers: int) -> int:
        """Samples of this rank's shards in whole batches past epoch_batches (another rank's shards
        make fewer): never decoded (read at most into the shuffle buffer), counted as skipped (LEFT_OUT)."""
        made = self._rank_batches(max(1, workers), batch_size)
        return 0 if made is None else (sum(made[self.rank]) - min(map(sum, made))) * batch_size

    def check_split(self, batch_size: int, world_size: int, workers: int) -> None:
        """ValueError, before training, where the ranks cannot take equal steps: several ranks without
        resampling and without shard sizes, fewer shards than ranks, or no full batch on some rank.
        Fewer shards than ranks x workers leaves workers idle (a warning)."""
        self.set_epoch(self.seed, self.epoch, 0, batch_size, 0, world_size)
        urls = self.sources[0].urls
        if not self.resampled and world_size > 1:
            if not self.sources[0].sizes:
                raise InputError(f"dataset.resampled=false with {world_size} ranks needs each shard's sample count "
                                 f"(sizes.json or <shard>_stats.json beside dataset.train_shards="
                                 f"{self.sources[0].pattern!r}; make_shards writes sizes.json) so that every rank "
                                 f"takes the same steps; or set dataset.resampled=true (each rank draws its own)")
            if len(urls) < world_size:
                raise InputError(f"dataset.train_shards={self.sources[0].pattern!r}: {len(urls)} training shards for "
                                 f"{world_size} ranks; each rank reads its own shards: give at least {world_size} "
                                 f"shards, or set dataset.resampled=true (each rank draws its own)")
        if self.epoch_batches(batch_size, workers) == 0:
            raise InputError(f"dataset.train_shards={self.sources[0].pattern!r}: no full batch of trainer.batch_size="
                             f"{batch_size} on some rank of {world_size} with trainer.num_workers={workers} "
                             f"({self.num_samples} samples an epoch)")
        if not self.resampled and len(urls) < world_size * max(1, workers):
            log.warning("dataset.train_shards: %d training shards for %d ranks x %d loader workers: each (rank, "
                        "worker) reads its own shards, so some workers have none", len(urls), world_size, workers)

    def _rank_batches(self, workers: int, batch_size: int) -> list[list[int]] | None:
        """[rank][worker part]: full batches each rank's worker parts would make from their shards
        (None where the shard sizes are unknown or the stream is resampled)."""
        source = self.sources[0]  # several sources need resampled
        if self.resampled or not source.sizes:
            return None
        urls = self._epoch_order(source, 0)
        return [[sum(source.sizes[u] for u in urls[r::self.world_size][k::workers]) // batch_size
                 for k in range(workers)] for r in range(self.world_size)]

    def _worker_batches(self, workers: int, batch_size: int) -> list[int] | None:
        """Batches each worker part of this rank makes this epoch, where known (None where the shard
        sizes are not): the first of its parts' full batches as the loader takes them in turn, as many
        as the rank with the fewest has."""
        if self.resampled:
            return [len(range(k, self.num_samples // (batch_size * self.world_size), workers)) for k in range(workers)]
        made = self._rank_batches(workers, batch_size)
        return None if made is None else taken_in_turn(made[self.rank], min(map(sum, made)))

    def _epoch_order(self, source: ShardSource, index: int) -> list[str]:
        """The epoch's shard order, the same in every worker."""
        urls = list(source.urls)
        random.Random(f"{self.seed}/{self.epoch}/order/{index}").shuffle(urls)
        return urls

    def exclude_eval(self, overlap) -> int:
        """Samples that are evaluation images are left out as they are read (a stream is not listed)."""
        self.overlap = overlap
        return 0

    def __len__(self):
        return self.num_samples

    def _worker(self) -> tuple[int, int]:
        """(this worker's part of the epoch's stream, the number of parts). The loader asks its workers
        for batches in turn from worker 0; a resumed epoch whose next batch is part p's gives part p
        to worker 0, part p+1 to worker 1, ..., so the batches come in the order they did."""
        info = get_worker_info()
        workers = info.num_workers if info else 1
        return ((info.id if info else 0) + self.skip_batches) % workers, workers

    def _stream_id(self) -> int:
        """This (rank, worker part)'s number among all ranks' parts; one process's is its part (as
        before ranks had streams of their own)."""
        part, parts = self._worker()
        return self.rank * parts + part

    def _rng(self, *salt) -> random.Random:
        # a str seed is hashed stably (unlike hash(), which is salted per process)
        return random.Random("/".join(map(str, (self.seed, self.epoch, self._stream_id()) + salt)))

    def _shard_urls(self, source: ShardSource, index: int):
        if self.resampled:
            rng = self._rng("shards", index)
            while True:
                yield {"url": rng.choice(source.urls)}
        part, parts = self._worker()
        for url in self._epoch_order(source, index)[self.rank::self.world_size][part::parts]:
            yield {"url": url}

    def _samples(self, source: ShardSource, index: int):
        samples = (s for url in self._shard_urls(source, index) for s in shard_samples(url["url"], source.sizes))
        if self.shuffle_buffer > 1:
            samples = filters.shuffle(bufsize=self.shuffle_buffer, initial=min(100, self.shuffle_buffer),
                                      rng=self._rng("shuffle", index))(samples)
        yield from samples

    def decode(self, sample: dict, index: int = 0):
        """(image tensor, tokens), or Skip(reason) for a sample that cannot train. index: the sample's
        place in this worker's stream, which (with seed, epoch and worker) draws its random crop."""
        if LOST in sample:
            return Skip(sample[LOST] if isinstance(sample[LOST], str) else "unreadable in its shard")
        what = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            log.warning("skipping %s: no image file in the sample (has %s)", what,
                        sorted(k for k in sample if not k.startswith("__")))
            return Skip("no image")
        text, why = caption_of(sample, self.caption_key)
        if text is None:
            return Skip(why)
        caption = clean_caption(text, what)
        if caption is None:
            return Skip("empty caption")
        if self.overlap and self.overlap.has_bytes(sample[image_key]):
            return self.overlap.found(what)
        image = open_rgb(sample[image_key], what)
        if image is None:
            return Skip("undecodable image")
        with seeded(self.seed, self.epoch, self._stream_id(), index):
            image = self.transform(image)
        return image, self.tokenizer([caption])[0]

    def __iter__(self):
        """Decoded samples of this rank's worker part: its batches of epoch_batches() where the
        sizes say (then the samples past them are never read), else until its shards end."""
        part, parts = self._worker()
        streams = [iter(self._samples(s, i)) for i, s in enumerate(self.sources)]
        weights = [s.weight for s in self.sources]
        pick = self._rng("mix")
        counts = self._worker_batches(parts, self.batch_size)
        quota = None if counts is None else counts[part] * self.batch_size
        # the loader took the first skip_batches from the parts in turn: this part made every parts-th
        # one (exact while every part still had data: skips_in_workers)
        skip = len(range(part, self.skip_batches, parts)) * self.batch_size
        produced, mine = 0, []
        while quota is None or produced < quota:
            i = pick.choices(range(len(streams)), weights)[0] if len(streams) > 1 else 0
            sample = next(streams[i], None)
            if sample is None:  # a non-resampled pass is over (a last batch it did not fill is dropped)
                return
            produced += 1
            if produced <= skip:  # passed over undecoded, but through the shuffle buffer as before
                continue
            mine.append((sample, produced - 1))
            if produced % self.batch_size == 0:  # decoded once the batch is complete (a partial one is dropped)
                yield from (self.decode(sample, index) for sample, index in mine)
                mine = []


def training_sources(cfg) -> tuple[list[ShardSource], str, str | None]:
    """(the training sources, without the shard held out for validation; the validation shards'
    pattern; the held-out shard's URL, None where dataset.val_shards names the validation shards)."""
    sources = build_sources(cfg)
    val_pattern, held_out = cfg.val_shards, None
    if not val_pattern:
        val_pattern = held_out = sources[0].hold_out_last()
    return sources, val_pattern, held_out


def build_shards(cfg: WebDataset, preprocess_train, preprocess_eval, tokenizer):
    """-> ClipData(train ShardStream, retrieval=test on eval_shards or None, val_retrieval=validation on
    val_shards, or on the last training shard, held out); the splits' shards checked disjoint."""
    caption_key = cfg.caption_key
    if not isinstance(caption_key, str) or not caption_key:
        raise InputError(f"dataset.caption_key={caption_key!r}: expected the name of the .json field that holds a "
                         f"caption (img2dataset: caption)")
    sources, val_pattern, held_out = training_sources(cfg)
    val_urls = [held_out] if held_out else expand_shards(val_pattern, "dataset.val_shards")
    test_urls = expand_shards(cfg.eval_shards, "dataset.eval_shards") if cfg.eval_shards else []
    require_disjoint("dataset=webdataset", train=[u for s in sources for u in s.urls], val=val_urls, test=test_urls)
    train = ShardStream(sources, preprocess_train, tokenizer, cfg.shuffle_buffer, cfg.resampled, cfg.num_samples,
                        caption_key)
    test = (shard_retrieval_set(cfg.eval_shards, preprocess_eval, cfg.eval_max_images, caption_key=caption_key)
            if cfg.eval_shards else None)
    val = shard_retrieval_set(val_pattern, preprocess_eval, cfg.val_max_images, "dataset.val_shards", caption_key)
    if held_out:
        val = replace(val, description=f"webdataset validation: the last training shard {held_out}, held out "
                                       f"({len(val.captions)} images)")
    return ClipData(train, retrieval=test, val_retrieval=val)


# the key of a stand-in for a sample a shard declares but could not deliver (truncated or corrupt tar)
def shard_captions(cfg, limit: int = 100_000) -> list[str]:
    """Training captions (the unigram text-boundary corpus): the first `limit` samples of each training
    source's shards, after the hold-out (training_sources: the last shard, when it is validation's,
    is never read)."""
    caption_key = cfg.caption_key
    sources = training_sources(cfg)[0]
    return [c for source in sources
            for sample in itertools.islice((x for url in source.urls for x in shard_samples(url, {})), limit)
            for c in [caption_of(sample, caption_key, warn=False)[0]] if c]  # training names those without


def shard_retrieval_set(pattern: str, preprocess_eval, max_images: int | None,
                        key: str = "dataset.eval_shards", caption_key: str = "caption") -> RetrievalSet:
    """Retrieval on held-out shards. Samples that make_shards wrote from one source image (its
    json "source") are regrouped into one image with several captions; others stand alone.
    Encoded images are kept in memory (a few thousand small JPEGs). key: the config key the
    pattern came from (named in errors); caption_key: as ShardStream's."""
    images: dict[str, tuple[bytes, str, list[str]]] = {}
    skipped, reasons = 0, {}
    for sample in read_samples(pattern, key, None):
        if LOST in sample:
            skipped += 1
            reason = sample[LOST] if isinstance(sample[LOST], str) else "unreadable in its shard"
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        caption, why = caption_of(sample, caption_key)
        if image_key is None or not caption:
            if image_key is None or why is None:  # caption_of has named why there is no caption
                log.warning("skipping eval sample %s: %s", sample.get("__key__"), "no image" if image_key is None else
                            "empty caption")
            skipped += 1
            reason = "no image" if image_key is None else why or "empty caption"
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        try:
            source = json.loads(sample["json"]).get("source", name) if "json" in sample else name
        except ValueError:
            source = name
        if source not in images:
            if max_images is not None and len(images) >= max_images:
                break
            images[source] = (sample[image_key], name, [])
        images[source][2].append(caption)
    if not images:
        raise InputError(f"{key}={pattern!r}: no usable sample (" + (", ".join(
            f"{n} {why}" for why, n in sorted(reasons.items())) or "no sample") + ")")
    data, names, captions = zip(*images.values())
    return RetrievalSet(ImageFiles(list(data), preprocess_eval, names=list(names)), list(captions), skipped,
                        f"webdataset {key.removeprefix('dataset.')}={pattern} ({len(data)} images)")
