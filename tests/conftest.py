import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastclip import PROJECT_ROOT
from fastclip.config import compose_train_config

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# A CLIP small enough that a test trains it in seconds on 2 cores.
TINY_CLIP = ["encoder.vision.width=32", "encoder.vision.layers=2", "encoder.vision.head_width=16",
             "encoder.text.width=32", "encoder.text.layers=2", "encoder.embed_dim=32",
             "trainer.progress=false", "trainer.warmup_steps=2"]


@pytest.fixture(autouse=True)
def logged_metrics_are_catalogued(monkeypatch):
    """Every metric a run logs through fastclip.tracking.Tracker in a test's own process (whatever it
    trains: distillation, ToMe, EViT, ImageNet...) has an entry in fastclip.eval.names.CATALOG, the
    metrics reference: a name it lacks fails the test that logged it (after the test: the loop may
    swallow a logging error). Runs in subprocesses and tests' stand-in trackers are not seen here."""
    from fastclip import tracking
    from fastclip.eval.names import catalog_entry
    missing, real = set(), tracking.Tracker.log_metrics

    def checked(self, metrics, step, flush=True):
        missing.update(name for name in metrics if catalog_entry(name) is None)
        return real(self, metrics, step, flush)
    monkeypatch.setattr(tracking.Tracker, "log_metrics", checked)
    yield
    assert not missing, f"logged but not in fastclip.eval.names.CATALOG (docs/reference/metrics.md): {sorted(missing)}"


TENSOR_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def count_tensor_reads(monkeypatch, ignore=lambda: False) -> dict[str, int]:
    """Counts tensor -> Python reads by name (on a GPU each one waits for the queue to drain),
    except while ignore() is true. -> the live counts."""
    reads: dict[str, int] = {}
    for name in TENSOR_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if not ignore():
                reads[_name] = reads.get(_name, 0) + 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def record_calls(monkeypatch, module, name: str) -> list[tuple[tuple, dict, object]]:
    """Wraps module.name for the test: each call's (args, kwargs, result), in order."""
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out
    monkeypatch.setattr(module, name, spy)
    return calls


def compose_cfg(overrides=()):
    return compose_train_config(overrides)


def same(image):
    """A stand-in transform: the PIL image as it is."""
    return image


def tokens(texts):
    """A stand-in tokenizer: [len(texts), 4] zeros."""
    return torch.zeros(len(texts), 4, dtype=torch.long)


def build(builder, overrides):
    """builder(cfg.dataset) with stand-in transforms (PIL image out as is) and tokenizer -> ClipData."""
    return builder(compose_cfg(overrides).dataset, same, same, tokens)


@pytest.fixture
def store(tmp_path):
    """A fresh MLflow store in a temporary dir."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def store_runs(store: str) -> list:
    """Every run in an MLflow store, whatever its experiment."""
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=store)
    return [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]


@pytest.fixture
def cli_env():
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable


def load_checkpoint(path):
    """A run's checkpoint, read as resume reads it (weights_only)."""
    from fastclip import checkpoint
    return checkpoint.load(path)


def run_killed_at_loss_call(cfg, run_dir, monkeypatch, call: int):
    """Runs cfg but dies (KeyboardInterrupt, as a kill) on the call-th ClipTask.loss; returns the
    checkpoint it left."""
    from fastclip.tasks.clip import ClipTask
    from fastclip.train import run
    real_loss, calls = ClipTask.loss, {"n": 0}

    def dies(self, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real_loss(self, batch)

    monkeypatch.setattr(ClipTask, "loss", dies)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir)
    monkeypatch.setattr(ClipTask, "loss", real_loss)
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


# Commands the docs show, run as pasted into bash (test_readme.py, test_docs.py)
FEW_STEPS = "trainer.max_steps=2 trainer.warmup_steps=1 trainer.progress=false eval.boundary_picture=false"
OUTSIDE = ("/data/", "slurm", "+cluster=")  # what a line needs that this machine has not: data, a cluster


def old_clip_checkpoint(tmp_path, overrides, missing: tuple[str, ...] = ()) -> Path:
    """A CLIP checkpoint as an older fastclip wrote it: the TINY_CLIP model composed with `overrides`, its
    config without the `missing` keys ("group.key": keys added since) -> tmp_path/run/checkpoints/last.pt."""
    from omegaconf import OmegaConf
    from fastclip import checkpoint
    from fastclip.models.clip import build_clip
    cfg = compose_cfg(TINY_CLIP + list(overrides))
    model, _ = build_clip(cfg.encoder, cfg.boundary)
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    for key in missing:
        group, name = key.split(".", 1)
        del config[group][name]
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    checkpoint.save(path, {"model": model.state_dict(), "config": config, "train_state": {"step": 3, "epoch": 0},
                           "run_dir": str(path.parent.parent)})
    return path


def few_steps(args: list[str]) -> list[str]:
    """A train command's arguments with FEW_STEPS' keys set to FEW_STEPS' values (a key given twice
    is an error)."""
    ours = FEW_STEPS.split()
    keys = {a.split("=", 1)[0] for a in ours}
    return [a for a in args if a.split("=", 1)[0] not in keys] + ours


def bash_words(shell, command: str) -> list[str]:
    """The arguments bash passes on for `command` (its quoting, not Python's)."""
    done = shell(f"printf '%s\\0' {command}")
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\0")[:-1]


def composable(args: list[str]) -> list[str]:
    """A train command's arguments as one run that Hydra can print (`--cfg job`): without -m, each
    swept key at its first value."""
    args = [a for a in args[3:] if a != "-m"]
    return [a.split(",")[0] if "=" in a and "," in a and not a.split("=", 1)[1].startswith(("[", "'", '"')) else a
            for a in args]


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    """Runs a command line in bash, `python` being this interpreter, in a fresh directory."""
    home = tmp_path_factory.mktemp("readme")
    (home / "bin").mkdir()
    (home / "bin" / "python").write_text(f'#!/bin/sh\nexec "{PYTHON}" "$@"\n')  # a symlink would lose the venv
    (home / "bin" / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PATH=f"{home / 'bin'}{os.pathsep}{env['PATH']}", PYTHONPATH=str(PROJECT_ROOT))

    def run(line: str, cwd: Path = home, timeout: int = 900, **extra_env) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", line], cwd=cwd, env={**env, **extra_env}, capture_output=True, text=True,
                              timeout=timeout)
    run.home = home
    return run
