"""A data-parallel rank's part of an epoch (EpochOrder), batches cut to the ranks' common size
(distributed.Lockstep's size and trim), and epoch-length wrappers the loop plans its steps from."""
import itertools

import torch
from torch.utils.data import Sampler

from fastclip import runtime
from fastclip.data.pairs import Batch


class EpochOrder(Sampler):
    """One rank's part of the epoch's shuffled order (a function of seed and epoch only, so a resumed
    run replays it), from its batch `start` on. The order is cut into global batches of
    batch_size x world_size; rank r takes the r-th run of batch_size in each, so the ranks' batches
    together are the batch one process would take at batch_size x world_size. With one process it is
    the order DataLoader(shuffle=True, generator=epoch_generator) gave before this class: that loader
    drew its base seed from the generator, then the permutation."""

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, batch_size: int = 1, rank: int = 0,
                 world_size: int = 1):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Moves a persistent loader's sampler to batch `start` of `epoch`."""
        self.epoch, self.start = epoch, start

    def __len__(self):
        return max(0, self.n // (self.batch_size * self.world_size) - self.start) * self.batch_size

    def __iter__(self):
        generator = runtime.epoch_generator(self.seed, self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the base seed the old loader drew
        order = torch.randperm(self.n, generator=generator)
        per_step = self.batch_size * self.world_size
        mine = order[:self.n // per_step * per_step].view(-1, self.world_size, self.batch_size)[:, self.rank]
        return iter(mine[self.start:].flatten().tolist())


RANK_MATCH = "cut to another rank's smaller batch"  # data/skipped's reason for what distributed.Lockstep cut


def batch_rows(batch: Batch) -> int:
    return 0 if batch.images is None else len(batch.images)


def trim_batch(batch: Batch, n: int) -> Batch:
    """The batch cut to its first n samples; the rest count as skipped (another rank's batch was smaller)."""
    skipped = dict(batch.skipped)
    skipped[RANK_MATCH] = skipped.get(RANK_MATCH, 0) + batch_rows(batch) - n
    if n == 0:
        return Batch(None, None, skipped)
    return Batch(batch.images[:n], batch.tokens[:n], skipped)


class Sized:
    """An iterable with the length of the whole epoch (the loop plans steps from it)."""

    def __init__(self, batches, length: int):
        self.batches, self.length = batches, length

    def __len__(self):
        return self.length

    def __iter__(self):
        return iter(self.batches)


class SupersededEpoch(RuntimeError):
    """An epoch's batches read after a later train_batches call moved the loader to another epoch."""


class Latest:
    """The batches of one train_batches call, readable only while no later call has moved the shared
    loader and the source's epoch state (a persistent loader's one iterator, the workers' shared
    epoch): reading them after that raises SupersededEpoch instead of mixing two epochs' samples.
    is_latest() -> whether this is still the newest call's."""

    def __init__(self, batches, is_latest):
        self.batches, self.is_latest = batches, is_latest

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            if not self.is_latest():
                raise SupersededEpoch("train_batches: these batches were read after a later train_batches call "
                                      "moved the loader to another epoch (one epoch's batches at a time)")
            yield batch


class ReadPast(Sized):
    """A stream's batches after its first `skip`, read and dropped here (a stream cannot seek)."""

    def __init__(self, batches, skip: int, length: int):
        super().__init__(batches, length)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.skip, None)

