"""Data-parallel training on torch.distributed: which process this is, the process group, and the
few collectives the loop needs. Everything here is a no-op in a single process (World(0, 1, 0)).

The process group comes from the environment, as torchrun sets it (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT); in a job of several tasks launched by Submitit (SLURM, or local), from Submitit's
TorchDistributedEnvironment; for tasks `srun` started alone, from the variables srun sets (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, read through Submitit's SlurmJobEnvironment). Neither
touches CUDA_VISIBLE_DEVICES: SLURM's GPU binding stays (a task bound to one GPU trains on cuda:0, one
that sees the node's GPUs on cuda:local_rank). nccl on CUDA, gloo on CPU. The loop's small host-side
agreements (batch sizes, a stop request, skip counts, evaluation results) go over a gloo group, so
on CUDA they never wait for the GPU's queue.
"""
import datetime
import itertools
import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from fastclip.errors import InputError

log = logging.getLogger(__name__)

# the training collectives (gradients, the gathered loss): a rank that stopped answering fails the others
# after this, not after hours
TRAINING_TIMEOUT = datetime.timedelta(minutes=30)
# the host group: the others wait here while rank 0 writes a checkpoint (or, for a task that does not share
# its evaluation, evaluates)
HOST_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes: MLflow, checkpoints, the run dir's files, evaluation."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_world = World()
_host_group = None  # gloo: the host-side agreements


def current() -> World:
    return _world


def from_environment() -> World:
    """The world the launcher describes, without joining it: torchrun's variables, else the tasks of a
    job Submitit runs (on SLURM, or its local executor's processes), else the tasks `srun` started
    (both exported as torchrun's), else a single process. Raises ValueError where SLURM's task counts
    disagree (before any process waits for another)."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):
        import submitit
        from submitit.helpers import TorchDistributedEnvironment
        if submitit.JobEnvironment().num_tasks > 1:  # overwrite: a MASTER_PORT set by the user is the one it takes
            # set_cuda_visible_devices=False: its default narrows each task to GPU <local rank>, which under
            # --gpus-per-task (SLURM already bound one GPU, renumbered 0) leaves ranks 1.. with none
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    elif "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        _export_srun_tasks()
    if "RANK" not in os.environ:
        return World()
    return World(int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def _export_srun_tasks() -> None:
    """The tasks of a SLURM job step started by `srun` alone, exported as torchrun's variables:
    ranks from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the master the job's first node
    (SLURM_JOB_NODELIST, parsed by Submitit), its port MASTER_PORT if set, else one drawn from the
    job id (every task draws the same). Tasks on this node: SLURM_TASKS_PER_NODE ("4(x2),2"), which
    must add up to SLURM_NTASKS (ValueError naming both, as for a rank outside the counts)."""
    import random
    from submitit.slurm.slurm import SlurmJobEnvironment
    job = SlurmJobEnvironment()
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_TASKS_PER_NODE", ""))
    per_node = _tasks_per_node(spec)
    ntasks, node = job.num_tasks, int(os.environ.get("SLURM_NODEID", 0))
    if not per_node:  # as Submitit's TorchDistributedEnvironment: an even split
        per_node = [ntasks // max(1, job.num_nodes)] * max(1, job.num_nodes)
    if sum(per_node) != ntasks or not 0 <= job.global_rank < ntasks or not 0 <= node < len(per_node) \
            or not 0 <= job.local_rank < per_node[node]:
        raise InputError(f"SLURM's task counts disagree: SLURM_NTASKS={ntasks}, tasks per node {spec!r} "
                         f"({sum(per_node)} tasks), SLURM_PROCID="
                         f"{job.global_rank}, SLURM_NODEID={node}, SLURM_LOCALID={job.local_rank}: launch the "
                         f"tasks with one srun of the job's allocation (srun --ntasks=N --ntasks-per-node=M)")
    os.environ.setdefault("MASTER_ADDR", job.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(random.Random(job.job_id).randint(20000, 60000)))
    os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(ntasks), LOCAL_RANK=str(job.local_rank),
                      LOCAL_WORLD_SIZE=str(per_node[node]))


def _tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed task counts ("4(x2),2") -> [4, 4, 2]; "" -> []."""
    out = []
    for part in filter(None, spec.split(",")):
        count, _, times = part.partition("(x")
        out += [int(count)] * (int(times.rstrip(")")) if times else 1)
    return out


def init(device_name: str) -> tuple[World, torch.device]:
    """Joins the process group the environment describes (once per process) -> (world, this rank's
    device). device_name: the config's `device` (auto, cpu, cuda)."""
    global _world, _host_group
    from fastclip.runtime import pick_device
    world = from_environment()
    device = pick_device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        device = _cuda_device(world)
    if not world.distributed:
        return world, device
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TRAINING_TIMEOUT,
                                device_id=device if cuda else None)
    # open_clip's ClipLoss gathers with torch.distributed.nn.all_gather, which warns of its deprecation every step
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
    _host_group = dist.new_group(backend="gloo", timeout=HOST_TIMEOUT)
    _world = world
    return world, device


