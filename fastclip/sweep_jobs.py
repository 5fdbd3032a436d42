"""How each job of a multirun ended, and the sweep's outcome from them.

Each job writes its outcome into its own job dir when it ends (Hydra's `on_job_end`, which runs
where the launcher runs the job: in the launching process, a Submitit worker or a SLURM node), so
the launching process can count them at the end whatever the launcher, and even when Hydra's
sweeper stopped early by raising the first failure.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig

OUTCOME_FILE = ".fastclip_job.json"


class JobFailed(Exception):
    """A job of a multirun that failed with a message that says what to do (a diverging run, a bad
    sample set, a config value only the data can check). An Exception, not SystemExit: Hydra's
    launchers record it as the job's failure and run the other jobs; Optuna marks the trial failed."""


@dataclass
class JobOutcome:
    num: int
    overrides: str
    status: str            # Hydra's JobStatus name: COMPLETED or FAILED
    error: str | None = None


def record(config: DictConfig, job_return) -> None:
    """Writes the ending job's outcome into its job dir (multirun jobs only)."""
    if str(config.hydra.mode) != "RunMode.MULTIRUN":
        return
    error = None
    status = getattr(job_return.status, "name", str(job_return.status))
    if status == "FAILED":
        exc = job_return._return_value  # Hydra keeps the exception there; .return_value would raise it
        error = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    outcome = JobOutcome(int(config.hydra.job.num), " ".join(config.hydra.overrides.task), status, error)
    out = Path(config.hydra.runtime.output_dir) / OUTCOME_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(outcome)))


def collect(sweep_dir: str | Path) -> list[JobOutcome]:
    """The outcomes the sweep's jobs recorded, by job number (a job killed before it ended has none)."""
    found = []
    for path in Path(sweep_dir).glob(f"**/{OUTCOME_FILE}"):
        try:
            found.append(JobOutcome(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(found, key=lambda o: o.num)


def summary(outcomes: list[JobOutcome]) -> str:
    """One line for the sweep, then one per failed job."""
    failed = [o for o in outcomes if o.status != "COMPLETED"]
    lines = [f"sweep: {len(outcomes)} jobs ended, {len(outcomes) - len(failed)} completed, {len(failed)} failed"]
    lines += [f"  job {o.num} ({o.overrides or 'no overrides'}) failed: {o.error}" for o in failed]
    return "\n".join(lines)
