"""What a run writes survives the machine: a full disk while a checkpoint is written names the file
and the cause and keeps the previous checkpoint; a run dir takes one live run at a time."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TINY_CLIP, compose_cfg, load_checkpoint, store_runs
from fastclip import checkpoint, run_lock
from fastclip.checkpoint import CheckpointWriteError
from fastclip.train import run

FAST = TINY_CLIP + ["eval.boundary_picture=false", "trainer.batch_size=8"]


def fill_the_disk_under(tmp: str) -> None:
    """The next write of `tmp` meets a full disk: /dev/full answers every write with ENOSPC."""
    os.symlink("/dev/full", tmp)


def test_a_full_disk_names_the_checkpoint_and_the_cause_and_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"model": {"w": torch.ones(3)}})
    fill_the_disk_under(str(path) + ".tmp")
    with pytest.raises(CheckpointWriteError, match=rf"{path}: .*no space left on device"):
        checkpoint.save(path, {"model": {"w": torch.zeros(10_000)}})
    assert not os.path.lexists(str(path) + ".tmp")  # the partial file is gone
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))  # the previous one, whole


def test_a_run_whose_disk_fills_fails_naming_the_file_and_resumes_from_the_last_good_checkpoint(
        tmp_path, store, monkeypatch):
    cfg = compose_cfg(FAST + [f"tracking.uri={store}", "epochs=1", "trainer.max_steps=3",
                              "trainer.warmup_steps=1", "trainer.ckpt_every_steps=1"])
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    real, calls = checkpoint.save, []

    def disk_fills_at_the_second_write(path, payload):
        calls.append(path)
        if len(calls) == 2:
            fill_the_disk_under(str(path) + ".tmp")
        return real(path, payload)
    monkeypatch.setattr(checkpoint, "save", disk_fills_at_the_second_write)
    with pytest.raises(CheckpointWriteError, match=rf"{ckpt}: .*no space left on device"):
        run(cfg, tmp_path / "run")
    assert load_checkpoint(ckpt)["train_state"]["step"] == 1 and not os.path.lexists(str(ckpt) + ".tmp")
    (failed,) = store_runs(store)
    assert failed.info.status == "FAILED"


HOLDER = """
import sys, time
from fastclip import run_lock
with run_lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_another_process(run_dir, env) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_dir_in_use_is_refused_naming_its_holder_and_a_killed_holder_leaves_no_lock(tmp_path, store, cli_env):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_in_another_process(run_dir, cli_env)
    try:
        cfg = compose_cfg(FAST + [f"tracking.uri={store}", "epochs=1", "trainer.max_steps=2", "trainer.warmup_steps=1"])
        with pytest.raises(run_lock.RunDirInUse, match=rf"{run_dir} is in use by process {holder.pid} on "):
            run(cfg, run_dir)
        # refused before the MLflow run or a checkpoint was touched
        assert store_runs(store) == [] and not (run_dir / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    metrics = run(cfg, run_dir)  # SIGKILL left nothing stuck: the same run dir trains now
    assert "zeroshot/top1" in metrics
    with run_lock.hold(run_dir):  # and the finished run let go of it
        pass


def test_the_lock_is_the_process_s_own_not_the_file_s(tmp_path):
    """Two holders in one process are refused too (flock is per open file, not per process), and
    the lock file left behind by an ended run does not lock anything."""
    with run_lock.hold(tmp_path):
        with pytest.raises(run_lock.RunDirInUse, match=f"process {os.getpid()}"):
            with run_lock.hold(tmp_path):
                pass
    assert (tmp_path / run_lock.LOCK_NAME).exists()
    started = time.monotonic()
    with run_lock.hold(tmp_path):
        assert time.monotonic() - started < 1
