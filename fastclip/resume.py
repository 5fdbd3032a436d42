"""Resuming (`trainer.resume=<run dir>/checkpoints/last.pt`) continues the run the checkpoint came
from: its resolved config is the base, and only what THIS command line overrides applies on top.
Keys that may change mid-run (the schedule's length and lr, evaluation, I/O) are applied and
recorded; keys that cannot (model geometry, boundary method, data, seed, ...) fail, naming each,
before anything of the run is touched. The run keeps its run dir (a later resume finds the new
last.pt there) and its MLflow run. `trainer.resume=auto` resumes the run dir's own last.pt where
there is one (a requeued job), else starts the run.
"""
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from fastclip import CONF_DIR, checkpoint
from fastclip.checkpoint import ResumeError
from fastclip.checkpoint_paths import checkpoint_path
from fastclip.config import APPENDED_GROUPS, NAMED_GROUPS, flatten, unflatten
from fastclip.schema.resume_rules import GUESSED, MUTABLE_KEYS, RUNTIME_KEYS, missing_legacy, rule_of

log = logging.getLogger(__name__)

# What a resume may change is each key's declaration in the schema (fastclip/schema/fields.py):
# runtime (how a run executes and where it writes; the report does not tell runs apart by them) and
# mutable (how long and how fast it goes on, what it evaluates). trainer.warmup_steps is frozen: the
# warm-up was resolved to steps when the run started and the checkpoint keeps that count.
RUNTIME = RUNTIME_KEYS
MUTABLE = MUTABLE_KEYS


def is_mutable(key: str) -> bool:
    return rule_of(key) in ("mutable", "runtime")


@dataclass
class Resume:
    checkpoint_path: Path
    checkpoint: dict
    config: DictConfig              # what the resumed run trains with
    changes: dict[str, tuple]       # key -> (the checkpoint's value, the value now)
    run_dir: Path
    choices: dict[str, str]         # the config group options of the checkpoint's run


def resolve_auto(cfg: DictConfig, run_dir: str | os.PathLike) -> DictConfig:
    """trainer.resume=auto: the run dir's own last checkpoint where there is one (a requeued SLURM job
    re-runs in the same Hydra job dir), else a new run. -> cfg with trainer.resume a path or null."""
    ckpt = Path(run_dir) / "checkpoints" / "last.pt"
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.trainer.resume = str(ckpt) if ckpt.is_file() else None
    log.info("trainer.resume=auto: %s", f"continuing from {ckpt}" if ckpt.is_file()
             else f"no checkpoint in {run_dir} yet, a new run")
    return cfg


def refuse_changes_under_auto(resume: "Resume") -> None:
    """A requeued job re-runs its own command: under trainer.resume=auto a checkpoint whose config this
    command line changes is another run's (a reused run or sweep dir), not this job's."""
    if resume.changes:
        listed = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in sorted(resume.changes.items()))
        raise ResumeError(f"trainer.resume=auto found {resume.checkpoint_path}, but this command line changes its run "
                          f"({listed}): a requeued job changes nothing. Use a new run dir, or continue that run with "
                          f"these changes by naming it: trainer.resume={resume.checkpoint_path}")


