"""Reading the runs a report is about from any MLflow store: one experiment's finished runs, or
one sweep's (the jobs whose `mlflow.parentRunId` is the sweep's parent run)."""
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from fastclip.tracking import redacted

SWEEP_ROLE = ("fastclip.role", "sweep")  # the tag fastclip's sweep parent runs carry


class ReportError(ValueError):
    """What the report was asked for is not in the store (names the experiment, sweep or metric)."""


@dataclass
class RunRecord:
    """One finished run as the report reads it: params are the flattened resolved config."""
    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: int
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]


@dataclass
class Selection:
    experiment: str
    uri: str
    runs: list[RunRecord]
    sweep_id: str | None = None  # the sweep parent run, where the runs are one sweep's
    sweep_name: str | None = None
    sweep_folder: str | None = None  # the sweep's Hydra dir as one folder name (2026-11-30_06-40-16)
    left_out: dict[str, int] = field(default_factory=dict)  # runs not FINISHED, by status


def select_runs(uri: str, experiment: str, sweep: str | None = None) -> Selection:
    """The FINISHED runs of `experiment` (sweep parents left out), or of one sweep: `sweep` is the
    parent run's id, "latest" (the experiment's newest sweep) or "all" (= None). Raises ReportError naming what is missing."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"--experiment {experiment!r}: no such experiment in {redacted(uri)} (it has {names})")
    runs = all_runs(client, exp.experiment_id)
    parent = None
    if sweep and sweep != "all":
        parents = [r for r in runs if r.data.tags.get(SWEEP_ROLE[0]) == SWEEP_ROLE[1]]
        if sweep == "latest":
            if not parents:
                raise ReportError(f"--sweep latest: experiment {experiment!r} in {redacted(uri)} has no sweep (a `-m` run); "
                                  f"--sweep all reports all its runs")
            parent = parents[-1]
        else:
            parent = next((r for r in parents if r.info.run_id == sweep), None)
            if parent is None:
                raise ReportError(f"--sweep {sweep}: not a sweep parent run of experiment {experiment!r} in {redacted(uri)}")
        runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    else:
        runs = [r for r in runs if r.data.tags.get(SWEEP_ROLE[0]) != SWEEP_ROLE[1]]
    left_out: dict[str, int] = {}
    for r in runs:
        if r.info.status != "FINISHED":
            left_out[r.info.status] = left_out.get(r.info.status, 0) + 1
    records = [RunRecord(r.info.run_id, r.info.run_name or r.info.run_id[:8], dict(r.data.params),
                         dict(r.data.metrics), dict(r.data.tags), r.info.start_time)
               for r in runs if r.info.status == "FINISHED"]
    if parent is None:
        return Selection(experiment, uri, records, left_out=left_out)
    sweep_dir = Path(parent.data.tags.get("fastclip.sweep_dir", parent.info.run_id))
    return Selection(experiment, uri, records, parent.info.run_id, parent.info.run_name,
                     "_".join(sweep_dir.parts[-2:]), left_out)


def all_runs(client, experiment_id: str) -> list:
    """Every run of the experiment, oldest first, page by page (a store caps one page)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"], max_results=1000,
                                  page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def load_histories(uri: str, runs: list[RunRecord], metrics: list[str]) -> None:
    """Each run's history of `metrics` (step, value), sorted by step, into run.history."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    for run in runs:
        for metric in metrics:
            if metric in run.metrics:
                points = {m.step: m.value for m in client.get_metric_history(run.run_id, metric)}
                run.history[metric] = sorted(points.items())  # a step retrained after a resume: its last value
