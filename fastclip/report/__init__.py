"""make report: compare runs from any MLflow store as a table, a Pareto plot and training curves.

    python -m fastclip.report --experiment NAME [--sweep PARENT_RUN_ID|latest|all] [--out DIR]
                              [--metric METRIC] [--cost COST] [--uri URI]
                              [--pool-versions] [--x step|compute]

--metric defaults to the runs' headline (zeroshot/top1; retrieval/i2t_r1 without a zero-shot set; a
char LM's lm/test_bpc), --cost to efficiency/image_gflops (a char LM's: efficiency/train_gflops_mean).
Writes DIR/report.md (one row per group of runs that differ only in seed: mean ± std, n; a run is
its config in effect after every resume, and runs of different code versions, git commit and dirty
flag, are different groups unless --pool-versions),
DIR/report.csv (one row per run), DIR/pareto.png (the metric against the cost, the frontier
marked, with a chance line for a top-K accuracy; a lower cost is better) and DIR/curves.png (the
training objective, train/contrastive_loss, or train/bpc for a char LM, train/loss for an older run;
each DTP tower's boundary loss in its own panel where logged; and the metric's per-epoch validation
twin over steps, eval.names.val_name: val/zeroshot_top1 for zeroshot/top1, which itself is logged once, on
the test split, at the run's end; a run without the twin, an older one, plots the metric). Where the runs are one sweep's,
the four files are also logged as artifacts of the sweep's parent run (under report/).
--x compute draws the curves against the runs' counted training compute (efficiency/train_pflops_total)
instead of steps: methods compared at equal compute; --cost efficiency/train_gflops_mean puts the
whole model's training GFLOPs per sample, averaged over the run (its compute over its samples: a
full-token phase and a learned predictor's drift included), on the Pareto plot's axis
(efficiency/train_gflops is one batch's count, the last).
"""
import argparse
from dataclasses import dataclass
from pathlib import Path

from fastclip.errors import one_line_errors
from fastclip.eval.names import CLASS_COUNT_METRIC, HEADLINE_METRICS, chance_level, val_name
from fastclip.report.plots import CurvePanel
from fastclip.report.runs import ReportError, Selection, latest_sweep_experiment, load_histories, select_runs
from fastclip.report.table import Group, group_by_seed, markdown, measured, write_csv
from fastclip.store import redacted

FILES = ("report.md", "report.csv", "pareto.png", "curves.png")
COMPUTE = "efficiency/train_pflops_total"  # --x compute: the curves' x axis
# --cost by default: the first some run logged (a CLIP's image tower at inference, else a char LM's training)
COSTS = ("efficiency/image_gflops", "efficiency/train_gflops_mean")
# the curves' first panel, the objective alone (train/loss adds weighted auxiliary losses, whose scale can
# squash it): each run plots the first name it logged
OBJECTIVE = ("train/contrastive_loss", "train/bpc", "train/loss")
# auxiliary losses, a panel each, drawn where some run logged them
AUXILIARY = (("train/boundary_loss_image", "train/boundary_loss"), ("train/boundary_loss_text",))


@dataclass
class Report:
    selection: Selection
    groups: list[Group]
    frontier: list[Group]
    text: str
    out: Path
    curves: list[CurvePanel]  # what each panel of curves.png plotted
    chance: float | None = None  # what guessing scores on the metric (its dashed line), where known


def build_report(uri: str, experiment: str, out: Path | None = None, sweep: str | None = None,
                 metric: str | None = None, cost: str | None = None,
                 pool_versions: bool = False, x: str = "step") -> Report:
    """Reads the runs, writes the four files into `out` (default outputs/reports/<experiment>/<the
    sweep's dir, or all>), logs them to the sweep's parent run. metric, cost: None takes the first of
    HEADLINE_METRICS, COSTS some run logged (a char LM's sweep: lm/test_bpc against its training
    GFLOPs). pool_versions: runs of different code versions may share a group (table.group_by_seed).
    Raises ReportError naming what is missing."""
    from fastclip.report.plots import curves_plot, pareto_plot
    selection = select_runs(uri, experiment, sweep)
    if not selection.runs:
        raise ReportError(f"experiment {experiment!r}{_scope(selection)} in {redacted(uri)}: no FINISHED run"
                          + (f" ({_counts(selection.left_out)})" if selection.left_out else ""))
    metric = metric or _first_measured(selection.runs, HEADLINE_METRICS, "--metric")
    cost = cost or _first_measured(selection.runs, COSTS, "--cost")
    for flag, name in (("--metric", metric), ("--cost", cost)):
        if not any(name in measured(r) for r in selection.runs):  # measured: a derived value too
            logged = sorted({m for r in selection.runs for m in r.metrics if "/" in m})
            raise ReportError(f"{flag} {name}: no run logged it (they logged {logged})")
    out = out or Path("outputs") / "reports" / experiment / (selection.sweep_folder or "all")
    out.mkdir(parents=True, exist_ok=True)
    # the metric's per-epoch series is its validation twin; the metric itself may be one final point
    curve = (val_name(metric), metric)
    x_metric = {"step": None, "compute": COMPUTE}[x]
    load_histories(uri, selection.runs, [*OBJECTIVE, *(n for names in AUXILIARY for n in names), *curve,
                                         *([x_metric] if x_metric else [])])
    groups = group_by_seed(selection.runs, pool_versions)
    title = f"{experiment}{_scope(selection)}: {len(selection.runs)} runs in {len(groups)} groups"
    chance = chance_level(metric, common_value(selection.runs, CLASS_COUNT_METRIC))
    frontier = pareto_plot(groups, metric, cost, out / "pareto.png", title, chance)
    auxiliary = [names for names in AUXILIARY if any(r.history.get(n) for r in selection.runs for n in names)]
    panels = [OBJECTIVE, *auxiliary, curve]
    curves = curves_plot(groups, panels, out / "curves.png", title, x_metric,
                         {len(panels) - 1: chance} if chance is not None else None)
    write_csv(groups, out / "report.csv")
    text = "\n".join([
        f"### {title}", "",
        f"Store {redacted(uri)}." + (f" Not shown: {_counts(selection.left_out)}." if selection.left_out else ""),
        "Groups are runs that differ only in seed: mean ± sample std over n seeds. A run is the config in effect "
        "when it ended (after every resume; what a resume changed is in its label), and "
        + ("runs of different code versions are pooled (--pool-versions: the code column counts them)."
           if pool_versions else "a group's runs ran the same code (git commit, dirty flag: the code column)."), "",
        markdown(groups), "",
        f"Pareto frontier of {metric} against {cost} (pareto.png): "
        + (", ".join(g.label for g in frontier) if frontier else f"none (no run logged {cost})")
        + (f"; chance level {chance:.3g}." if chance is not None else ""), ""])
    (out / "report.md").write_text(text)
    if selection.sweep_id:
        import mlflow
        client = mlflow.MlflowClient(tracking_uri=uri)
        for name in FILES:
            client.log_artifact(selection.sweep_id, str(out / name), "report")
    return Report(selection, groups, frontier, text, out, curves, chance)


