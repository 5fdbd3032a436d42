"""make ui: the MLflow UI over fastclip's store, on this machine only.

    python -m fastclip.ui [--experiment NAME | --run RUN_ID] [--port 5000] [--uri sqlite:///.../outputs/mlflow.db]

Listens on 127.0.0.1 (never on the network: the UI can delete runs), on --port or, where that is
taken, on a free port; prints where to look, then runs `mlflow ui` in this process (Ctrl-C stops it).
Without --experiment, where the store has a sweep (a `-m` run), the first URL is a saved view of the
newest sweep's runs table: its jobs only, the options it varied and its headline metrics as columns
(objective, test headline, counted training GFLOPs, image/text GFLOPs, training time), best objective
first; the second MLflow's comparison of its finished runs (parallel-coordinates and scatter plots);
the third that experiment's whole runs table. Else the `fastclip` experiment's runs table. With --run (what a finished run's last log line gives), the first URL is that run's page.
The UI itself is MLflow's; fastclip only picks the store, port and pages.
"""
import argparse
import os
import socket
import sys

from fastclip.errors import one_line_errors

HOST = "127.0.0.1"


def free_port(preferred: int, host: str = HOST) -> int:
    """`preferred` where nothing listens on it, else a port the system says is free."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError(f"no free port on {host}")


def runs_page(uri: str, experiment: str, port: int) -> str:
    """The URL of `experiment`'s runs table (the UI's home page where it has no such experiment).
    Marks the experiment as model training, so MLflow 3 opens it on its runs, not its GenAI view."""
    import mlflow
    from fastclip.tracking import mark_model_training
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        print(f"no experiment {experiment!r} in this store (it has {names}): the URL opens the experiment list")
        return f"http://{HOST}:{port}/"
    mark_model_training(client, found)
    # workflowType: the UI's "Model training" side (runs, models), not its GenAI default
    return f"http://{HOST}:{port}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning"


def newest_sweep(uri: str):
    """(experiment, report.runs.Selection of its finished runs) of the newest sweep in the store, or
    None where it has no sweep with a finished run."""
    from fastclip.report.runs import ReportError, latest_sweep_experiment, select_runs
    try:
        experiment = latest_sweep_experiment(uri)
        chosen = select_runs(uri, experiment, "latest")
    except ReportError:
        return None
    return (experiment, chosen) if chosen.runs else None


def compare_page(uri: str, port: int, found=None) -> tuple[str, str, int] | None:
    """MLflow's compare view of the newest sweep's FINISHED runs -> (URL, experiment, runs), or None
    where the store has no sweep. The route is MLflow's own (`#/compare-runs?runs=[ids]&experiments=[id]`).
    found: newest_sweep(uri), where already read."""
    import json
    import urllib.parse
    found = found or newest_sweep(uri)
    if found is None:
        return None
    experiment, chosen = found
    ids = [r.run_id for r in chosen.runs]
    exp_id = mlflow_experiment_id(uri, experiment)
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp_id])},
                                   quote_via=urllib.parse.quote)
    return f"http://{HOST}:{port}/#/compare-runs?{query}", experiment, len(ids)


VIEW_TAG = "mlflow.sharedViewState."  # MLflow's saved ("shared") runs-table views: an experiment tag each
VIEW_METRICS = ("efficiency/image_gflops", "efficiency/text_gflops")  # shown after COST_METRICS


def sweep_view(uri: str, port: int, found=None) -> tuple[str, str, int] | None:
    """A saved view of the newest sweep's runs table -> (URL, experiment, runs), or None where the
    store has no sweep with a finished run. The view (MLflow's shared view state, stored as the
    experiment tag mlflow.sharedViewState.<key>, opened by ?viewStateShareKey=<key>) filters the table to
    the sweep's jobs, shows the options the sweep varied (report.table.varied_keys, and seed) and its
    headline metrics as columns, and sorts by the objective (best first). None too where the store
    refuses the tag (read-only): the caller still has the comparison URL. found: newest_sweep(uri),
    where already read."""
    import json
    import mlflow
    from fastclip.eval.names import COST_METRICS, HEADLINE_METRICS, OBJECTIVE_METRICS, lower_is_better
    from fastclip.report.table import varied_keys
    found = found or newest_sweep(uri)
    if found is None:
        return None
    experiment, chosen = found
    runs = chosen.runs
    logged = {k for r in runs for k in r.metrics}
    objective = next((m for m in OBJECTIVE_METRICS if m in logged), None)
    headline = next((m for m in HEADLINE_METRICS if m in logged), None)
    costs = [*COST_METRICS] if COST_METRICS[0] in logged else ["efficiency/train_gflops", *COST_METRICS[1:]]  # older runs
    metrics = [m for m in (objective, headline, *costs, *VIEW_METRICS) if m and m in logged]
    params = varied_keys(runs) + (["seed"] if len({r.params.get("seed") for r in runs}) > 1 else [])
    state = {"searchFilter": f"tags.`mlflow.parentRunId` = '{chosen.sweep_id}' and attributes.status = 'FINISHED'",
             "selectedColumns": [f"params.`{k}`" for k in params] + [f"metrics.`{m}`" for m in metrics]}
    if objective:
        state.update(orderByKey=f"metrics.`{objective}`", orderByAsc=lower_is_better(objective))
    exp_id = mlflow_experiment_id(uri, experiment)
    key = f"fastclip-sweep-{chosen.sweep_id}"
    try:
        mlflow.MlflowClient(tracking_uri=uri).set_experiment_tag(exp_id, VIEW_TAG + key, json.dumps(state))
    except Exception as exc:  # a read-only store or a server that refuses writes: the comparison URL still serves
        print(f"(no saved view of the sweep: the store refused its tag: {type(exc).__name__}: {str(exc)[:200]})")
        return None
    return (f"http://{HOST}:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={key}",
            experiment, len(runs))


def run_page(uri: str, run_id: str, port: int) -> tuple[str, str]:
    """(URL of one run's page, its experiment's name). Raises TrackingStoreError naming the run id
    where the store has no such run."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from fastclip.store import TrackingStoreError, redacted
    from fastclip.tracking import mark_model_training
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingStoreError(f"--run {run_id}: no such run in {redacted(uri)} (a run's id is in its "
                                 f"last log line and its run dir's run_id file; --uri names another store)") from None
    experiment = client.get_experiment(run.info.experiment_id)
    mark_model_training(client, experiment)
    return (f"http://{HOST}:{port}/#/experiments/{experiment.experiment_id}/runs/{run_id}"
            f"?workflowType=machine_learning", experiment.name)


