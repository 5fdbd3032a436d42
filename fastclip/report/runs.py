"""Reading the runs a report is about from any MLflow store: one experiment's finished runs, or
one sweep's (the jobs whose `mlflow.parentRunId` is the sweep's parent run). Each run as it ended:
its config in effect after every resume, and the code version of each of its parts, all read from
the store's params and tags (fastclip.tracking, fastclip.train), so a store alone is enough."""
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from fastclip.errors import InputError
from fastclip.schema.resume_rules import missing_legacy
from fastclip.store import redacted
from fastclip.tracking import EFFECTIVE_TAG

SWEEP_ROLE = ("fastclip.role", "sweep")  # the tag fastclip's sweep parent runs carry


class ReportError(InputError):
    """What the report was asked for is not in the store (names the experiment, sweep or metric)."""


@dataclass(frozen=True)
class CodePart:
    """The code one part of a run (its start, or a resume) ran: a git commit, and whether the
    checkout had uncommitted changes (None: not recorded)."""
    commit: str
    dirty: bool | None

    @property
    def label(self) -> str:
        short = self.commit[:7] if re.fullmatch(r"[0-9a-f]{40}", self.commit) else self.commit
        return short + ("+dirty" if self.dirty else "")


@dataclass(frozen=True)
class CodeVersion:
    """The code a run ran, part by part (repeats of the previous part's left out): one part for a
    run never resumed, or resumed on the same code."""
    parts: tuple[CodePart, ...]

    @property
    def label(self) -> str:
        """e.g. "1a2b3c4", "1a2b3c4+dirty", "1a2b3c4 -> 5d6e7f8" (resumed on newer code)."""
        return " -> ".join(p.label for p in self.parts)


@dataclass(frozen=True)
class ResumePart:
    """One resume of a run: from which step (-1: not recorded), and the config keys it set, as
    (key, value from then on) sorted by key."""
    number: int
    from_step: int
    set: tuple[tuple[str, str], ...]


@dataclass
class RunRecord:
    """One finished run as the report reads it: params are the flattened resolved config in effect
    when it ended (a resume's changes applied: MLflow keeps the first part's params, fastclip the
    values in effect as tags, tracking.EFFECTIVE_TAG); first_params what its first part ran with."""
    run_id: str
    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    start_time: int
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    first_params: dict[str, str] | None = None  # None: params (never resumed with a change)

    @property
    def code(self) -> CodeVersion:
        """Its git commit and dirty flag, part by part (mlflow.source.git.commit and fastclip.git_dirty,
        then each resume's fastclip.resume.<n>.git_commit / .git_dirty); "unknown" where not recorded."""
        parts = [_code_part(self.tags.get("mlflow.source.git.commit"), self.tags.get("fastclip.git_dirty"))]
        for n in range(1, _resume_count(self.tags) + 1):
            part = _code_part(self.tags.get(f"fastclip.resume.{n}.git_commit"),
                              self.tags.get(f"fastclip.resume.{n}.git_dirty"))
            if part != parts[-1]:
                parts.append(part)
        return CodeVersion(tuple(parts))

    @property
    def resumes(self) -> list[ResumePart]:
        return resume_parts(self.tags)


def resume_parts(tags: dict[str, str]) -> list[ResumePart]:
    """A run's resumes in order, from its fastclip.resume.<n>.* tags: the keys each set are its
    .set.<key> tags; a run resumed before fastclip wrote those has only its .changes text
    ("k: a -> b; k2: c -> d"), read as well as it can be (a value holding "; x: " or " -> " is misread)."""
    out = []
    for n in range(1, _resume_count(tags) + 1):
        prefix = f"fastclip.resume.{n}."
        step = tags.get(prefix + "from_step", "")
        if prefix + "git_dirty" in tags:  # written by the fastclip that records .set.<key>
            changed = {k.removeprefix(prefix + "set."): v for k, v in tags.items() if k.startswith(prefix + "set.")}
        else:
            text = tags.get(prefix + "changes", "")
            pairs = [item.partition(": ") for item in re.split(r"; (?=[\w.]+: )", text)] \
                if text and text != "nothing changed" else []
            changed = {key: value.rpartition(" -> ")[2] for key, _, value in pairs}
        out.append(ResumePart(n, int(step) if step.isdigit() else -1, tuple(sorted(changed.items()))))
    return out


def _resume_count(tags: dict[str, str]) -> int:
    count = tags.get("fastclip.resumes", "0")
    return int(count) if count.isdigit() else 0


def _code_part(commit: str | None, dirty: str | None) -> CodePart:
    return CodePart(commit or "unknown", {"True": True, "False": False}.get(dirty or ""))


def effective_params(params: dict[str, str], tags: dict[str, str]) -> dict[str, str]:
    """The run's params (its first part's) with the values its resumes put in effect: each resume's
    keys in turn, then the values in effect that tracking.Tracker.log_params recorded
    (tracking.EFFECTIVE_TAG + key; every param a later part logged with another value)."""
    out = dict(params)
    for part in resume_parts(tags):
        out.update(part.set)
    out.update({k.removeprefix(EFFECTIVE_TAG): v for k, v in tags.items() if k.startswith(EFFECTIVE_TAG)})
    # a key added since the run, with a legacy value (schema/fields.py): what the run ran with
    return out | {k: str(v) for k, v in missing_legacy(out).items()}


def canonical(params: dict[str, str]) -> dict[str, str]:
    """Numbers written one way: "1.0" and "1" (a float field's value, as fastclip's typed config logs
    it, and the same value from before it was typed) both read "1", "5e-4" reads "0.0005"."""
    def number(value: str) -> str:
        try:
            x = float(value)
        except ValueError:
            return value
        if value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity") or x != x:
            return value
        return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)
    return {k: number(v) for k, v in params.items()}


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
                elsewhere = _or_none(latest_sweep_experiment, uri)
                raise ReportError(f"--sweep latest: experiment {experiment!r} in {redacted(uri)} has no sweep (a `-m` run); "
                                  + (f"the newest sweep is in experiment {elsewhere!r} (--experiment {elsewhere}); "
                                     if elsewhere else "") + "--sweep all reports all its runs")
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
    records = [RunRecord(r.info.run_id, r.info.run_name or r.info.run_id[:8],
                         canonical(effective_params(r.data.params, r.data.tags)), dict(r.data.metrics),
                         dict(r.data.tags), r.info.start_time, first_params=canonical(r.data.params))
               for r in runs if r.info.status == "FINISHED"]
    if parent is None:
        return Selection(experiment, uri, records, left_out=left_out)
    sweep_dir = Path(parent.data.tags.get("fastclip.sweep_dir", parent.info.run_id))
    return Selection(experiment, uri, records, parent.info.run_id, parent.info.run_name,
                     "_".join(sweep_dir.parts[-2:]), left_out)


def _or_none(find, *args):
    try:
        return find(*args)
    except ReportError:
        return None


def latest_sweep_experiment(uri: str) -> str:
    """The experiment that holds the newest sweep (a `-m` run's parent) in the store, whatever its
    tracking.experiment: what `make report` reports after `make sweep`. Raises ReportError when the
    store has no sweep."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    newest = client.search_runs(ids, filter_string=f"tags.`{SWEEP_ROLE[0]}` = '{SWEEP_ROLE[1]}'",
                                order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not newest:
        raise ReportError(f"--sweep latest: no sweep (a `-m` run) in {redacted(uri)}; --experiment NAME --sweep all "
                          f"reports single runs")
    return client.get_experiment(newest[0].info.experiment_id).name


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
