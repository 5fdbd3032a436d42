"""Config mistakes that need no data fail here: right after Hydra composes the config, before torch,
open_clip, the data or MLflow load (a second, not the ~20 s a run takes to reach its data). Each
key's type, choices and range are its schema's (fastclip/schema); the rules here join keys of
several groups. What needs the data (its files, its size) is checked when the task builds it,
still before training.

Only omegaconf and torch-free fastclip modules are imported at module level: keep it that way.
"""
import re

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from fastclip.models.meaning import check_tokenizer, dtp_towers
from dataclasses import fields

from fastclip.schema import OPTIONS, ROOT, typed, typed_config
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
    _check_eval_keys(cfg)
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
        if total - steps_of(cfg.compression.finetune_steps, total, "compression.finetune_steps") < 1:
            raise ConfigError(f"compression.finetune_steps={cfg.compression.finetune_steps} leaves no steps to train "
                              f"before pruning (trainer.max_steps={total})")


def _looks_like_a_path(value: str) -> bool:
    """A directory in it or a file suffix (`shard-0.tar`): what bash's brace expansion turns into many."""
    return "/" in value or re.search(r"\.[A-Za-z]\w*$", value) is not None


def check_overrides(overrides: list[str]) -> None:
    """A key given more than once on the command line (Hydra keeps the last, silently). Where every
    value is a path, most often bash expanded an unquoted brace pattern into one argument per file, so
    that a run would train on the last shard alone, and the message says how to quote it; else it
    names the values and asks for one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    seen: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        seen.setdefault(o.key_or_group, []).append(o.input_line)
    for key, given in seen.items():
        if len(given) > 1:
            listed = f"{key} is given {len(given)} times on the command line ({', '.join(given[:3])}" \
                     f"{', ...' if len(given) > 3 else ''})"
            if all(_looks_like_a_path(line.split("=", 1)[-1]) for line in given):
                raise ConfigError(f"{listed}: bash expands an unquoted brace pattern into one argument per file; "
                                  f"quote it for bash and Hydra: \"{key}='/path/{{000..009}}.tar'\"")
            raise ConfigError(f"{listed}: give it once (Hydra would silently keep the last, {given[-1]})")


def check_override_syntax(args: list[str]) -> None:
    """Each command-line override Hydra's grammar cannot read (most often an unquoted '=' or space in
    a path: `dataset.path=/data/a=b.csv`), named with the quoting that reads it, before Hydra's own
    parser says only "mismatched input '='" without naming the argument."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:  # Hydra's flags and their values
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as exc:
            key, _, value = arg.partition("=")
            reason = str(exc).strip().splitlines()[0]
            raise ConfigError(f"the override {arg!r} cannot be read ({reason}): a value with '=', spaces, braces, "
                              f"commas or quotes needs Hydra's quotes inside the shell's: \"{key}='{value}'\"") from None