def mlflow_experiment_id(uri: str, experiment: str) -> str:
    import mlflow
    return mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment).experiment_id


def main(argv=None) -> None:
    from fastclip.store import redacted, require_store, resolve_uri
    ap = argparse.ArgumentParser(prog="python -m fastclip.ui", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group()  # a run's page, or an experiment's runs
    which.add_argument("--experiment", default=None,
                    help="whose runs table the printed URL opens; default: the newest sweep's saved view and comparison, "
                         "else fastclip")
    which.add_argument("--run", default=None, metavar="RUN_ID",
                    help="open this run's page (a finished run's last log line names its id)")
    ap.add_argument("--port", type=int, default=5000, help="tried first; a free one where it is taken")
    ap.add_argument("--uri", default=None, help="default: $MLFLOW_TRACKING_URI, else ./outputs/mlflow.db (as training)")
    args = ap.parse_args(argv)
    uri = resolve_uri(args.uri)
    with one_line_errors():  # no store there, no such run: one line
        require_store(uri, "train something first (make train), or --uri names another")
        port = free_port(args.port)
        one_run = run_page(uri, args.run, port) if args.run else None
    if port != args.port:
        print(f"port {args.port} is taken: using {port}")
    newest = args.experiment is None and one_run is None
    found = newest_sweep(uri) if newest else None
    view, sweep = (sweep_view(uri, port, found), compare_page(uri, port, found)) if found else (None, None)
    print(f"MLflow UI for {redacted(uri)}")
    if one_run:
        url, experiment = one_run
        print(f"run {args.run}: {url}")
    elif sweep:
        _, experiment, n = sweep
        if view:
            print(f"the newest sweep's {n} finished runs, its options and headline metrics as columns: {view[0]}")
        print(f"the newest sweep's {n} finished runs in MLflow's comparison (parallel coordinates, scatter plots): "
              f"{sweep[0]}")
    else:
        experiment = args.experiment or "fastclip"
    print(f"runs of {experiment!r}: {runs_page(uri, experiment, port)}\n"
          f"(the page answers once MLflow says 'Uvicorn running': some seconds; Ctrl-C stops it)", flush=True)
    # MLflow binds the port a moment later: another program taking it in between makes MLflow fail, saying so
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", HOST,
                              "--port", str(port), "--workers", "1"])


if __name__ == "__main__":
    main()
