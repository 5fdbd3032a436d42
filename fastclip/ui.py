"""make ui: the MLflow UI over fastclip's store, on this machine only.

    python -m fastclip.ui [--experiment fastclip] [--port 5000] [--uri sqlite:///.../outputs/mlflow.db]

Listens on 127.0.0.1 (never on the network: the UI can delete runs), on --port or, where that is
taken, on a free port; prints the URL of the experiment's runs table, then runs `mlflow ui` in this
process (Ctrl-C stops it). The UI itself is MLflow's; fastclip only picks the store, port and page.
"""
import argparse
import os
import socket
import sys

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


def main(argv=None) -> None:
    from fastclip.tracking import TrackingStoreError, redacted, require_store, resolve_uri
    ap = argparse.ArgumentParser(prog="python -m fastclip.ui", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="fastclip", help="whose runs table the printed URL opens")
    ap.add_argument("--port", type=int, default=5000, help="tried first; a free one where it is taken")
    ap.add_argument("--uri", default=None, help="default: $MLFLOW_TRACKING_URI, else ./outputs/mlflow.db (as training)")
    args = ap.parse_args(argv)
    uri = resolve_uri(args.uri)
    try:
        require_store(uri, "train something first (make train), or --uri names another")
    except TrackingStoreError as exc:
        raise SystemExit(str(exc)) from None
    port = free_port(args.port)
    if port != args.port:
        print(f"port {args.port} is taken: using {port}")
    print(f"MLflow UI for {redacted(uri)}\nruns of {args.experiment!r}: {runs_page(uri, args.experiment, port)}\n"
          f"(the page answers once MLflow says 'Uvicorn running': some seconds; Ctrl-C stops it)", flush=True)
    # MLflow binds the port a moment later: another program taking it in between makes MLflow fail, saying so
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", HOST,
                              "--port", str(port), "--workers", "1"])


if __name__ == "__main__":
    main()
