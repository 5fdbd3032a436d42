"""Evaluation shared out over the ranks of a data-parallel run: inside `together()`, every rank
evaluates the same sets, each encoding every W-th batch of eval.batch_size items (`shard`,
`batch_ranges`), and the pieces (features, hit counts) are put back together in the set's order on
every rank (`gather`). The batches are the ones a single process makes, item for item, so the numbers
equal one process's. Outside `together()` (one process; rank 0 alone, e.g. compression's measures
after the other ranks finished) `shard` is the whole set and `gather` a one-element list.

A rank whose share fails tells the others in whatever exchange they wait in (each exchange carries
(status, value)), so they raise RankFailed instead of waiting for the host group's timeout."""
import contextlib
from dataclasses import dataclass

from torch.utils.data import Dataset, Subset

from fastclip import distributed
from fastclip.distributed import RankFailed, World

_world = World()  # the ranks evaluating together now; World() (one process) outside together()
_what = "the evaluation"  # together()'s, named where a rank's failure is reported


@dataclass(frozen=True)
class _Piece:
    """One rank's part of an exchange: its value, or why it failed (then value is None)."""
    value: object = None
    failed: str | None = None


def world() -> World:
    """The ranks sharing the evaluation running now (World() when this process evaluates alone)."""
    return _world


def together(fn, what: str):
    """fn() on every rank with the evaluation sets sharded over them (each rank must call this, in
    the same order) -> rank 0's result on every rank (as distributed.on_main: its timings and counts).
    A failure on one rank raises RankFailed on the others (naming `what` and the rank's error), after
    at most the exchange they are in."""
    global _world, _what
    if not distributed.current().distributed or _world.size > 1:  # one process, or already together
        return fn()
    _world, _what = distributed.current(), what
    try:
        # every rank done: a failure after the last gather (a picture) reaches the others here
        result = _exchange(_Piece(fn()))[0].value
    except RankFailed:
        raise  # another rank's, already exchanged
    except BaseException as exc:
        distributed.gather(_Piece(failed=f"{type(exc).__name__}: {exc}"))  # this rank's error is the one raised
        raise
    finally:
        _world = World()
    return result


@contextlib.contextmanager
def alone():
    """Inside, this rank evaluates whole sets itself (for a measure that needs the whole set in one
    process: the placement control deranges boundaries over the set); every rank then gets them."""
    global _world
    saved, _world = _world, World()
    try:
        yield
    finally:
        _world = saved


def batch_ranges(n: int, batch_size: int) -> list[tuple[int, range]]:
    """This rank's batches of a set of n items read in batches of batch_size: (batch index, item
    positions) for batches rank, rank + W, rank + 2W ... (all of them in one process)."""
    w = _world
    return [(b, range(b * batch_size, min(n, (b + 1) * batch_size)))
            for b in range(w.rank, -(-n // batch_size), w.size)]


def shard(dataset: Dataset, batch_size: int) -> Dataset:
    """This rank's items of `dataset`, in order: read in batches of batch_size they make exactly the
    batches batch_ranges names (only a set's last batch can be short, and it is last in its shard)."""
    if _world.size == 1:
        return dataset
    return Subset(dataset, [i for _, items in batch_ranges(len(dataset), batch_size) for i in items])


def gather(value) -> list:
    """Every rank's `value` (picklable; tensors on the CPU), in rank order, on every rank; [value]
    in one process. Raises RankFailed where a rank failed instead of sending its value."""
    if _world.size == 1:
        return [value]
    return [piece.value for piece in _exchange(_Piece(value))]


def _exchange(piece: _Piece) -> list[_Piece]:
    pieces = distributed.gather(piece)
    for rank, other in enumerate(pieces):
        if other.failed is not None and rank != _world.rank:
            raise RankFailed(f"{_what} failed on rank {rank}: {other.failed}")
    return pieces
