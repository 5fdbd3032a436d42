"""Equal steps on every rank from shards dealt out to (rank, loader worker) (data.shards): which of
each worker's batches a rank takes, and the count of those it leaves out."""
from dataclasses import replace

LEFT_OUT = "left out for equal steps per rank"  # data/skipped's reason: a rank's batches past the fewest any rank makes


def taken_in_turn(counts: list[int], n: int) -> list[int]:
    """How many of each part's batches are among the first n that a loader takes from the parts in
    turn (part 0, 1, ..., 0, ...; a part that has run out passed over): counts = each part's
    batches, n <= sum(counts)."""
    lo, hi = 0, max(counts, default=0)  # the most whole rounds that fit in n (bisected: counts can be large)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(c, mid) for c in counts) <= n else (lo, mid - 1)
    rounds = lo
    taken = [min(c, rounds) for c in counts]
    rest = n - sum(taken)
    for k, c in enumerate(counts):  # the round cut short: the first parts that still have a batch
        if rest and c > rounds:
            taken[k] += 1
            rest -= 1
    return taken


class LeftOut:
    """An epoch's batches (data.pairs.Batch), its first carrying as skipped the n samples this rank
    left out so that every rank takes the same steps (ShardStream.left_out): counted once, as the
    epoch starts (a resume past its first batch has them in its checkpoint's counts)."""

    def __init__(self, batches, n: int):
        self.batches, self.n = batches, n

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            yield replace(batch, skipped={**batch.skipped, LEFT_OUT: batch.skipped.get(LEFT_OUT, 0) + self.n}) \
                if i == 0 else batch
