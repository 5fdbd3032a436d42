"""Where a checkpoint is, as every entry point that takes one reads it (trainer.resume, fastclip.infer
--checkpoint, compression.teacher, fastclip.load): a file, a run dir (its checkpoints/last.pt), or
runs:/<MLflow run id> (that run's last checkpoint, found through its `fastclip.run_dir` tag)."""
from pathlib import Path

from fastclip.checkpoint import CheckpointError
from fastclip.errors import InputNotFound

RUNS_PREFIX = "runs:/"


def checkpoint_path(spec: str | Path, uri: str | None = None) -> Path:
    """A checkpoint file from a path, a run dir (its checkpoints/last.pt) or `runs:/<MLflow run id>`
    (that run's last checkpoint, found through its `fastclip.run_dir` tag in the store `uri`, default
    as training's). Raises FileNotFoundError / CheckpointError naming what is missing."""
    spec = str(spec)
    if not spec.strip():
        raise CheckpointError("no checkpoint given: a checkpoint file, a run dir, or runs:/<MLflow run id>")
    if not spec.startswith(RUNS_PREFIX):
        path = Path(spec)
        if path.is_dir():  # a run dir: its last checkpoint
            inside = [p for p in (path / "checkpoints" / "last.pt", path / "last.pt") if p.is_file()]
            if not inside:
                raise CheckpointError(f"{path}: a directory without checkpoints/last.pt (not a fastclip run dir)")
            return inside[0]
        return path
    import mlflow
    from mlflow.exceptions import MlflowException
    from fastclip.store import TrackingStoreError, redacted, require_store, resolve_uri
    uri = resolve_uri(uri)
    run_id, _, rest = spec[len(RUNS_PREFIX):].strip("/").partition("/")
    if rest:
        raise CheckpointError(f"{spec}: runs:/<run id> names a run's last checkpoint; for another file of the run "
                              f"pass its path")
    try:
        require_store(uri, "--uri names the store the run is in")
    except TrackingStoreError as exc:
        raise CheckpointError(f"{spec}: {exc}") from None
    try:
        run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        raise CheckpointError(f"{spec}: no MLflow run {run_id!r} in {redacted(uri)} (--uri names the store it is "
                              f"in)") from None
    run_dir = run.data.tags.get("fastclip.run_dir")
    if run_dir is None:
        raise CheckpointError(f"{spec}: MLflow run {run_id} is not a fastclip training run (no fastclip.run_dir tag)")
    path = Path(run_dir) / "checkpoints" / "last.pt"
    if not path.is_file():
        raise InputNotFound(f"{spec}: the run's checkpoint {path} is not there (moved or deleted?)")
    return path
