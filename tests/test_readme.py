"""The README's "Used by" commands work as pasted into bash. Those that need no outside data run
(a few steps each); those that do (paths under /data/, a SLURM cluster) are composed with Hydra
(`--cfg job`), so a README line whose overrides do not parse or compose fails CI; `make` lines
must name real targets (`make -n`)."""
import re
import shlex

import pytest

from conftest import FEW_STEPS, OUTSIDE, bash_words, composable
from fastclip import PROJECT_ROOT

def used_by_commands() -> list[str]:
    """The command lines of the README's "Used by" block, comments dropped."""
    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split("## Used by", 1)[1].split("\n## ", 1)[0]
    lines = [line.strip() for line in block.splitlines() if line.startswith("    ")]
    commands = [re.sub(r"\s+#\s.*$", "", line) for line in lines if line.startswith(("python ", "make "))]
    assert len(commands) >= 15, "the README's Used by block went missing"
    return commands


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
