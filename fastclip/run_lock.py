"""One writer per run dir. A run holds an exclusive lock on `<run dir>/.fastclip.lock` for its whole
life, so a second process started on the same run (a requeue overlapping its first run, the same
job submitted twice, a resume of a run that is still training) is refused before it opens the
MLflow run or touches a checkpoint.

The lock is the kernel's `flock` on an open file: it goes with the process, so a killed run
(SIGKILL, OOM, a node lost) never leaves it stuck; the file's text only names the holder for
the error message. On file systems where `flock` is not shared between hosts (some NFS set-ups),
two hosts are not kept apart: the holder's host is in the message for that reason.
"""
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".fastclip.lock"


class RunDirNotWritable(OSError):
    """The run dir refuses the lock file, the run's first write (read-only, no permission, full)."""


class RunDirInUse(RuntimeError):
    """Another live process holds this run dir; the message names it (pid, host, since when)."""


@contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the run dir's lock while the block runs; yields the lock file's path.

    Raises RunDirInUse, naming the holder, when another process holds it; RunDirNotWritable, naming
    the dir and the cause, when the lock file cannot be created there. The lock is released
    when the block ends or the process dies, whichever comes first."""
    path = Path(run_dir) / LOCK_NAME
    try:  # the run's first write into its run dir: a read-only one fails here, before any work
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise RunDirNotWritable(f"{Path(run_dir)}: the run dir is not writable ({exc.strerror}): a run writes its "
                                f"lock, config, checkpoints and logs there") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(_read(fd))
        os.close(fd)
        raise RunDirInUse(f"{Path(run_dir)} is in use by {holder}: a run dir takes one run at a time "
                          f"(wait for it to end, or kill it; its lock goes with the process)") from None
    try:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield path
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    return f"process {holder['pid']} on {holder.get('host', '?')} (since {holder.get('since', '?')})"
