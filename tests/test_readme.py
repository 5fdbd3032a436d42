"""The README's "Used by" commands work as pasted into bash. Those that need no outside data run
(a few steps each); those that do (paths under /data/, a SLURM cluster) are composed with Hydra
(`--cfg job`), so a README line whose overrides do not parse or compose fails CI; `make` lines
must name real targets (`make -n`)."""
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON
from fastclip import PROJECT_ROOT

FEW_STEPS = "trainer.max_steps=2 trainer.warmup_steps=1 trainer.progress=false eval.boundary_picture=false"
OUTSIDE = ("/data/", "slurm", "+cluster=")  # what a line needs that this machine has not: data, a cluster


def used_by_commands() -> list[str]:
    """The command lines of the README's "Used by" block, comments dropped."""
    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split("## Used by", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in block.splitlines() if line.startswith("    ")]
    commands = [re.sub(r"\s+#\s.*$", "", line) for line in lines if line.startswith(("python ", "make "))]
    assert len(commands) >= 15, "the README's Used by block went missing"
    return commands


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


@pytest.mark.slow
def test_every_used_by_command_works_as_pasted(shell):
    ran, composed = [], []
    for command in used_by_commands():
        if command.startswith("make "):
            done = shell(f"make -n {command[5:]}", cwd=PROJECT_ROOT)
            assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
            continue
        if not command.startswith("python -m fastclip.train"):
            continue  # make_shards on outside data: its own tests cover it
        if any(marker in command for marker in OUTSIDE):
            done = shell(shlex.join(["python", "-m", "fastclip.train", *composable(bash_words(shell, command)),
                                     "--cfg", "job"]))
            composed.append(command)
        else:
            runs = sorted(p for p in (shell.home / "outputs" / "runs").glob("*/*") if (p / "checkpoints").is_dir())
            done = shell(f"{command} {FEW_STEPS}", RUN=str(runs[-1]) if runs else "")
            ran.append(command)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    assert len(ran) >= 8 and len(composed) >= 5, (ran, composed)