def _cuda_device(world: World) -> torch.device:
    """cuda:local_rank where every process sees the node's GPUs (torchrun); cuda:0 where each process
    was given one (Submitit's export sets CUDA_VISIBLE_DEVICES to one GPU per task, as a site's own
    binding may). More processes on the node than GPUs they can tell apart is an error: NCCL cannot
    run two ranks on one GPU."""
    visible, per_node = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if visible >= per_node:
        return torch.device("cuda", world.local_rank)
    narrowed = "," not in os.environ.get("CUDA_VISIBLE_DEVICES", ",")
    if visible == 1 and narrowed:
        return torch.device("cuda", 0)
    raise ValueError(f"{per_node} processes on this node but {visible} GPU(s) visible to each: one GPU per process "
                     f"(torchrun --nproc_per_node <= the GPUs; on SLURM tasks_per_node = gpus_per_node), or device=cpu")


def shutdown() -> None:
    global _world, _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _world, _host_group = World(), None


def barrier() -> None:
    if _world.distributed:
        dist.barrier(group=_host_group)


def broadcast(obj):
    """Rank 0's `obj` (any picklable) on every rank."""
    if not _world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_host_group)
    return box[0]


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not _world.distributed:
        return [obj]
    out = [None] * _world.size
    dist.all_gather_object(out, obj, group=_host_group)
    return out


def host_min(values: list[int]) -> list[int]:
    """Elementwise minimum over ranks of a few host integers (one gloo all-reduce)."""
    if not _world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_host_group)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any."""
    return -host_min([-int(bool(flag))])[0] > 0


def total(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a device tensor (in place on a copy; over the training backend)."""
    if not _world.distributed:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a device tensor (over the training backend)."""
    return total(tensor) / _world.size if _world.distributed else tensor


def wrap(model: torch.nn.Module, device: torch.device, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around `model` for the training forward (gradients averaged over ranks,
    rank 0's weights broadcast at the start); the model itself when there is one process.
    find_unused_parameters: for a model some of whose parameters get no gradient on some steps (an extra
    pass over the autograd graph each step; every boundary method here uses all its parameters).
    Gradients are reduced in bucket views (gradient_as_bucket_view: no second copy of them). Buffers are
    broadcast from rank 0 before each forward only where a forward changes them: BatchNorm's running
    statistics (the RN50 tower); the ViT towers have none (LayerNorm), and their other buffers (masks,
    scan orders, token ids) are constants every rank built alike."""
    if not _world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    import inspect
    running_stats = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # torch 2.13 renamed broadcast_buffers (deprecated, a warning per rank) to forward_sync_buffers
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True,
                                   **{sync: running_stats})


class Lockstep:
    """A rank's micro-batches kept in step with every other rank's: the ranks agree on the smallest
    batch among them at each position (one host all-reduce for a window of batches read ahead: 1, 2, 4,
    then `window` at a time, so that the first step of an epoch waits for one batch only); a larger one
    is cut to it (the contrastive loss gathers features of the same size from every rank), and the epoch
    ends for all when any rank's data runs out (a rank that went on would wait forever in the next
    gradient all-reduce). size_of(batch) -> samples in it; trim(batch, n) -> the batch cut to its
    first n (n may be 0). The batches read ahead are host memory: `window` loader batches."""

    def __init__(self, batches, size_of, trim, window: int = 8):
        if window < 1:
            raise ValueError(f"Lockstep window={window}: expected >= 1")
        self.batches, self.size_of, self.trim, self.window = batches, size_of, trim, window

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        batches, ahead = iter(self.batches), 1
        while True:
            read = list(itertools.islice(batches, ahead))
            sizes = [self.size_of(b) for b in read]
            agreed = host_min(sizes + [-1] * (ahead - len(read)))  # -1: this rank's data ran out there
            for batch, size, n in zip(read, sizes, agreed):
                if n < 0:
                    return
                yield self.trim(batch, n) if n < size else batch
            if len(read) < ahead or min(agreed) < 0:
                return
            ahead = min(2 * ahead, self.window)


class RankFailed(RuntimeError):
    """What rank 0 did for every rank (a checkpoint, an evaluation) failed there; its log says why."""


def on_main(fn, what: str, share=None):
    """fn() on rank 0: its result there, and share(result) (default: the result) on the other ranks,
    which wait for it and raise RankFailed if it failed (rather than waiting in the next collective
    until the timeout)."""
    if not _world.distributed:
        return fn()
    if not _world.main:
        status, value = broadcast(None)
        if status == "failed":
            raise RankFailed(f"{what} failed on rank 0: {value}")
        return value
    try:
        result = fn()
    except BaseException as exc:
        broadcast(("failed", f"{type(exc).__name__}: {exc}"))
        raise
    broadcast(("ok", share(result) if share else result))
    return result