def prepare(cfg: DictConfig, overrides: list[str] | None) -> Resume:
    """The resumed run's config and run dir. overrides: this command line's (Hydra's task
    overrides); None when a caller hands over a composed config (then what it sets apart from
    the defaults of its groups counts as overridden).
    trainer.resume: a checkpoint file, a run dir (its checkpoints/last.pt) or runs:/<MLflow run id>, as
    fastclip.infer --checkpoint takes. Raises FileNotFoundError / CheckpointError / ResumeError naming
    the problem."""
    path = checkpoint_path(cfg.trainer.resume, cfg.tracking.uri or None)
    ckpt = checkpoint.load(path)
    # a key added since the checkpoint that declares a legacy value (schema/fields.py): what its run meant
    legacy = missing_legacy(flatten(ckpt["config"]))
    old = flatten(ckpt["config"]) | legacy
    if overrides is None:
        proposal, touched = _callers_choices(cfg, ckpt)
    else:
        proposal, touched = _apply_overrides(ckpt, overrides)
    # ... unless this command line names it: choosing the checkpoint's group option again (a requeued
    # job's own command line) keeps what the checkpoint's run was
    touched -= {k for k in legacy if k not in _named_keys(overrides or [])}
    unknown = [k for k in unknown_keys(ckpt, proposal) if k not in touched]
    if unknown:  # copied into the run and its params, and read by nothing: the run would not be what it says
        raise ResumeError(f"trainer.resume={path}: {describe_unknown(ckpt, unknown)}. Resume it with that version (its "
                          f"commit is in the run's MLflow tags), or start a new run")
    effective, added = dict(old), []
    for key in touched:
        if key in proposal:
            effective[key] = proposal[key]
        else:
            effective.pop(key, None)  # `~key` on the command line
    # keys this version of fastclip added since the checkpoint (those declaring a legacy value are in old)
    for key in proposal.keys() - old.keys() - touched:
        effective[key], added = proposal[key], added + [key]
    effective["trainer.resume"] = str(path)
    changes = {k: (old.get(k), effective.get(k)) for k in sorted(touched | {"trainer.resume"})
               if k not in added and old.get(k) != effective.get(k)}
    # a key the checkpoint predates whose legacy value is a guess (schema/fields.py, `guessed`): the
    # command line may state what the run had instead
    stated = {k for k in changes if k in legacy and k in GUESSED and k in _named_keys(overrides or [])}
    for key in sorted(stated):
        log.info("resume: %s=%s as this command line states (the checkpoint predates the key; its legacy value %s "
                 "was a guess)", key, changes[key][1], changes[key][0])
    frozen = {k: v for k, v in changes.items() if not is_mutable(k) and k not in stated}
    if "trainer.num_workers" in changes and ckpt["config"]["dataset"]["name"] == "webdataset" \
            and ckpt["train_state"].get("batch_in_epoch"):
        # a stream is split between the loader's workers: another count mid-epoch deals other samples
        frozen["trainer.num_workers"] = changes["trainer.num_workers"]
    if frozen:
        listed = describe_frozen_changes(frozen)
        raise ResumeError(f"trainer.resume={path}: this command line changes what the checkpoint's run is, which a "
                          f"resume cannot: {listed}. Start a new run for that (without trainer.resume), or drop these "
                          f"overrides; a resume may change only "
                          f"{', '.join(sorted(k for k in MUTABLE if not k.startswith('eval.') and k != 'trainer.resume'))} "
                          f"and eval.*")
    new_data = sorted(k for k in added if k.startswith("dataset.") and not is_mutable(k))
    if new_data:  # e.g. dataset.val_fraction: a validation split carved from its training data, mid-run
        raise ResumeError(f"trainer.resume={path}: the checkpoint predates dataset keys this fastclip reads "
                          f"({', '.join(f'{k}={effective[k]!r}' for k in new_data)}): resumed here, its run would "
                          f"train on other data than it started with. Resume it with the version that wrote it (its "
                          f"commit is in the run's MLflow tags), or start a new run")
    if added:
        log.info("resume: keys new since the checkpoint take their defaults: %s", ", ".join(sorted(added)))
    config = OmegaConf.create(unflatten(effective))
    OmegaConf.set_struct(config, True)
    run_dir = _run_dir(path, ckpt)
    _refuse_rewind(path, ckpt, run_dir)
    return Resume(path, ckpt, config, {k: v for k, v in changes.items() if k != "trainer.resume"}, run_dir,
                  _choices(ckpt))


