"""When fit() writes its checkpoint and what goes in it beyond the trainer's state (the file format
is fastclip/checkpoint.py's): every trainer.ckpt_every_steps steps, at a stop, after each pass over
an epoch; never over the last good one with non-finite weights."""
from pathlib import Path

from fastclip import checkpoint, distributed, runtime
from fastclip.loop.divergence import diverged
from fastclip.loop.trainer import Trainer


class CheckpointPolicy:
    """run_dir/checkpoints/last.pt for `trainer`'s run. provenance: what it records beyond the training
    state and the run's identity (the config group choices)."""

    def __init__(self, trainer: Trainer, cfg, tracker, run_dir: Path, provenance: dict | None = None):
        self.trainer, self.every = trainer, cfg.trainer.ckpt_every_steps
        self.path = Path(run_dir) / "checkpoints" / "last.pt"
        self.extra = {"config": runtime.config_container(cfg), "run_dir": str(Path(run_dir).resolve()),
                      "mlflow_uri": getattr(tracker, "uri", None), "mlflow_run_id": getattr(tracker, "run_id", None),
                      **(provenance or {})}

    def due(self) -> bool:
        """Whether the step just taken is a trainer.ckpt_every_steps one."""
        return bool(self.every) and self.trainer.state.step % self.every == 0

    def save(self) -> None:
        save(self.trainer, self.path, self.extra)


def replace_weights(trainer: Trainer, path: Path) -> None:
    """The finished run's checkpoint given the weights and compression state the trainer holds now, the
    rest as written: a compression's finish changed them after the last save (a pruning schedule that
    ended later than the run, its final masks applied then), and the file must load the model the run's
    numbers are of. Rank 0 alone (no collective)."""
    state = checkpoint.load(path)
    state["model"] = trainer.model.state_dict()
    if (kept := trainer.compression.state_dict()) is not None:
        state["compression"] = kept
    checkpoint.save(path, state)


def save(trainer: Trainer, path: Path, extra: dict) -> None:
    """Replaces the last checkpoint, unless the weights have gone non-finite (then the last good
    one stays and the run stops). Data-parallel: every rank calls it, rank 0 writes, and no rank goes
    on (or exits) before the file is complete."""
    if not trainer.weights_finite():
        diverged(f"the weights are not finite after step {trainer.state.step}", path)
    trainer.state.gather_skips()
    state = trainer.state_dict()
    distributed.on_main(lambda: checkpoint.save(path, {**state, **extra}), f"writing the checkpoint {path}")
