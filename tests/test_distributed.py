"""Data-parallel training: two gloo processes on CPU against one process on their whole batch, the
torchrun command as the README writes it, and the pieces that keep ranks in step."""
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import PYTHON, TINY_CLIP, load_checkpoint, store_runs
from fastclip import PROJECT_ROOT, distributed
from fastclip.data.epoch_order import EpochOrder

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
STEP = str(PROJECT_ROOT / "tests" / "ddp_step.py")


def test_ranks_take_their_runs_of_each_global_batch():
    one = list(EpochOrder(100, 0, 3, batch_size=16))
    ranks = [list(EpochOrder(100, 0, 3, batch_size=8, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6 * 8  # 100 // 16 global batches of 8 + 8
    for b in range(6):
        assert ranks[0][8 * b:8 * b + 8] + ranks[1][8 * b:8 * b + 8] == one[16 * b:16 * b + 16]
    resumed = list(EpochOrder(100, 0, 3, start=2, batch_size=8, rank=1, world_size=2))
    assert resumed == ranks[1][16:]


def _lockstep(rank: int, sizes: list[int], init: str, out, window: int = 8):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    distributed._world, distributed._host_group = distributed.World(rank, 2, rank), dist.group.WORLD
    batches = [list(range(n)) for n in sizes[rank]]
    calls, host_min = [], distributed.host_min
    distributed.host_min = lambda values: calls.append(len(values)) or host_min(values)
    out[rank] = [len(b) for b in distributed.Lockstep(batches, len, lambda b, n: b[:n], window)]
    out[f"calls {rank}"] = calls
    distributed.shutdown()


def test_lockstep_cuts_to_the_smallest_rank_batch_and_ends_every_rank_with_the_first_that_runs_out(tmp_path):
    """A bad sample on one rank makes its batch smaller: the other ranks cut theirs to it (the gathered
    contrastive loss needs equal sizes); an epoch that runs out on one rank ends on all (no hang)."""
    out = mp.Manager().dict()
    sizes = [[8, 8, 0, 8, 8], [8, 6, 8, 8]]
    mp.spawn(_lockstep, args=(sizes, f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    assert out[0] == out[1] == [8, 6, 0, 8]


def _step_log(rank: int, init: str, out):
    from fastclip.loop.state import TrainState
    from fastclip.loop.steplog import StepLog
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    distributed._world = distributed.World(rank, 2, rank)
    log = StepLog(None, 1, None, Path("unused"))
    log.add(TrainState(step=1), torch.tensor(2.0 + rank), torch.tensor(1.0), 0.1,
            {"boundaries/dropped_image": torch.tensor(3.0 + 4 * rank), "compression_image": torch.tensor(4.0 * (rank + 1))})
    out[rank] = log.fetch()[0][3]
    distributed.shutdown()


def test_a_step_logs_the_ranks_mean_of_a_loss_or_ratio_and_their_sum_of_a_count(tmp_path):
    """Data-parallel: each rank's boundaries dropped are on its own share of the global batch, so the
    step's count is their sum; a loss or shortening factor is their mean."""
    out = mp.Manager().dict()
    mp.spawn(_step_log, args=(f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    assert out[0] == out[1] == {"train/loss": 2.5, "train/lr": 0.1, "boundaries/dropped_image": 10.0,
                                "train/compression_image": 6.0}


@pytest.mark.parametrize("window", [1, 8])
def test_lockstep_agrees_on_a_window_of_batches_in_one_host_collective(tmp_path, window):
    """Not one host all-reduce a step: 1, 2, 4, then `window` batches a collective (the epoch's first step
    waits for one batch); a short batch or an early end anywhere in a window is still agreed on."""
    out = mp.Manager().dict()
    sizes = [[8] * 20, [8] * 9 + [5] + [8] * 12]  # rank 1's 10th batch short, and two batches more
    mp.spawn(_lockstep, args=(sizes, f"file://{tmp_path / 'store'}", out, window), nprocs=2, join=True)
    assert out[0] == out[1] == [8] * 9 + [5] + [8] * 10
    expected = [1] * 21 if window == 1 else [1, 2, 4, 8, 8]  # 20 batches and the end: 21 collectives before
    assert out["calls 0"] == out["calls 1"] == expected


@pytest.mark.parametrize("boundary", ["none", "fixed"])
def test_two_processes_on_2b_give_the_loss_and_gradients_of_one_process_on_the_whole_batch(tmp_path, boundary,
                                                                                           cli_env):
    common = [*TINY_CLIP, f"boundary={boundary}"]
    for command in ([*TORCHRUN, STEP, str(tmp_path / "two.pt"), *common, "trainer.batch_size=8"],
                    [PYTHON, STEP, str(tmp_path / "one.pt"), *common, "trainer.batch_size=16"]):
        done = subprocess.run(command, env=cli_env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["world_size"], one["local_batch"], two["world_size"], two["local_batch"]) == (1, 16, 2, 8)
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-5, rtol=0)
    # local_loss: each rank's loss is over its own 8 rows (against all 16 columns), not the whole 16 x 16
    assert abs(two["rank_losses"][0] - two["rank_losses"][1]) > 1e-4
    assert set(two["grads"]) == set(one["grads"]) == set(one["trainable"])  # every parameter got its gradient
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-5, rtol=0, msg=name)
    for name, weight in one["weights"].items():  # and two optimizer steps after them
        torch.testing.assert_close(two["weights"][name], weight, atol=1e-5, rtol=0, msg=name)


def test_two_processes_accumulating_2_at_batch_4_give_the_loss_and_gradients_of_one_process_at_16(tmp_path, cli_env):
    """Contrastive accumulation data-parallel: 2 ranks x 2 micro-batches x 4 samples is one batch of 16
    (each rank's rows against every micro-batch's of every rank), and so is one process at 2 x 8."""
    common = [*TINY_CLIP, "boundary=fixed"]
    runs = {"whole": [PYTHON, STEP, str(tmp_path / "whole.pt"), *common, "trainer.batch_size=16"],
            "one": [PYTHON, STEP, str(tmp_path / "one.pt"), *common, "trainer.batch_size=8", "trainer.accum_steps=2"],
            "two": [*TORCHRUN, STEP, str(tmp_path / "two.pt"), *common, "trainer.batch_size=4",
                    "trainer.accum_steps=2"]}
    for command in runs.values():
        done = subprocess.run(command, env=cli_env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    whole = torch.load(tmp_path / "whole.pt")
    for name in ("one", "two"):
        got = torch.load(tmp_path / f"{name}.pt")
        torch.testing.assert_close(got["loss"], whole["loss"], atol=1e-5, rtol=0, msg=name)
        assert set(got["grads"]) == set(whole["grads"]) == set(whole["trainable"])
        for param, grad in whole["grads"].items():
            torch.testing.assert_close(got["grads"][param], grad, atol=1e-5, rtol=0, msg=f"{name}: {param}")
        for param, weight in whole["weights"].items():  # and two optimizer steps after them
            torch.testing.assert_close(got["weights"][param], weight, atol=1e-5, rtol=0, msg=f"{name}: {param}")


def test_torchrun_as_written_trains_one_run_with_one_checkpoint_then_a_resume_needs_the_same_world(tmp_path, cli_env):
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "fastclip.train",
                           "trainer.max_steps=10"], env=cli_env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = glob.glob(str(tmp_path / "**" / "last.pt"), recursive=True)
    assert len(checkpoints) == 1, checkpoints
    run_dirs = [p for p in (tmp_path / "outputs" / "runs").glob("*/*")]
    assert len(run_dirs) == 1, run_dirs  # rank 1's Hydra dir, if it had its own second, is gone
    ckpt = load_checkpoint(checkpoints[0])
    assert ckpt["train_state"]["step"] == 10 and ckpt["train_state"]["world_size"] == 2
    assert isinstance(ckpt["train_state"]["rng"], list) and len(ckpt["train_state"]["rng"]) == 2

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = store_runs(client.tracking_uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["distributed.world_size"] == "2"  # (logged where there are several processes)
    assert run.data.params["trainer.global_batch_size"] == str(2 * int(run.data.params["trainer.batch_size"]))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 11))
    assert "zeroshot/top1" in run.data.metrics

    refused = subprocess.run([PYTHON, "-m", "fastclip.train", f"trainer.resume={checkpoints[0]}",
                              "trainer.max_steps=12"], env=cli_env, cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "written by 2 data-parallel process(es) and this run has 1" in refused.stderr
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def _worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process with this RANK (from /proc: its children's environments)."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        for grandchild in [child, *Path(f"/proc/{child}/task/{child}/children").read_text().split()]:
            environ = Path(f"/proc/{grandchild}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ and f"LOCAL_RANK={rank}".encode() in environ:
                return int(grandchild)
    raise LookupError(f"no worker of rank {rank} under {launcher}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_a_sigterm_to_one_rank_mid_epoch_stops_both_after_the_same_step_and_resumes_to_the_uninterrupted_run(
        tmp_path, cli_env):
    """SIGTERM to rank 1 alone (as a scheduler's signal to one task): the ranks agree to stop after
    the same step with one checkpoint (rank 0 did not see the signal); trainer.resume=auto in the same
    run dir continues the same MLflow run and ends with the metrics of a run never stopped (learned
    gumbel boundaries: each rank's noise restored)."""
    common = [*TORCHRUN, "-m", "fastclip.train", *TINY_CLIP, "boundary=gumbel", "trainer.batch_size=32",
              "trainer.max_steps=30", "tracking.log_every=1", "eval.boundary_picture=false", "trainer.resume=auto"]

    def final(store):
        runs = store_runs(store)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        return {k: v for k, v in runs[0].data.metrics.items() if k.startswith(("train/", "zeroshot/"))}

    whole = f"sqlite:///{tmp_path / 'whole.db'}"
    done = subprocess.run([*common, f"tracking.uri={whole}", f"hydra.run.dir={tmp_path / 'whole'}"], env=cli_env,
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    cut = [*common, f"tracking.uri=sqlite:///{tmp_path / 'cut.db'}", f"hydra.run.dir={tmp_path / 'cut'}"]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(cut, env=cli_env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 300
        while "plan:" not in log.read_text() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # a few steps into the first epoch (22 steps)
        os.kill(_worker_of_rank(first.pid, 1), signal.SIGTERM)
        first.wait(timeout=120)
    text = log.read_text()
    stops = re.findall(r"^fastclip: (SIGTERM|another data-parallel rank's stop signal): stopped after step (\d+)",
                       text, re.MULTILINE)
    assert stops and {why for why, _ in stops} <= {"SIGTERM", "another data-parallel rank's stop signal"}, text[-3000:]
    step = int(stops[0][1])
    assert {int(s) for _, s in stops} == {step} and 0 < step < 22, text[-3000:]  # mid-epoch, the same step
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["train_state"]["step"] == step
    done = subprocess.run(cut, env=cli_env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {step} into" in done.stdout + done.stderr
    expected, resumed = final(whole), final(f"sqlite:///{tmp_path / 'cut.db'}")
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        assert resumed[key] == pytest.approx(value, abs=1e-6), key


def test_a_job_of_two_submitit_tasks_trains_as_one_data_parallel_run(tmp_path, cli_env):
    """The SLURM path without a cluster: Submitit's local executor runs a job's tasks as processes
    with the same JobEnvironment a SLURM job has; TorchDistributedEnvironment makes them one process
    group, and the job logs one MLflow run (under the sweep's parent) that says it had 2 processes."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run([PYTHON, "-m", "fastclip.train", "-m", "hydra/launcher=submitit_local",
                           "hydra.launcher.tasks_per_node=2", *TINY_CLIP, "trainer.max_steps=4",
                           "eval.boundary_picture=false", f"tracking.uri={store}"], env=cli_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = store_runs(store)
    jobs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 2 and len(jobs) == 1  # the sweep's parent and its one job
    assert jobs[0].info.status == "FINISHED" and jobs[0].data.params["distributed.world_size"] == "2"
    assert len(glob.glob(str(tmp_path / "outputs" / "multirun" / "*" / "*" / "0" / "checkpoints" / "last.pt"))) == 1


def test_ddp_reduces_in_bucket_views_and_broadcasts_buffers_only_for_batchnorm_statistics(tmp_path):
    """The ViT towers' buffers are constants (no broadcast before every forward); RN50's BatchNorm
    running statistics are the one buffer a forward changes, so they stay rank 0's."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    distributed._world = distributed.World(0, 2, 0)  # wrap() as in a run of several processes
    try:
        vit = distributed.wrap(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)), torch.device("cpu"))
        bn = distributed.wrap(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)), torch.device("cpu"))
        assert vit.gradient_as_bucket_view and bn.gradient_as_bucket_view
        assert not vit.broadcast_buffers and bn.broadcast_buffers
    finally:
        distributed.shutdown()


def _count_host_collectives(rank: int, port: int, run_dir: str, out):
    """A short data-parallel fit; every host-group collective counted by who asked for it."""
    import traceback
    from fastclip import runtime
    from fastclip.config import compose_train_config
    from fastclip.loop import fit
    from fastclip.tasks import build_task
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = compose_train_config([*TINY_CLIP, "trainer.max_steps=8", "tracking.log_every=4", "trainer.batch_size=8",
                                "eval.boundary_picture=false"])
    world, device = distributed.init("cpu")
    runtime.seed_everything(cfg.seed)
    task = build_task(cfg, device, None)
    counts: dict[str, int] = {}

    def counted(fn):
        def call(*args, **kwargs):
            if kwargs.get("group") is distributed._host_group:
                names = {frame.name for frame in traceback.extract_stack()}
                who = "stop" if "requested" in names else "lockstep" if "__iter__" in names else "other"
                counts[who] = counts.get(who, 0) + 1
            return fn(*args, **kwargs)
        return call
    for name in ("all_reduce", "broadcast_object_list", "all_gather_object", "barrier", "broadcast"):
        setattr(dist, name, counted(getattr(dist, name)))
    fit(task, cfg, None, Path(run_dir), device, evaluation=False)
    out[rank] = counts
    distributed.shutdown()


def test_the_ranks_agree_on_a_stop_every_log_every_steps_not_every_step(tmp_path):
    """8 steps, tracking.log_every=4: the stop flag is agreed after steps 4 and 8 and around the
    epoch's end (before it, after its checkpoint), not after each step; the in-memory digits make
    no short batch, so the batch sizes are never agreed: no host collective on the other steps."""
    out = mp.Manager().dict()
    port = 29000 + os.getpid() % 1000
    mp.spawn(_count_host_collectives, args=(port, str(tmp_path / "run"), out), nprocs=2, join=True)
    assert out[0]["stop"] == out[1]["stop"] == 8 // 4 + 2, dict(out)
    assert "lockstep" not in out[0] and "lockstep" not in out[1], dict(out)


def test_a_source_that_can_skip_a_sample_keeps_its_ranks_batch_sizes_in_lockstep(tmp_path):
    """Images read from files (one may not decode): the ranks agree on each batch's size; images held
    decoded (digits): no agreement needed, the batches go to the loop as the loader makes them."""
    from fastclip.config import compose_train_config
    from fastclip.tasks import build_task
    from PIL import Image
    task = build_task(compose_train_config([*TINY_CLIP, "trainer.num_workers=0"]), torch.device("cpu"), None)
    distributed._world = distributed.World(0, 2, 0)  # train_batches as rank 0 of two (no batch is read)
    try:
        assert not isinstance(task.train_batches(0).batches, distributed.Lockstep)  # (inside Latest)
        Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
        task.data.train.images[0] = tmp_path / "a.png"  # read when its batch comes: it could fail to decode
        assert isinstance(task.train_batches(0).batches, distributed.Lockstep)
    finally:
        distributed._world = distributed.World()