def unknown_keys(ckpt: dict, known: dict | None = None) -> list[str]:
    """Keys of the checkpoint's config that this fastclip's config tree lacks (composed with the
    checkpoint's own group options, or `known`, a flat config, when given): keys of a newer (or a
    retired) fastclip, which nothing here reads."""
    if known is None:
        known = flatten(_compose([f"{g}={o}" for g, o in _choices(ckpt).items()]))
    return sorted(flatten(ckpt["config"]).keys() - known.keys())


def describe_unknown(ckpt: dict, unknown: list[str]) -> str:
    old = flatten(ckpt["config"])
    listed = ", ".join(f"{k}={old[k]!r}" for k in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
    return (f"the checkpoint's config has {len(unknown)} key(s) this fastclip does not know ({listed}): it was "
            f"written by another version of fastclip, whose code read them")


def _apply_overrides(ckpt: dict, overrides: list[str]) -> tuple[dict, set]:
    """(the config the checkpoint's group choices + these overrides compose to, the keys the
    overrides set: named keys, whole groups they choose, and whatever else composing them changed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    theirs = _choices(ckpt)
    # a group option the checkpoint's run chose too (a requeued job's own command line) changes nothing,
    # even where this version's defaults for that option differ from the ones the run was composed with
    parsed = [o for o in OverridesParser.create().parse_overrides(list(overrides))
              if not o.key_or_group.startswith("hydra")
              and not ((CONF_DIR / o.key_or_group).is_dir() and str(o.value()) == theirs.get(o.key_or_group))]
    chosen = {o.key_or_group for o in parsed if (CONF_DIR / o.key_or_group).is_dir()}
    base = [f"{group}={option}" for group, option in theirs.items() if group not in chosen]
    mine = [o.input_line for o in parsed if o.key_or_group != "trainer.resume"]
    try:
        reference, proposal = (flatten(_compose(base)), flatten(_compose(base + mine)))
    except Exception as exc:
        raise ResumeError(f"resume: the checkpoint's config choices {base} with {mine} do not compose with this "
                          f"fastclip's config tree: {exc}") from exc
    touched = {k for k in reference.keys() | proposal.keys() if reference.get(k) != proposal.get(k)}
    for o in parsed:
        prefix = o.key_or_group.replace("/", ".")
        touched |= {k for k in proposal if k == prefix or k.startswith(prefix + ".")}
    return proposal, touched


def _named_keys(overrides: list[str]) -> set[str]:
    """The keys a command line's overrides name themselves (key=value, ~key, +key=value; not a group's choice)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return {o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))}


def _callers_choices(cfg: DictConfig, ckpt: dict) -> tuple[dict, set]:
    """(cfg, the keys it sets: those that differ from the defaults of its own group options, and
    every key of a group whose option differs from the checkpoint's)."""
    proposal = flatten(OmegaConf.to_container(cfg, resolve=True))
    mine = {g: cfg[g].name for g in NAMED_GROUPS if g in cfg and "name" in cfg[g]}
    reference = flatten(_compose([f"{g}={o}" for g, o in mine.items()]))
    touched = {k for k in proposal if proposal[k] != reference.get(k)}
    theirs = _choices(ckpt)
    for group in (g for g in mine if mine[g] != theirs.get(g)):
        touched |= {k for k in proposal if k.startswith(group + ".")}
    return proposal, touched


def _choices(ckpt: dict) -> dict[str, str]:
    """group -> option the checkpoint's run was composed with (Hydra's runtime choices, recorded
    in the checkpoint; else read off the named groups of its config)."""
    recorded = ckpt.get("choices") or {}
    choices = {g: o for g, o in recorded.items()
               if o is not None and not g.startswith("hydra") and g not in APPENDED_GROUPS}
    if not choices:
        choices = {g: ckpt["config"][g]["name"] for g in NAMED_GROUPS if "name" in ckpt["config"].get(g, {})}
    return choices


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():  # inside the CLI's Hydra app: compose with it, leave it as it is
        return OmegaConf.to_container(compose(config_name="train", overrides=overrides), resolve=True)
    from fastclip.config import compose_train_config
    return OmegaConf.to_container(compose_train_config(overrides), resolve=True)


