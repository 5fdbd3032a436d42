"""Config mistakes that need no data fail here: right after Hydra composes the config, before torch,
open_clip, the data or MLflow load (a second, not the ~20 s a run takes to reach its data). Each
key's type, choices and range are its schema's (fastclip/schema); the rules here join keys of
several groups. What needs the data (its files, its size) is checked when the task builds it,
still before training; the command line itself, before Hydra composes it, in fastclip.override_checks.

Only omegaconf and torch-free fastclip modules are imported at module level: keep it that way.
"""
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from fastclip.models.meaning import check_tokenizer, dtp_towers
from fastclip.schema import typed, typed_config, typed_group
from fastclip.schema.errors import ConfigError
from fastclip.schema.steps import steps_of

CLIP_DATASETS = ("digits", "image_folder", "csv", "coco2014", "webdataset")
# the datasets that bring a class-captioned held-out set (zero-shot top-1)
ZERO_SHOT_DATASETS = ("digits", "image_folder")
LEARNED_IMAGE_BOUNDARIES = ("gumbel", "entropy_spike")
IMAGE_ONLY_BOUNDARIES = ("tome", "patch_dropout", "evit", "lowres")  # the peer baselines: token reduction in a ViT


def check_config(cfg: DictConfig) -> DictConfig:
    """-> the config merged onto its schema (fastclip.schema.typed_config: every value of its declared
    type), which the run then uses. Raises ConfigError naming the key, its value and what to set
    instead: first each key's type, choices and range (its schema's), then the rules that join keys
    of several groups (here)."""
    _no_missing_values(cfg)
    typed(cfg)
    cfg = typed_config(cfg)
    task = cfg.task.name
    if task == "clip":
        _check_clip(cfg)
    elif task == "lm":
        _check_lm(cfg)
    else:
        raise ConfigError(f"task={task!r}: expected clip or lm")
    _check_run_length(cfg)
    _check_compression(cfg)
    return cfg


def _check_compression(cfg: DictConfig) -> None:
    name = cfg.compression.name
    if name != "none" and cfg.task.name != "clip":
        raise ConfigError(f"compression={name} with task={cfg.task.name}: compression is evaluated by zero-shot and "
                          f"retrieval (task=clip)")
    if name == "prune" and cfg.trainer.max_steps:  # the run's length is known before the data: pruning must fit in it
        total = cfg.trainer.max_steps
        typed_group(cfg, "compression").span(total, steps_of(cfg.trainer.warmup_steps, total, "trainer.warmup_steps"))


def _no_missing_values(cfg: DictConfig) -> None:
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "?"
        raise ConfigError(f"{key} is required (it is ??? in the config): pass {key}=...") from None


def _check_clip(cfg: DictConfig) -> None:
    ds, enc, boundary = cfg.dataset, cfg.encoder, cfg.boundary
    if "pre_layers" in enc:
        raise ConfigError(f"encoder={enc.name} is a char LM geometry; task=clip needs a CLIP encoder "
                          f"(vit_tiny, vit_b16, vit_b32, rn50)")
    if ds.name not in CLIP_DATASETS:
        raise ConfigError(f"dataset={ds.name} is not an image-text dataset for task=clip ({', '.join(CLIP_DATASETS)})")
    try:
        towers = dtp_towers(boundary)
        check_tokenizer(enc.tokenizer, boundary, towers)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not _has_eval_set(cfg):
        raise ConfigError(f"dataset={ds.name} brings no evaluation set as configured: "
                          + {"webdataset": "set dataset.eval_shards (held-out shards: `make_shards --eval-fraction` "
                                           "writes them) or eval.imagenet_val",
                             "csv": "set dataset.eval_path (a held-out CSV), dataset.eval_fraction > 0 or "
                                    "eval.imagenet_val"}.get(ds.name, "set eval.imagenet_val"))
    if cfg.eval.placement_control:
        if ds.name not in ZERO_SHOT_DATASETS:
            raise ConfigError(f"eval.placement_control=true reports zero-shot top-1; dataset={ds.name} has no "
                              f"class-captioned held-out set ({', '.join(ZERO_SHOT_DATASETS)} have one)")
        if boundary.name not in LEARNED_IMAGE_BOUNDARIES or "image" not in towers:
            raise ConfigError("eval.placement_control=true compares learned image boundaries with other images' ones: "
                              f"boundary={boundary.name} with boundary.apply_to={list(boundary.apply_to)} has none "
                              f"(boundary=gumbel or entropy_spike with image in boundary.apply_to)")


def _has_eval_set(cfg: DictConfig) -> bool:
    ds = cfg.dataset
    if cfg.eval.imagenet_val or ds.name in ("digits", "image_folder", "coco2014"):
        return True
    if ds.name == "csv":
        return bool(ds.eval_path) or ds.eval_fraction > 0
    if ds.name == "webdataset":
        return bool(ds.eval_shards)
    return False


def _check_lm(cfg: DictConfig) -> None:
    if cfg.dataset.name != "text8":
        raise ConfigError(f"task=lm needs dataset=text8 (a text8-format file), got dataset={cfg.dataset.name}")
    if "pre_layers" not in cfg.encoder:
        raise ConfigError(f"encoder={cfg.encoder.name} is a CLIP geometry; task=lm needs a char LM encoder "
                          f"(char_lm_small, char_lm_bench, char_lm_paper)")
    if cfg.boundary.name in IMAGE_ONLY_BOUNDARIES:
        raise ConfigError(f"boundary={cfg.boundary.name} reduces image tokens inside a ViT; it is not a boundary "
                          f"method for character sequences (task=lm)")


def _check_run_length(cfg: DictConfig) -> None:
    # before the data is read, the run's length is known only from max_steps; otherwise only the
    # value's form is checked (the schema), and its length once the data is read (loop.Trainer)
    tc = cfg.trainer
    warmup_steps(tc.warmup_steps, tc.max_steps or 1 << 62, f"trainer.max_steps={tc.max_steps}")
    if tc.full_token_steps:
        if cfg.task.name != "clip":
            raise ConfigError(f"trainer.full_token_steps={tc.full_token_steps} with task={cfg.task.name}: the full-token "
                              f"phase turns off a CLIP tower's token reduction (task=clip)")
        if cfg.eval.placement_control:
            raise ConfigError(f"trainer.full_token_steps={tc.full_token_steps} with eval.placement_control=true: the "
                              f"final model pools nothing, so there is no placement to control")
        if tc.max_steps and steps_of(tc.full_token_steps, tc.max_steps, "trainer.full_token_steps") > tc.max_steps:
            raise ConfigError(f"trainer.full_token_steps={tc.full_token_steps} is longer than the run "
                              f"(trainer.max_steps={tc.max_steps})")


def warmup_steps(value, total: int, run: str) -> int:
    """trainer.warmup_steps as steps: an integer, or a fraction of the run in (0, 1). A warm-up
    longer than the run (`run` says how long it is) is an error: its lr would never reach trainer.lr
    (an old version of the README's grid, at epochs=1, ran 11 steps under a 20-step warm-up and stayed at chance)."""
    steps = steps_of(value, total, "trainer.warmup_steps")
    if steps > total:
        raise ConfigError(f"trainer.warmup_steps={value} is longer than {run}: the learning rate would never reach "
                          f"trainer.lr. Use fewer steps, or a fraction of the run (trainer.warmup_steps=0.1 warms up "
                          f"over the first 10%)")
    return steps
