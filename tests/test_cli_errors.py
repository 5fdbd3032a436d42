"""Command-line mistakes Hydra's own parser reports without naming the argument."""
import subprocess

import pytest

from conftest import PYTHON
from fastclip.checks import ConfigError, check_override_syntax


def test_an_unquoted_equals_sign_in_a_path_names_the_override_and_how_to_quote_it(tmp_path, cli_env):
    done = subprocess.run([PYTHON, "-m", "fastclip.train", "dataset=csv", "dataset.path=/data/a=b.csv"], cwd=tmp_path,
                          env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "error: the override 'dataset.path=/data/a=b.csv' cannot be read (mismatched input '=' expecting <EOF>): a "
        "value with '=', spaces, braces, commas or quotes needs Hydra's quotes inside the shell's: "
        "\"dataset.path='/data/a=b.csv'\"")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args", [["-m", "trainer.lr=1e-3,5e-4"], ["--cfg", "job", "dataset.path='/d/a=b.csv'"],
                                  ["hydra/launcher=submitit_local", "dataset.train_shards='/d/{000..009}.tar'"]])
def test_overrides_hydra_reads_pass(args):
    check_override_syntax(args)


def test_the_quoting_the_message_suggests_is_itself_readable():
    with pytest.raises(ConfigError) as err:
        check_override_syntax(["trainer.lr=1e-3", "dataset.path=/d/x=y z.csv"])
    suggested = str(err.value).rsplit("shell's: ", 1)[1].strip('"')
    check_override_syntax([suggested])
