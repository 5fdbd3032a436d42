"""MLflow: one store per project, created before jobs fan out; buffered metrics per run.

The default store is sqlite under outputs/ (mlflow 3 refuses the file store). A new sqlite
store crashes when several processes run its migrations at once, so the Hydra callback
below creates store + experiment once, in the launching process, before any job starts.
"""
import atexit
import logging
import os
import re
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fastclip import sweep_jobs
from fastclip.store import TrackingStoreError, check_writable, default_store_uri, redacted, resolve_uri

log = logging.getLogger(__name__)
PARENT_RUN_FILE = "mlflow_parent_run_id"
# "<sweep dir>::<parent run id>": set by the launching process, so jobs find their sweep's parent run
# through the environment they inherit (sbatch exports it) where they cannot see its sweep dir
PARENT_RUN_ENV = "FASTCLIP_SWEEP_PARENT"
# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, an assistant);
# with it, on the runs table
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# + a param's key: the value in effect now, where a resume changed it after the param was logged
EFFECTIVE_TAG = "fastclip.effective."


def sweep_parent(sweep_dir: str | os.PathLike) -> str | None:
    """The MLflow parent run of the sweep in `sweep_dir`: the one the launching process exported for
    this sweep dir, else the dir's marker file (which a later launch into the same dir replaces)."""
    where, _, run_id = os.environ.get(PARENT_RUN_ENV, "").partition("::")
    if run_id and where == str(Path(sweep_dir).resolve()):
        return run_id
    marker = Path(sweep_dir) / PARENT_RUN_FILE
    return marker.read_text().strip() if marker.exists() else None


def mark_model_training(client, experiment) -> None:
    """Tags an experiment as model training (EXPERIMENT_KIND) where it is not yet; cosmetic, so a
    store that refuses (a concurrent writer, a read-only server) only gets a warning."""
    if experiment.tags.get(EXPERIMENT_KIND[0]) == EXPERIMENT_KIND[1]:
        return
    try:
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    except Exception as exc:  # MLflow raises its own and the store's errors
        log.warning("could not tag MLflow experiment %r as model training: %s", experiment.name, exc)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: beside a local sqlite store (<store dir>/artifacts/
    <experiment>), not MLflow's default ./mlruns under whatever directory the run was launched from.
    None for remote stores (their server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts" / folder).as_uri()


def ensure_store(uri: str, experiment: str) -> str:
    """Create (or open) the store and the experiment; returns the experiment id."""
    import mlflow
    check_writable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        found = client.get_experiment_by_name(experiment)
    except Exception as exc:  # a folder the permission check passed but the store cannot be made in (root on /proc)
        if not (isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("sqlalchemy", "mlflow")):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TrackingStoreError(f"tracking.uri={redacted(uri)!r}: cannot open the MLflow store: {reason}") from None
    if found is not None:
        _warn_if_artifacts_elsewhere(uri, found)
        mark_model_training(client, found)  # made before fastclip set it
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=artifact_location(uri, experiment),
                                        tags=dict([EXPERIMENT_KIND]))
    except Exception:  # another process won the race: take theirs
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


_WARNED: set[tuple[str, str]] = set()


def _warn_if_artifacts_elsewhere(uri: str, experiment) -> None:
    """Experiments made before artifacts moved beside the store keep MLflow's ./mlruns location:
    say once per process where their artifacts go."""
    wanted = artifact_location(uri, experiment.name)
    if (uri, experiment.name) in _WARNED:
        return
    _WARNED.add((uri, experiment.name))
    if wanted and not experiment.artifact_location.startswith(wanted.rsplit("/", 1)[0]):
        log.warning("MLflow experiment %r keeps its artifacts at %s (it predates fastclip storing them beside the "
                    "store, under %s)", experiment.name, experiment.artifact_location, wanted.rsplit("/", 1)[0])


