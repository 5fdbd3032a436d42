"""trainer.num_workers and eval.num_workers: a count of DataLoader worker processes, or "auto".

"auto" is this process's share of the CPUs it may run on (os.sched_getaffinity: a SLURM job's or a
container's cpuset, not the machine's core count), divided among the node's ranks (LOCAL_WORLD_SIZE, as
torchrun and fastclip.distributed set it), less one for the training process itself. A source whose
samples are already decoded in memory (the embedded digits: 8x8 images, a transform of well under a
millisecond a sample) gets 0 workers instead: handing each batch between processes costs more than
making it (bench-loader and the loader table in docs/results/benchmarks.md measure both)."""
import contextlib
import os

from fastclip.schema.errors import ConfigError

AUTO = "auto"
_ELSEWHERE = []  # non-empty: configs are checked for processes on another host (elsewhere())


@contextlib.contextmanager
def elsewhere():
    """check_workers leaves out the count against this process's CPUs: the configs checked here run
    on other hosts (a grid's jobs checked on a login node before SLURM places them: fastclip.
    sweep_preflight); each job checks its count again where it runs."""
    _ELSEWHERE.append(True)
    try:
        yield
    finally:
        _ELSEWHERE.pop()


def available_cpus() -> int:
    """CPUs this process may run on, divided among the local ranks (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS): every core
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def check_workers(key: str, value) -> None:
    """ConfigError naming key and value unless value is "auto" or a count from 0 to available_cpus()
    (more workers than CPUs only time-slice the same cores, and each holds a copy of the source)."""
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}={value!r}: expected a worker count >= 0 or {AUTO}")
    cpus = available_cpus()
    if value > cpus and not _ELSEWHERE:
        raise ConfigError(f"{key}={value}: more loader workers than the {cpus} CPUs this process may use "
                          f"(os.sched_getaffinity / LOCAL_WORLD_SIZE); set at most {cpus}, or {AUTO}")


def resolve_workers(key: str, value, in_memory: bool = False) -> int:
    """The worker count `value` stands for ("auto" resolved as the module says; in_memory: the source's
    samples need no decoding). Raises ConfigError as check_workers."""
    check_workers(key, value)
    if value != AUTO:
        return int(value)
    return 0 if in_memory else available_cpus() - 1


IN_MEMORY_SOURCES = ("digits",)  # dataset names whose training samples are decoded when the data is built


def loader_workers(cfg, key: str = "trainer.num_workers") -> int:
    """trainer.num_workers (or eval.num_workers) of a composed config as a count. task=lm: 0, whatever
    the key says: its windows are sliced from the text in memory, with no DataLoader (override_checks refuses
    a count there), and the training process may use every core (runtime.set_torch_threads)."""
    if cfg.task.name == "lm":
        return 0
    group, name = key.split(".")
    return resolve_workers(key, cfg[group][name], in_memory=cfg.dataset.name in IN_MEMORY_SOURCES)