def check_override_keys(args: list[str]) -> None:
    """Each overridden key the config tree does not have, named with the nearest keys it does have
    (`trainer.max_step` -> "did you mean trainer.max_steps?"), before Hydra's own error, which advises
    appending it with `+`. A key of a group must be declared by the option the run composes the group
    with (fastclip.group_choices: the command line's, an experiment's or task's, or the default); one
    only other options declare is named with them (`boundary=tome boundary.random_offset=true`). In a
    multirun Hydra applies an unswept key to the default option first, so one that option lacks is
    refused with the one-value sweep that reaches every job (`boundary.random_offset='choice(true)'`).
    A nonzero `boundary.loss_weight` where no job's option has an auxiliary loss is refused (in a
    multirun across options, those without one ignore it). `+experiment=...` (a group the defaults list
    has, which Hydra would refuse as given twice) is named with its fix; other appends (`+`, `++`),
    deletions (`~`), hydra's and other groups' keys (cluster, hydra/launcher) are Hydra's to judge. An unknown option of a main group (`boundary=gumbl`) gets the
    same suggestion."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import OverrideParseException

    from fastclip.group_choices import conf_options, defaults_groups
    parser = OverridesParser.create()
    judged, given = [], {}
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_overrides([arg])[0]
        except OverrideParseException:
            continue  # check_override_syntax names it
        group = override.key_or_group
        if (override.is_add() or override.is_force_add()) and "." not in group and group in defaults_groups():
            sign = "++" if override.is_force_add() else "+"
            raise ConfigError(f"{arg}: {group} is in the run's defaults list (conf/train.yaml), so it is chosen "
                              f"without {sign}: write {arg.removeprefix(sign)} ({sign} adds a group that is not there)")
        if override.is_add() or override.is_force_add() or override.is_delete() or override.package is not None:
            continue
        if override.value_type == ValueType.GLOB_CHOICE_SWEEP:  # the group's options it matches
            values = override.value().filter(conf_options(group)) if "." not in group else []
        elif override.is_sweep_override():  # a grid's values (a range or an interval names no option)
            values = list(override.sweep_string_iterator()) if override.is_choice_sweep() else []
        else:
            values = [override.value()]
        judged.append((override, values))
        if "." not in override.key_or_group and values:
            given[override.key_or_group] = (values, override.is_sweep_override())
    multirun = bool({"-m", "--multirun"} & set(args)) or "hydra.mode=MULTIRUN" in args
    for override, values in judged:
        _check_key(override, values, given, multirun)


def _check_key(override, values: list, given: dict, multirun: bool) -> None:
    key = override.key_or_group
    head, _, rest = key.partition(".")
    if head == "hydra" or "/" in head:
        return
    root = {f.name for f in fields(ROOT)} - set(OPTIONS)
    if head not in OPTIONS:
        if head in root or _is_conf_group(head):  # a run key (seed, epochs), or cluster=, experiment=
            return
        known = sorted(root | set(OPTIONS))
        if rest:  # a misspelt group: suggest only the groups that declare the key
            known = [g for g in OPTIONS if rest.split(".")[0] in _declared(g)] or known
        raise ConfigError(f"{key} is not a config key{_nearest(head, known, suffix='.' + rest if rest else '')} "
                          f"(top-level keys and groups: {', '.join(sorted(root | set(OPTIONS)))})")
    if not rest:  # the group's option
        for value in values:
            if isinstance(value, str) and value not in OPTIONS[head]:
                raise ConfigError(f"{key}={value}: no such option{_nearest(value, list(OPTIONS[head]), head + '=')} "
                                  f"({head} options: {', '.join(OPTIONS[head])})")
        return
    from fastclip.group_choices import chosen
    field = rest.split(".")[0]
    owners = [option for option in OPTIONS[head] if field in _declared(head, option)]
    choices = chosen(head, given)  # None: not readable here, left to Hydra
    jobs = [job for job in choices.jobs if job.option in OPTIONS[head]] if choices else []
    if not owners:  # no option has it: the nearest keys of the option chosen (of the group, where unknown)
        one = len(jobs) == 1 and len(OPTIONS[head]) > 1
        keys = _declared(head, jobs[0].option) if one else _declared(head)
        raise ConfigError(f"{key} is not a config key{_nearest(field, keys, head + '.')} "
                          f"(keys of {f'{head}={jobs[0].option}' if one else head}: {', '.join(keys)})")
    for job in jobs:
        if job.option not in owners:
            keys = _declared(head, job.option)
            raise ConfigError(f"{key} is not a key of {head}={job.option} ({job.why}){_nearest(field, keys, head + '.')}"
                              f": {field} is a key of {head}={', '.join(owners)} (keys of {head}={job.option}: "
                              f"{', '.join(keys)})")
    if (head, field) == ("boundary", "loss_weight") and jobs and any(_number(v) for v in values):
        if not any(OPTIONS[head][job.option].AUXILIARY_LOSS for job in jobs):  # else a job that has none ignores it
            raise ConfigError(f"{override.input_line}: boundary={','.join(job.option for job in jobs)} has no auxiliary "
                              f"loss to weigh (gumbel, entropy_spike and unigram have one); leave it 0")
    master = choices.master if choices else None
    if multirun and master and not override.is_sweep_override() and master.option not in owners:
        value = override.input_line.split("=", 1)[1]
        raise ConfigError(f"{key}={value} in a multirun: Hydra first applies a key that is not swept to one config "
                          f"for the sweeper, composed with {head}={master.option} ({master.why}), which has no "
                          f"{field}; give it as a one-value sweep, which reaches each job alone: '{key}=choice({value})'")


def _number(value) -> float | None:
    """A value as a number (a sweep's values come as strings); None where it is none (an interpolation)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _declared(group: str, option: str | None = None) -> list[str]:
    """The keys some option of `group` (or `option` alone) declares in its schema."""
    schemas = [OPTIONS[group][option]] if option else OPTIONS[group].values()
    return sorted({f.name for schema in schemas for f in fields(schema)})


def _nearest(word: str, known: list[str], prefix: str = "", suffix: str = "") -> str:
    import difflib
    close = difflib.get_close_matches(word, known, n=2, cutoff=0.7)
    return f"; did you mean {' or '.join(prefix + c + suffix for c in close)}?" if close else ""


def _is_conf_group(name: str) -> bool:
    from fastclip import CONF_DIR
    return (CONF_DIR / name).is_dir()


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
    from fastclip import CONF_DIR
    timeout = OmegaConf.load(CONF_DIR / "trainer" / "default.yaml").loader_timeout_s
    for key, value, unread in (("num_workers", cfg.trainer.num_workers, cfg.trainer.num_workers not in ("auto", 0)),
                               ("loader_timeout_s", cfg.trainer.loader_timeout_s, cfg.trainer.loader_timeout_s != timeout)):
        if unread:  # a value task=lm would not read: never a silent no-op
            raise ConfigError(f"trainer.{key}={value} with task=lm: the char LM reads its windows from the text in "
                              f"memory, with no loader workers; leave it " + ("auto (or 0)" if key == "num_workers" else str(timeout)))


def _check_eval_keys(cfg: DictConfig) -> None:
    """An eval key only the other task reads (schema Eval.READ_BY), set apart from its default."""
    from fastclip import CONF_DIR
    from fastclip.schema.run import Eval
    defaults, task = OmegaConf.load(CONF_DIR / "eval" / "default.yaml"), cfg.task.name
    for key, reader in Eval.READ_BY.items():
        value = cfg.eval[key]
        if reader != task and value != defaults[key]:
            raise ConfigError(f"eval.{key}={_yaml(value)} with task={task}: only task={reader} reads it (" + (
                "the char LM is evaluated by bits per character on text windows in memory, with no images or loader"
                if task == "lm" else "the char LM's evaluation batch") + f"); leave it {_yaml(defaults[key])}")


def _yaml(value) -> str:
    """A scalar as the command line writes it (true, null)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


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