def require_run(uri: str, run_id: str | None, checkpoint_path) -> None:
    """A resumed run must exist in the store it writes to (checked before the run is touched)."""
    if run_id is None:
        return
    import mlflow
    from mlflow.exceptions import MlflowException
    from fastclip.checkpoint import ResumeError
    try:
        mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as exc:
        raise ResumeError(f"{checkpoint_path}: its MLflow run {run_id} is not in the store {uri}; pass "
                          f"tracking.uri=<the store the run was created in>") from exc


def ui_hint(uri: str, tracker) -> str:
    """How to look at the run in the MLflow UI: a command that prints this run's page."""
    from fastclip import PROJECT_ROOT
    if uri == default_store_uri(PROJECT_ROOT):
        return f"view it with `make ui RUN={tracker.run_id}`"
    return f"view it with `python -m fastclip.ui --run {tracker.run_id} --uri {redacted(uri)}`"


def flatten(cfg) -> dict[str, str]:
    """Resolved config as MLflow params: trainer.lr, epochs, boundary.name, ..."""
    from fastclip.config import flatten as flat
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return {key: str(value)[:6000] for key, value in flat(container).items()}


class Tracker:
    """One MLflow run. Metrics are buffered and sent in batches (train/loss every N steps)."""

    def __init__(self, uri: str, experiment: str, run_name: str | None = None, tags: dict | None = None,
                 run_id: str | None = None):
        import mlflow
        self.uri = uri
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        if run_id is None:
            self.experiment_id = ensure_store(uri, experiment)
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
            self.run_id, self.status_before = run.info.run_id, None
        else:  # resume: keep writing into the same run
            self.run_id = run_id
            reopened = self.client.get_run(run_id).info
            self.experiment_id, self.status_before = reopened.experiment_id, reopened.status
            self.client.update_run(run_id, status="RUNNING")
        self._buffer, self._pending = [], []

    def log_params(self, params: dict[str, str]) -> None:
        """Logs the params the run lacks. MLflow params cannot change once logged, so where a resumed
        part runs with another value (trainer.max_steps extended, a new lr), the value in effect goes
        into the tag EFFECTIVE_TAG + key instead, in the store itself (the report reads it there)."""
        from mlflow.entities import Param, RunTag
        data = self.client.get_run(self.run_id).data
        items = [Param(k, v) for k, v in params.items() if k not in data.params]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        tags = [RunTag(EFFECTIVE_TAG + k, v) for k, v in params.items()
                if k in data.params and data.tags.get(EFFECTIVE_TAG + k, data.params[k]) != v]
        for i in range(0, len(tags), 100):
            self.client.log_batch(self.run_id, tags=tags[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_metrics(self, metrics: dict[str, float], step: int, flush: bool = True) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if flush:
            self.flush()

    def flush(self) -> None:
        """Sends the buffered metrics in the background (MLflow's async logging): a synchronous
        sqlite commit took ~100 ms, ~4% of a vit_tiny step at log_every=10. end() waits for them."""
        for i in range(0, len(self._buffer), 500):
            self._pending.append(self.client.log_batch(self.run_id, metrics=self._buffer[i:i + 500], synchronous=False))
        self._buffer = []

    def wait(self) -> None:
        """Blocks until every metric sent so far is in the store (raises what the store raised)."""
        for operation in self._pending:
            operation.wait()
        self._pending = []

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.wait()
        self.client.set_terminated(self.run_id, status=status)

    def end_failed(self, exc: BaseException, trained: bool) -> None:
        """Ends the run after `exc`: KILLED (a stop signal, Ctrl-C, a requeue) or FAILED; but a FINISHED
        run reopened to evaluate or extend that failed before training a step is left FINISHED, as it
        was (the failure is in the tag fastclip.reopen_failed): its records are those of a finished run."""
        if self.status_before == "FINISHED" and not trained:
            self.set_tags({"fastclip.reopen_failed": f"{type(exc).__name__}: {exc}"[:5000]})
            self.end("FINISHED")
        else:
            self.end("KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED")


def sweep_run_name(overrides: str, sweep_dir: Path, limit: int = 200) -> str:
    """A sweep's parent run is named after what it swept ("sweep boundary=none,fixed seed=0,1"), so
    sweeps can be told apart in the UI's runs table; its dir's time where the command line set nothing."""
    name = f"sweep {overrides}" if overrides else f"sweep {sweep_dir.parent.name} {sweep_dir.name}"
    return name if len(name) <= limit else name[:limit - 3] + "..."


def _jobs_metrics(client, parent: str) -> dict[int, dict[str, float]]:
    """The last metric values of a sweep's job runs, by Hydra job number (its hydra.job.num tag)."""
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=10000)
    return {int(r.data.tags["hydra.job.num"]): dict(r.data.metrics) for r in runs if "hydra.job.num" in r.data.tags}


class MlflowStoreCallback(Callback):
    """Creates store + experiment once before a multirun fans out, plus a parent run for the sweep.
    A single run creates its own (in run(), after its config is checked: a config mistake fails
    before MLflow loads or a store appears)."""

    def _setup(self, config: DictConfig) -> tuple[str, str]:
        uri = resolve_uri(config.tracking.uri)
        return uri, ensure_store(uri, config.tracking.experiment)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        import mlflow
        uri, experiment_id = self._setup(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        client = mlflow.MlflowClient(tracking_uri=uri)
        overrides = " ".join(config.hydra.overrides.task)
        parent = client.create_run(experiment_id, run_name=sweep_run_name(overrides, sweep_dir),
                                   tags={"fastclip.sweep_dir": str(sweep_dir.resolve()), "fastclip.role": "sweep",
                                         "fastclip.sweep_overrides": overrides})
        (sweep_dir / PARENT_RUN_FILE).write_text(parent.info.run_id)
        os.environ[PARENT_RUN_ENV] = f"{sweep_dir.resolve()}::{parent.info.run_id}"
        # Hydra's sweepers raise a failed job's error after its batch and then skip on_multirun_end:
        # the parent still gets its status when the process exits
        self._ended = False
        atexit.register(self._end_sweep, config)
        total = sweep_jobs.planned_jobs(config)
        sweep_jobs.write_plan(sweep_dir, total)
        log.info("MLflow store %s, sweep parent run %s; %s jobs", uri, parent.info.run_id,
                 total if total is not None else "an unknown number of")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        where = sweep_jobs.position(config.hydra)
        if where:
            log.info("sweep: %s starts: %s", where, " ".join(config.hydra.overrides.task) or "no overrides")

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        sweep_jobs.record(config, job_return)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed = self._end_sweep(config)
        if failed:  # e.g. Optuna went on past failed trials: the exit code still says so
            raise SystemExit(f"error: {failed} job(s) of the sweep failed (above)")

    def _end_sweep(self, config: DictConfig) -> int:
        """Ends the sweep's parent run FINISHED, or FAILED with the count of failed jobs; -> that count."""
        if getattr(self, "_ended", True):
            return 0
        self._ended = True
        import mlflow
        outcomes = sweep_jobs.collect(config.hydra.sweep.dir)
        failed = len(sweep_jobs.failed_jobs(outcomes))
        log.info("%s", sweep_jobs.summary(outcomes))
        parent = sweep_parent(config.hydra.sweep.dir)
        os.environ.pop(PARENT_RUN_ENV, None)
        if parent:
            client = mlflow.MlflowClient(tracking_uri=resolve_uri(config.tracking.uri))
            client.set_tag(parent, "fastclip.sweep.jobs", len(outcomes))
            client.set_tag(parent, "fastclip.sweep.failed_jobs", failed)
            client.set_terminated(parent, status="FAILED" if failed else "FINISHED")
            log.info("the sweep's jobs:\n%s", sweep_jobs.results_table(outcomes, _jobs_metrics(client, parent)))
        log.info("%s", sweep_jobs.next_steps(config.tracking.experiment, parent))
        return failed