def _first_measured(runs, names: tuple[str, ...], flag: str) -> str:
    """The first of `names` some run measured (report.table.measured: a derived value too)."""
    found = next((n for n in names if any(n in measured(r) for r in runs)), None)
    if found is None:
        logged = sorted({m for r in runs for m in r.metrics if "/" in m})
        raise ReportError(f"{flag}: no run logged any of {list(names)}; name one they logged ({logged})")
    return found


def common_value(runs, metric: str) -> float | None:
    """The metric's value where every run that logged it logged the same one (the class count of one data
    set), else None (runs over different data sets have no one chance level)."""
    values = {r.metrics[metric] for r in runs if metric in r.metrics}
    return values.pop() if len(values) == 1 else None


def _scope(selection: Selection) -> str:
    if not selection.sweep_id:
        return ""
    name = selection.sweep_name or selection.sweep_id
    return f", {name}" if name.startswith("sweep") else f", sweep {name}"


def _counts(left_out: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(left_out.items()))


def main(argv=None) -> Report:
    from fastclip.store import require_store, resolve_uri
    ap = argparse.ArgumentParser(prog="python -m fastclip.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default=None,
                    help="MLflow experiment (tracking.experiment); default: the experiment of the newest sweep in the "
                         "store (with --sweep latest or no --sweep), else fastclip")
    ap.add_argument("--sweep", default=None,
                    help="a sweep's parent run id, latest, or all (every run of the experiment); default: all with "
                         "--experiment, else latest (the newest sweep in any experiment; fastclip's runs where the "
                         "store has no sweep), as `make report`")
    ap.add_argument("--out", default=None, help="default: outputs/reports/<experiment>[/<sweep>]")
    ap.add_argument("--metric", default=None,
                    help=f"default: the first of {', '.join(HEADLINE_METRICS)} the runs logged")
    ap.add_argument("--cost", default=None, help=f"default: the first of {', '.join(COSTS)} the runs logged")
    ap.add_argument("--uri", default=None, help="default: $MLFLOW_TRACKING_URI, else ./outputs/mlflow.db (as training)")
    ap.add_argument("--pool-versions", action="store_true",
                    help="let runs of different code versions (git commit, dirty flag) share a group; by default "
                         "they never do")
    ap.add_argument("--x", choices=("step", "compute"), default="step",
                    help=f"the curves' x axis: optimizer steps, or counted training compute ({COMPUTE})")
    args = ap.parse_args(argv)
    uri = resolve_uri(args.uri)  # the store training writes from this directory
    with one_line_errors():  # the store, experiment, sweep or metric asked for is not there: one line
        require_store(uri, "runs launched from this directory write there; --uri names another")
        experiment, sweep = args.experiment, args.sweep
        if experiment is None and sweep in (None, "latest"):  # as `make report`: the newest sweep in any experiment
            try:
                experiment, sweep = latest_sweep_experiment(uri), "latest"
            except ReportError:
                if sweep == "latest":  # asked for: no sweep is an error; by default, fastclip's runs
                    raise
        experiment = experiment or "fastclip"
        report = build_report(uri, experiment, Path(args.out) if args.out else None, sweep, args.metric,
                              args.cost, args.pool_versions, args.x)
    print(report.text)
    print(f"wrote {', '.join(str(report.out / f) for f in FILES)}"
          + (f"; logged to the sweep's parent run {report.selection.sweep_id}" if report.selection.sweep_id else ""))
    return report
