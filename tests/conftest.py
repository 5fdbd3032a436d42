import os
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from fastclip import CONF_DIR, PROJECT_ROOT

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# A CLIP small enough that a test trains it in seconds on 2 cores.
TINY_CLIP = ["encoder.vision.width=32", "encoder.vision.layers=2", "encoder.vision.head_width=16",
             "encoder.text.width=32", "encoder.text.layers=2", "encoder.embed_dim=32",
             "trainer.progress=false", "trainer.warmup_steps=2"]


def compose_cfg(overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def store(tmp_path):
    """A fresh MLflow store in a temporary dir."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def cli_env():
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable
