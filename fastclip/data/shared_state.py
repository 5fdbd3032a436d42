"""Epoch state that a training source's copies in persistent DataLoader workers see change.

DataLoader(persistent_workers=True) copies the dataset into each worker once, when the first epoch
starts; an attribute the training process sets later (the epoch, a resumed run's skip) would never
reach them. A `SharedInt` attribute lives in a one-element int64 tensor in shared memory
(torch.Tensor.share_memory_, which torch.multiprocessing passes to forked and spawned workers alike),
so `set_epoch` in the training process is what every worker reads for its next epoch."""
import torch


class SharedInt:
    """A dataset's integer attribute (int64) held in shared memory (a data descriptor). The first
    assignment, in the training process's __init__, allocates it; later ones write in place, where the
    workers read. A read costs a tensor read (~0.5 us; a few per sample). A shallow copy of the dataset
    shares the values, a deep copy holds its own, outside shared memory: set a copy's epoch before its
    workers start."""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_shared_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        try:
            return int(obj.__dict__[self.slot])
        except KeyError:
            raise AttributeError(f"{type(obj).__name__}.{self.slot[len('_shared_'):]} was never set") from None

    def __set__(self, obj, value: int) -> None:
        held = obj.__dict__.get(self.slot)
        if held is None:
            obj.__dict__[self.slot] = torch.tensor(int(value), dtype=torch.int64).share_memory_()
        else:
            held.fill_(int(value))
