"""Many jobs, one MLflow server: a 2-job multirun with tracking.uri=http://127.0.0.1:PORT logs both
jobs under one parent run, the server backed by a real PostgreSQL (a throwaway cluster made with
initdb/pg_ctl in a temp dir, stopped by the test). Where PostgreSQL is not installed the test says
so (a warning) and runs the same server on sqlite."""
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import mlflow
import pytest

from conftest import PYTHON, TINY_CLIP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> str | None:
    """The folder of initdb, pg_ctl and postgres (Debian keeps them under /usr/lib/postgresql/<v>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return os.path.dirname(found[-1])
    return os.path.dirname(shutil.which("pg_ctl")) if shutil.which("pg_ctl") and shutil.which("initdb") else None


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (run as the `postgres` user when this is root:
    initdb refuses root)."""

    def __init__(self, bin_dir: str):
        # its own folder under /tmp: pytest's are private to the user running the tests
        self.folder, self.bin, self.port = Path(tempfile.mkdtemp(prefix="fastclip-pg-")), bin_dir, free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.folder, "postgres")

    def run(self, *cmd):
        done = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-1500:]} {done.stderr[-1500:]}"

    def start(self) -> str:
        data = self.folder / "data"
        self.run(f"{self.bin}/initdb", "-D", str(data), "-U", "fastclip", "--auth=trust", "-E", "UTF8")
        self.run(f"{self.bin}/pg_ctl", "-D", str(data), "-l", str(self.folder / "log"), "-w", "-o",
                 f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")
        self.run(f"{self.bin}/createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "fastclip", "mlflow")
        return f"postgresql+psycopg2://fastclip@127.0.0.1:{self.port}/mlflow"

    def stop(self):
        self.run(f"{self.bin}/pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.mark.slow
def test_a_multirun_against_an_mlflow_server_logs_both_jobs_under_one_parent(tmp_path, cli_env):
    bin_dir = postgres_bin()
    database = Postgres(bin_dir) if bin_dir else None
    if database is None:
        warnings.warn("PostgreSQL is not installed here: the MLflow server runs on sqlite instead")
    backend = database.start() if database else f"sqlite:///{tmp_path / 'server.db'}"
    port = free_port()
    server = subprocess.Popen([PYTHON, "-m", "mlflow", "server", "--backend-store-uri", backend, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], cwd=tmp_path, env=cli_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline, "the MLflow server did not answer within 120 s"
                time.sleep(0.5)
        cmd = [PYTHON, "-m", "fastclip.train", "-m", "boundary=none,fixed", "trainer.max_steps=3", *TINY_CLIP,
               "eval.boundary_picture=false", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
        done = subprocess.run(cmd, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        client = mlflow.MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("fastclip").experiment_id])
        [parent] = [r for r in runs if r.data.tags.get("fastclip.role") == "sweep"]
        jobs = [r for r in runs if r.data.tags.get("fastclip.role") != "sweep"]
        assert sorted(r.data.params["boundary.name"] for r in jobs) == ["fixed", "none"]
        assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id
                   for r in jobs)
        assert parent.info.status == "FINISHED"
        assert {a.path for a in client.list_artifacts(jobs[0].info.run_id)} >= {"config.yaml"}  # through the server
        if database:  # the runs are in PostgreSQL, not in a file beside the test
            assert not list(tmp_path.glob("*.db")) and not (tmp_path / "outputs" / "mlflow.db").exists()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        if database:
            database.stop()
