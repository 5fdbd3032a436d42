"""How each job of a multirun ended, the sweep's outcome from them, and its progress as it runs.

Each job writes its outcome into its own job dir when it ends (Hydra's `on_job_end`, which runs
where the launcher runs the job: in the launching process, a Submitit worker or a SLURM node), so
the launching process can count them at the end whatever the launcher, and even when Hydra's
sweeper stopped early by raising the first failure. The sweep's planned job count is written into
the sweep dir at its start (PLAN_FILE), so a job on any node can say "job 3 of 6, 2 done".
"""
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import DictConfig

from fastclip.eval.names import COST_METRICS, HEADLINE_METRICS, OBJECTIVE_METRICS

OUTCOME_FILE = ".fastclip_job.json"
PLAN_FILE = ".fastclip_sweep.json"
log = logging.getLogger("fastclip")


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
    total, ended, failed = progress(config.hydra.sweep.dir)
    log.info("sweep: job %d %s; %d of %s jobs ended%s", outcome.num, status.lower(), ended, total or "?",
             f" ({failed} failed)" if failed else "")


def collect(sweep_dir: str | Path) -> list[JobOutcome]:
    """The outcomes the sweep's jobs recorded, by job number (a job killed before it ended has none)."""
    found = []
    for path in Path(sweep_dir).glob(f"**/{OUTCOME_FILE}"):
        try:
            found.append(JobOutcome(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(found, key=lambda o: o.num)


def planned_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep will run: the product of the discrete sweeps of hydra.sweeper.params and
    the command line (a key in both: the command line's, as Hydra's basic sweeper takes it) for the
    basic sweeper, hydra.sweeper.n_trials for Optuna; None where it cannot be known up front (an
    interval sweep under another sweeper, a sweep the parser cannot expand alone, such as glob())."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    sweeper = config.hydra.sweeper
    if "n_trials" in sweeper:
        return int(sweeper.n_trials)
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = sweeper.get("params") or {}
    given = [*(f"{k}={v}" for k, v in params.items()), *config.hydra.overrides.task]
    try:
        last = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(given)}
        total = 1
        for override in last.values():
            if override.is_sweep_override():
                if not override.is_discrete_sweep():
                    return None
                total *= len(list(override.sweep_string_iterator()))
    except Exception:  # a progress count must never stop a sweep (glob() needs Hydra's config loader)
        return None
    return total


def write_plan(sweep_dir: str | Path, total: int | None) -> None:
    Path(sweep_dir, PLAN_FILE).write_text(json.dumps({"jobs": total}))


def progress(sweep_dir: str | Path) -> tuple[int | None, int, int]:
    """(planned jobs or None, jobs ended, of them failed), read from the sweep dir."""
    try:
        total = json.loads(Path(sweep_dir, PLAN_FILE).read_text())["jobs"]
    except (OSError, ValueError, KeyError, TypeError):
        total = None
    ended = collect(sweep_dir)
    return total, len(ended), len(failed_jobs(ended))


def position(hydra: DictConfig | None = None) -> str:
    """A running job's place in its sweep, "job 2 (3 of 6; 2 done)", read from the sweep dir: the job's
    number is Hydra's (its job dir's name, from 0), then its place counting from 1 ("job 2 (2 done)"
    where the total is unknown; "" outside a multirun). hydra: the `hydra` node of a job's config
    (default: HydraConfig's, where a Hydra job is running)."""
    if hydra is None:
        from hydra.core.hydra_config import HydraConfig
        if not HydraConfig.initialized():
            return ""
        hydra = HydraConfig.get()
    if str(hydra.mode) != "RunMode.MULTIRUN":
        return ""
    total, ended, failed = progress(hydra.sweep.dir)
    num = int(hydra.job.num)
    done = f"{ended} done" + (f", {failed} failed" if failed else "")
    return f"job {num} ({num + 1} of {total}; {done})" if total else f"job {num} ({done})"


def failed_jobs(outcomes: list[JobOutcome]) -> list[JobOutcome]:
    """The jobs that did not complete (failed, or killed before they recorded an end)."""
    return [o for o in outcomes if o.status != "COMPLETED"]


def summary(outcomes: list[JobOutcome]) -> str:
    """One line for the sweep, then one per failed job."""
    failed = failed_jobs(outcomes)
    lines = [f"sweep: {len(outcomes)} jobs ended, {len(outcomes) - len(failed)} completed, {len(failed)} failed"]
    lines += [f"  job {o.num} ({o.overrides or 'no overrides'}) failed: {o.error}" for o in failed]
    return "\n".join(lines)


# a sweep's end table: COST_METRICS' (column title, format), shown where some job logged the metric
COST_COLUMNS = tuple(zip(("train GFLOPs/sample (run mean)", "train s"), COST_METRICS, ("{:.4g}", "{:.0f}"), strict=True))


def results_table(outcomes: list[JobOutcome], metrics: dict[int, dict[str, float]]) -> str:
    """The sweep's jobs, one row each (job number, status, overrides), with the headline metrics their
    MLflow runs logged (`metrics`: job number -> the run's last values): the objective (a validation
    metric, what a sweeper optimises), the test metric reported last, the counted training compute and
    the training time. A Markdown table, readable as text."""
    logged = {k for m in metrics.values() for k in m}
    columns = [(name, name, "{:.4f}") for name in (next((n for n in OBJECTIVE_METRICS if n in logged), None),
                                                   next((n for n in HEADLINE_METRICS if n in logged), None)) if name]
    columns += [c for c in COST_COLUMNS if c[1] in logged]
    shared = set.intersection(*(set(o.overrides.split()) for o in outcomes)) if len(outcomes) > 1 else set()
    lines = ["| job | status | overrides" + (" (the swept ones)" if shared else "") + " | "
             + " | ".join(title for title, _, _ in columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for o in outcomes:
        values = metrics.get(o.num, {})
        cells = [fmt.format(values[key]) if key in values else "-" for _, key, fmt in columns]
        swept = " ".join(w for w in o.overrides.split() if w not in shared)
        lines.append(f"| {o.num} | {o.status} | {swept or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def next_steps(experiment: str, parent_run_id: str | None) -> str:
    """What to run after a sweep to compare its jobs: the exact report and UI commands."""
    sweep = f" --sweep {parent_run_id}" if parent_run_id else ""
    return (f"the sweep's runs are in MLflow experiment {experiment!r}" + (f" under parent run {parent_run_id}" if parent_run_id else "")
            + f"; compare them:\n  make report ARGS=\"--experiment {experiment}{sweep}\"   (table, Pareto plot, curves; plain "
              f"`make report` takes the newest sweep)\n  make ui   (the newest sweep's runs in MLflow, its options and headline metrics as columns)")
