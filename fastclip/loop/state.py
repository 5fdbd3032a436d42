"""Where a run is beyond its weights (TrainState): steps, the data position within the epoch,
samples seen and skipped, the random generators; what a checkpoint needs to continue exactly."""
from collections import Counter
from dataclasses import dataclass, field, fields

from fastclip import distributed, runtime
from fastclip.tasks.protocol import StepOutput


@dataclass
class TrainState:
    """Where a run is, beyond its weights: what a checkpoint needs to continue exactly."""
    step: int = 0                # optimizer steps taken
    epoch: int = 0               # the epoch in progress (= epochs completed)
    batch_in_epoch: int = 0      # loader batches of `epoch` consumed; a resume starts after them
    steps_in_epoch: int = 0
    samples_in_epoch: int = 0    # samples of `epoch` that reached an optimizer step
    samples_seen: int = 0
    train_s: float = 0.0         # data loading + steps, not evaluation
    skipped: dict = field(default_factory=dict)   # reason -> samples left out so far (data/skipped)
    trained_fraction: float | None = None         # last complete epoch: trained / declared samples
    rng: dict | list | None = None  # Python, numpy, torch (and CUDA) generators as of the last save (a list: by rank)
    world_size: int = 1          # data-parallel processes (the data split and the RNG states depend on it)
    train_gflops: float | None = None  # training GFLOPs per sample, the last count (loop/compute.py)
    train_pflops: float = 0.0    # training compute so far, all ranks (PFLOPs)
    reduced: dict | None = None  # trainer.full_token_steps: the model's quality just before the phase

    def count(self, out: StepOutput) -> None:
        """A loader batch consumed: its skips count now, its samples once their step is taken."""
        self.batch_in_epoch += 1
        self.skip(out.skipped)

    def skip(self, counts: dict) -> None:
        for reason, n in counts.items():
            if n:
                self.skipped[reason] = self.skipped.get(reason, 0) + n

    def stepped(self, samples: int) -> None:
        self.step += 1
        self.steps_in_epoch += 1
        self.samples_in_epoch += samples
        self.samples_seen += samples

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = self.steps_in_epoch = self.samples_in_epoch = 0

    def state_dict(self) -> dict:
        """Every rank's generators (a collective when data-parallel: every rank calls it)."""
        rng = distributed.gather(runtime.rng_state())
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"rng": rng if len(rng) > 1 else rng[0]}

    def gather_skips(self) -> None:
        """Data-parallel: every rank's skip counts added into rank 0's (the one that saves and logs them);
        the others start counting afresh (a collective: every rank calls it)."""
        counts = distributed.gather(self.skipped)
        if len(counts) > 1:
            self.skipped = dict(sum(map(Counter, counts), Counter())) if distributed.current().main else {}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TrainState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})
