"""Composing the train config outside the CLI (tests, benchmarks): the same tree, no Hydra run;
and the config as flat dotted keys (MLflow params, resume's comparison)."""
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from fastclip import CONF_DIR
from fastclip.schema import register

register()  # the schemas conf/'s YAML files name first in their defaults (fastclip/schema); before any compose

# Config groups whose option is recorded as <group>.name (a run's choices when Hydra's are absent)
NAMED_GROUPS = ("task", "dataset", "encoder", "boundary", "compression")
# Groups chosen with +group=option (not in train.yaml's defaults): where a job runs, never what it
# trains; a checkpoint does not record them, so a resume need not repeat them
APPENDED_GROUPS = ("cluster",)


def compose_train_config(overrides=(), return_hydra_config: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and empty dicts are leaves."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree
