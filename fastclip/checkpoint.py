"""fastclip checkpoints: one file per run (`<run dir>/checkpoints/last.pt`) that continues the run
exactly and carries everything needed to rebuild its model.

The file is a dict that `torch.load(weights_only=True)` reads (tensors, numbers, strings, lists,
dicts; no pickled objects):

    format, version         "fastclip.checkpoint", 3
    model, optimizer, scheduler, scaler   state dicts
    train_state             loop.TrainState.state_dict(): step, epoch, data position, RNG, skip counts
    config                  the resolved config the run trained with (plain containers)
    choices                 the config group options it was composed with (Hydra's runtime choices)
    run_dir, mlflow_uri, mlflow_run_id    where the run writes
    compression             the compression option's state, where it has one (prune: masks, schedule)

Version 1 (before the loop's state had a type) kept the state's fields at the top level and
the RNG state as numpy objects; version 2 called the compression state `pruner` (compression=prune
had the only one). load() reads both as version 3.
"""
import errno
import os
import shutil
import zipfile
from pathlib import Path

import torch

from fastclip.errors import InputError, InputNotFound

FORMAT = "fastclip.checkpoint"
VERSION = 3


class CheckpointError(InputError):
    """A file that is not a readable fastclip checkpoint."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (full disk, no permission); the message names the file."""


class ResumeError(InputError):
    """A checkpoint that cannot continue this run; raised before anything of the run is touched."""


def save(path: str | os.PathLike, payload: dict) -> None:
    """Atomic and durable: written to `<path>.tmp`, flushed to the disk (fsync), then renamed over
    `path`, so a crash or a full disk never leaves a half-written checkpoint in its place.

    Raises CheckpointWriteError (an OSError) naming `path` and the cause (e.g. "no space left on
    device, 12 MB free") when the write fails; the partial `.tmp` file is removed and the previous
    checkpoint at `path`, if any, is kept as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        # a Python file object, not a path: torch's own C++ writer reports a full disk as
        # "basic_ios::clear: iostream error" and loses the errno
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"{path}: the checkpoint could not be written ({_write_failure(exc, path.parent)}); "
                                   f"the partial file was removed and the previous checkpoint, if any, is kept") from exc
    except BaseException:  # Ctrl-C mid-write: no partial file left behind either
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power cut


def _write_failure(exc: BaseException, folder: Path) -> str:
    """The cause of a failed write in words: the errno's, with the free space when the disk is full."""
    seen = exc
    while seen is not None and not (isinstance(seen, OSError) and seen.errno):
        seen = seen.__cause__ or seen.__context__
    code = seen.errno if seen is not None else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f", {shutil.disk_usage(folder).free / 1e6:.0f} MB free there"
        except OSError:
            free = ""
        return f"{os.strerror(code).lower()}{free}"
    if code is not None:
        return os.strerror(code).lower()
    return f"{type(exc).__name__}: {exc}"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the data itself is already synced
        pass
    finally:
        os.close(fd)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """The checkpoint at `path` as a version-2 dict. Errors name the file: FileNotFoundError when it
    does not exist, CheckpointError when it is not a torch file or not a fastclip checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: {'a directory, not a checkpoint file' if path.is_dir() else 'no such checkpoint file'}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file is not one)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        state = _load_version_1(path, map_location, exc)
    if not isinstance(state, dict) or ("format" in state and state["format"] != FORMAT):
        raise CheckpointError(f"{path}: not a fastclip checkpoint (format {_describe(state)})")
    if "format" not in state:
        return _upgrade_version_1(path, state)
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state['version']} is newer than this fastclip "
                              f"reads ({VERSION}); update fastclip")
    if state.get("version", 0) < 3 and "pruner" in state:
        state["compression"] = state.pop("pruner")
    return state


def _describe(state) -> str:
    if isinstance(state, dict):
        return repr(state.get("format", f"a dict with keys {sorted(map(str, state))[:6]}"))
    return type(state).__name__


def _load_version_1(path: Path, map_location, first_error: Exception) -> dict:
    """Version 1 stored numpy's RNG state as numpy objects, which weights_only refuses unless
    those types are allowed; nothing else is allowed."""
    import numpy as np
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.core.multiarray._reconstruct] \
        if hasattr(np, "core") else [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # torch's own text suggests weights_only=False: not for a file that is not ours
        raise CheckpointError(f"{path}: not a readable fastclip checkpoint (torch.load(weights_only=True) refused it: "
                              f"{type(first_error).__name__}; a fastclip checkpoint holds only tensors, numbers, "
                              f"strings, lists and dicts)") from first_error


def _upgrade_version_1(path: Path, state: dict) -> dict:
    required = ("model", "optimizer", "scheduler", "step", "epoch", "config")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a fastclip checkpoint (no {missing})")
    rng = state.get("rng")
    if rng is not None and not isinstance(rng["numpy"][1], list):
        rng = {**rng, "numpy": (rng["numpy"][0], rng["numpy"][1].tolist(), *rng["numpy"][2:])}
    task = state.get("task", {})
    train_state = {"step": state["step"], "epoch": state["epoch"], "train_s": state.get("train_s", 0.0),
                   "samples_seen": state.get("samples_seen", 0), "rng": rng,
                   # version 1 counted the data position in optimizer steps, not loader batches
                   "batch_in_epoch": None, "steps_in_epoch": state.get("batch_in_epoch", 0),
                   "skipped": {"bad sample": task.get("skipped", 0)} if task.get("skipped") else {}}
    return {"format": FORMAT, "version": VERSION, "model": state["model"], "optimizer": state["optimizer"],
            "scheduler": state["scheduler"], "scaler": state.get("scaler", {}), "train_state": train_state,
            "config": state["config"], "choices": None, "run_dir": str(path.resolve().parent.parent),
            "mlflow_uri": None, "mlflow_run_id": state.get("mlflow_run_id")}