def _run_dir(path: Path, ckpt: dict) -> Path:
    """The run dir the checkpoint sits in (<run dir>/checkpoints/last.pt). A run dir that was moved
    continues; a COPY of one whose original still exists cannot: both would write into the one
    MLflow run the checkpoint names."""
    resolved = path.resolve()
    recorded = Path(ckpt["run_dir"]).resolve() if ckpt.get("run_dir") else None
    if resolved.parent.name != "checkpoints":  # a checkpoint kept aside: it continues the run it came from
        if recorded is None or not recorded.is_dir():
            raise ResumeError(f"trainer.resume={path}: not in a run dir (<run dir>/checkpoints/{path.name}) and the run "
                              f"dir it came from ({recorded}) is gone: put it back as <run dir>/checkpoints/{path.name}")
        return recorded
    here = resolved.parent.parent
    if recorded is not None and recorded != here and (recorded / "checkpoints").is_dir():
        raise ResumeError(f"trainer.resume={path}: this checkpoint was written by the run in {recorded}, which still "
                          f"exists; resuming a copy would continue that run (its MLflow run "
                          f"{ckpt.get('mlflow_run_id')}) from two places. Resume {recorded / 'checkpoints' / path.name}, "
                          f"or move (not copy) the run dir")
    return here


def _refuse_rewind(path: Path, ckpt: dict, run_dir: Path) -> None:
    """A checkpoint kept aside that is older than the run's own last.pt would rewind the run: its
    newer checkpoint replaced, two histories in one MLflow run. Refused."""
    newest = run_dir / "checkpoints" / "last.pt"
    if not newest.is_file() or newest.resolve() == path.resolve():
        return
    at, now = ckpt["train_state"]["step"], checkpoint.load(newest)["train_state"]["step"]
    if now > at:
        raise ResumeError(f"trainer.resume={path}: this checkpoint is at step {at}, but the run it belongs to "
                          f"({run_dir}) is already at step {now}: resuming it would rewind that run (its newer "
                          f"checkpoint replaced, two histories in one MLflow run). Resume {newest}, or start a new run")


def describe_frozen_changes(frozen: dict[str, tuple]) -> str:
    """The changes a resume refuses, each option change first (`boundary.name: 'none' -> 'gumbel'`)
    with the keys that option sets named after it, then every other changed key with both values."""
    options = [k for k in frozen if k.endswith(".name")]
    decided = {k: [d for d in frozen if d != k and d.startswith(k[:-len("name")])] for k in options}
    said = {d for keys in decided.values() for d in keys}
    parts = [f"{k}: {frozen[k][0]!r} -> {frozen[k][1]!r}" + (f" (and what that option sets: {', '.join(decided[k])})"
                                                             if decided[k] else "") for k in options]
    parts += [f"{k}: {a!r} -> {b!r}" for k, (a, b) in frozen.items() if k not in options and k not in said]
    return "; ".join(parts)


def record(resume: Resume, run_dir: Path, step: int, launched_from: str, commit: str,
           dirty: bool) -> tuple[Path, int]:
    """Appends this resume to <run dir>/resumes.yaml (what changed, from which step, with which code,
    launched from which directory) -> (its path, this resume's number, from 1). The resumed part logs
    into the run dir's train.log; the invocation's own Hydra dir is removed when it ends."""
    import datetime
    path = run_dir / "resumes.yaml"
    history = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
    history.append({"time": datetime.datetime.now().isoformat(timespec="seconds"), "from_step": step,
                    "checkpoint": str(resume.checkpoint_path), "launched_from": launched_from, "git_commit": commit,
                    "git_dirty": dirty,
                    "changed": {k: {"from": a, "to": b} for k, (a, b) in resume.changes.items()}})
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(history)))
    return path, len(history)
