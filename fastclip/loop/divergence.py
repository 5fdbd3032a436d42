"""The NaN guard's verdict: a non-finite loss, boundary or weight stops the run, keeping the last
good checkpoint (StepLog.drain reads the losses, CheckpointPolicy.save the weights)."""
from pathlib import Path


class TrainingDiverged(RuntimeError):
    pass


def diverged(what: str, checkpoint_path: Path):
    kept = f"last good checkpoint kept at {checkpoint_path}" if checkpoint_path.exists() else "no checkpoint written yet"
    raise TrainingDiverged(f"{what}; stopping; {kept}")
