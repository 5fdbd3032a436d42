"""make ui: MLflow's UI on 127.0.0.1 only, on a free port where the asked one is taken, answering
the REST API with the store's runs; started and stopped here."""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import mlflow
import pytest

from conftest import PYTHON
from fastclip.tracking import EXPERIMENT_KIND, ensure_store


def listeners(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} writes them) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.append(address)
    return found


@pytest.mark.slow
def test_ui_serves_the_runs_on_localhost_only_and_moves_off_a_taken_port(tmp_path, cli_env):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    legacy = client.create_experiment("old")  # made before fastclip tagged its experiments
    exp_id = ensure_store(uri, "demo")
    run_id = client.create_run(exp_id, run_name="a run").info.run_id
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    ui = subprocess.Popen([PYTHON, "-m", "fastclip.ui", "--uri", uri, "--experiment", "old", "--port", str(port)],
                          env=cli_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    try:
        first = ui.stdout.readline()
        assert first.startswith(f"port {port} is taken: using "), first
        served = int(first.split()[-1])
        lines = [ui.stdout.readline() for _ in range(2)]
        assert f"http://127.0.0.1:{served}/#/experiments/{legacy}/runs" in lines[1]
        body = json.dumps({"experiment_ids": [exp_id]}).encode()
        deadline, answer = time.time() + 90, None
        while time.time() < deadline and answer is None:
            assert ui.poll() is None, ui.stdout.read()
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{served}/api/2.0/mlflow/runs/search", body,
                                                 {"Content-Type": "application/json"})
                answer = json.load(urllib.request.urlopen(request, timeout=5))
            except OSError:
                time.sleep(0.5)
        assert answer is not None, "the UI did not answer within 90 s"
        assert [r["info"]["run_id"] for r in answer["runs"]] == [run_id]
        assert listeners(served) == ["0100007F"]  # 127.0.0.1, and nothing on 0.0.0.0 or ::
        for exp in (legacy, exp_id):  # MLflow 3 opens both on their runs table, not the GenAI view
            assert client.get_experiment(exp).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
        taken.close()
    assert listeners(served) == []


def test_ui_without_a_store_says_to_train_first(tmp_path, cli_env):
    done = subprocess.run([PYTHON, "-m", "fastclip.ui", "--uri", f"sqlite:///{tmp_path / 'none.db'}"], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no MLflow store at" in done.stderr and "make train" in done.stderr


def test_without_an_experiment_the_ui_opens_the_newest_sweeps_comparison(tmp_path):
    """After `make sweep`, `make ui` points at MLflow's compare view of that sweep's finished runs, in
    whatever experiment the sweep logged to; with no sweep in the store, at the fastclip runs table."""
    import urllib.parse
    from fastclip.ui import compare_page
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_store(uri, "fastclip")
    assert compare_page(uri, 5000) is None  # no sweep yet
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = ensure_store(uri, "boundary_ablation")
    parent = client.create_run(exp, run_name="sweep", tags={"fastclip.role": "sweep"}).info.run_id
    jobs = [client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id for _ in range(3)]
    for job in jobs[:2]:
        client.set_terminated(job)
    client.set_terminated(jobs[2], "FAILED")
    url, experiment, n = compare_page(uri, 5000)
    assert experiment == "boundary_ablation" and n == 2
    route, query = url.split("#", 1)[1].split("?", 1)
    fields = dict(urllib.parse.parse_qsl(query))
    assert route == "/compare-runs" and json.loads(fields["experiments"]) == [exp]
    assert sorted(json.loads(fields["runs"])) == sorted(jobs[:2])


def test_run_opens_that_runs_page_and_an_unknown_id_is_one_line(tmp_path, cli_env):
    """A finished run's last line says `make ui RUN=<id>`: --run prints that run's page in its own
    experiment; an id the store lacks is refused naming it, before MLflow starts."""
    from fastclip.ui import run_page
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_store(uri, "fastclip")
    exp = ensure_store(uri, "elsewhere")
    run_id = mlflow.MlflowClient(tracking_uri=uri).create_run(exp).info.run_id
    url, experiment = run_page(uri, run_id, 5000)
    assert experiment == "elsewhere"
    assert url == f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"
    done = subprocess.run([PYTHON, "-m", "fastclip.ui", "--uri", uri, "--run", "0123abc"], env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.startswith("error: --run 0123abc: no such run"), done.stderr
    assert "Traceback" not in done.stderr


def test_the_newest_sweeps_saved_view_shows_what_it_varied_and_its_headline_metrics(tmp_path):
    """`make ui`'s first page: the sweep's jobs only (not an older run of the experiment), the option
    and seed it varied and its headline metrics as columns, best objective first; stored as MLflow's
    shared view state, an experiment tag the UI reads through ?viewStateShareKey=."""
    from fastclip.ui import VIEW_TAG, sweep_view
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = ensure_store(uri, "boundary_ablation")
    client.set_terminated(client.create_run(exp).info.run_id)  # an older run outside the sweep
    parent = client.create_run(exp, tags={"fastclip.role": "sweep"}).info.run_id
    for boundary in ("none", "fixed"):
        for seed in ("0", "1"):
            job = client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
            for key, value in {"boundary.name": boundary, "seed": seed, "trainer.lr": "0.001"}.items():
                client.log_param(job, key, value)
            # a sweep logged before efficiency/train_gflops_mean: its cost column is the last count
            for key in ("val/zeroshot_top1", "zeroshot/top1", "efficiency/image_gflops", "train/loss",
                        "efficiency/train_gflops"):
                client.log_metric(job, key, 0.5)
            client.set_terminated(job)
    client.set_terminated(client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id, "FAILED")
    url, experiment, n = sweep_view(uri, 5000)
    assert experiment == "boundary_ablation" and n == 4
    key = url.split("viewStateShareKey=")[1]
    assert url.startswith(f"http://127.0.0.1:5000/#/experiments/{exp}/runs?")
    state = json.loads(client.get_experiment(exp).tags[VIEW_TAG + key])
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent}' and attributes.status = 'FINISHED'"
    # the filter is MLflow's search syntax: it finds the sweep's four finished jobs
    assert len(client.search_runs([exp], filter_string=state["searchFilter"])) == 4
    assert state["selectedColumns"] == ["params.`boundary.name`", "params.`seed`", "metrics.`val/zeroshot_top1`",
                                        "metrics.`zeroshot/top1`", "metrics.`efficiency/train_gflops`",
                                        "metrics.`efficiency/image_gflops`"]
    assert state["orderByKey"] == "metrics.`val/zeroshot_top1`" and state["orderByAsc"] is False
