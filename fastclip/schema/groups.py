"""Which schema types which option, their registration in Hydra's ConfigStore, and `typed`."""
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fastclip.schema.compression import Distill, NoCompression, Prune, Quant
from fastclip.schema.data import Coco, Csv, Digits, ImageFolder, Text8, WebDataset
from fastclip.schema.model import (Boundary, CharLMEncoder, ClipEncoder, EntropySpike, Evit, Fixed, Gumbel, Lowres,
                                   PatchDropout, Tome, Unigram, Whitespace)
from fastclip.schema.run import ClipTask, Eval, LMTask, Run, Trainer, Tracking
from fastclip.schema.errors import ConfigError

ROOT = Run
# group -> option (the YAML file's stem, and its `name`) -> schema; trainer, eval and tracking have one
OPTIONS: dict[str, dict[str, type]] = {
    "task": {"clip": ClipTask, "lm": LMTask},
    "dataset": {"digits": Digits, "image_folder": ImageFolder, "csv": Csv, "coco2014": Coco,
                "webdataset": WebDataset, "text8": Text8},
    "encoder": {**{name: ClipEncoder for name in ("vit_tiny", "vit_b16", "vit_b32", "rn50")},
                **{name: CharLMEncoder for name in ("char_lm_small", "char_lm_bench", "char_lm_paper")}},
    "boundary": {"none": Boundary, "fixed": Fixed, "gumbel": Gumbel,
                 "entropy_spike": EntropySpike, "unigram": Unigram, "whitespace": Whitespace,
                 "tome": Tome, "patch_dropout": PatchDropout, "evit": Evit, "lowres": Lowres},
    "compression": {"none": NoCompression, "quant": Quant, "prune": Prune,
                    "distill": Distill},
    "trainer": {"default": Trainer},
    "eval": {"default": Eval},
    "tracking": {"mlflow": Tracking},
}


def register() -> None:
    """Stores the root schema as `schema_run` (train.yaml's first default) and each option's as
    `schema/<group>/<option>` (its YAML file's first default, `- /schema/<group>/<option>@_here_`).
    Idempotent; called by every process that composes the config (fastclip/__init__.py)."""
    from hydra.core.config_store import ConfigStore
    store = ConfigStore.instance()
    store.store(name="schema_run", node=ROOT)
    for group, options in OPTIONS.items():
        for option, schema in options.items():
            store.store(group=f"schema/{group}", name=option, node=schema)


def schema_of(group: str, node: Any) -> type:
    """The schema typing `node`, the config of `group` (chosen by its `name` where the group has several)."""
    options = OPTIONS[group]
    if len(options) == 1:
        return next(iter(options.values()))
    name = node.get("name") if isinstance(node, DictConfig) else None
    if name not in options:
        raise ConfigError(f"{group}={name!r}: expected one of {', '.join(options)}")
    return options[name]


def typed_config(cfg: DictConfig) -> DictConfig:
    """The config merged onto its schema: every value of the type its field declares (a resumed run's
    config, rebuilt from its checkpoint's keys, reads "8" as 8), each node typed by its option's
    dataclass. Ranges are `typed`'s. Raises ConfigError naming the key for a value of the wrong type,
    a key the schema lacks, or a required one missing."""
    tree = OmegaConf.structured(ROOT)
    for group in OPTIONS:
        tree[group] = OmegaConf.structured(schema_of(group, cfg.get(group)))
    given = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        return OmegaConf.merge(tree, given)
    except OmegaConfBaseException as exc:  # a value of the wrong type; a key the schema lacks
        raise ConfigError(_named(exc)) from None


def typed(cfg: DictConfig) -> Run:
    """The config as its schema's objects (Run, each group its option's dataclass), every type, choice
    and range checked: a config Hydra composed, a resumed run's and a caller's alike. Raises ConfigError
    naming the key, its value and what is expected."""
    try:
        return OmegaConf.to_object(typed_config(cfg))
    except OmegaConfBaseException as exc:  # e.g. a required value (???) left unset
        raise ConfigError(_named(exc)) from None


def _named(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or "?"
    return f"{key}: {str(exc).splitlines()[0]}"


def typed_group(cfg: DictConfig, group: str):
    """One group of the config as its option's dataclass (checked as `typed` checks it): what the code
    that implements the option takes, rather than the raw DictConfig."""
    return typed_node(group, cfg[group])


def typed_node(group: str, node):
    """A group's node (a DictConfig, or already its dataclass) as its option's dataclass, checked."""
    if not isinstance(node, DictConfig):
        return node
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema_of(group, node)), node))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{group}.{_named(exc)}") from None

