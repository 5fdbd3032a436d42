"""Config values a run does not read. Some keys are shared so that a multirun can set them across
options or tasks (the boundary placement keys, boundary.loss_weight, a task's own eval and trainer
keys, a key one value of another reads: a schema's READ_WHEN); a job whose option or task ignores one runs without it. The command line refuses such a key
where no job reads it (fastclip.override_checks); a job that ignores one names it in its MLflow run
(tag `fastclip.unread_keys`) and its log, so its logged config does not pass for what it ran.

Torch-free: the command-line check imports it before Hydra composes anything.
"""
import functools
from dataclasses import fields

from omegaconf import OmegaConf

from fastclip.schema.groups import OPTIONS
from fastclip.schema.model import PLACEMENT_CONDITIONS, Boundary, placement_unread
from fastclip.schema.run import Eval, Trainer

PLACEMENT = {f.name for f in fields(Boundary)} - {"name"}  # conf/_shared/boundary_placement.yaml's keys
READ_BY = {"eval": Eval.READ_BY, "trainer": Trainer.READ_BY}  # group -> key -> the one task that reads it
# why a task does not read the other's keys
UNREAD_BECAUSE = {"lm": "the char LM slices its text windows in memory and scores bits per character: no images, "
                        "no loader", "clip": "it sizes the char LM's evaluation batches"}


def option_default(group: str, option: str, field: str):
    """`field`'s value in conf/<group>/<option>.yaml (a boundary placement key the option does not set:
    the shared file's), as plain Python."""
    own = _conf_file(group, option)
    if field not in own and group == "boundary":
        own = _conf_file("_shared", "boundary_placement")
    return plain(own[field])


@functools.cache
def _conf_file(group: str, name: str):
    """conf/<group>/<name>.yaml as written, read once a process (every rule asks for its defaults)."""
    from fastclip import CONF_DIR
    return OmegaConf.load(CONF_DIR / group / f"{name}.yaml")


def task_default_ok(field: str, default) -> set[str]:
    """The written values that leave a task-only key as its default (task=lm has no loader: auto is 0
    workers there)."""
    return {written(default), "0"} if field == "num_workers" else {written(default)}


def unread_keys(cfg) -> dict[str, str]:
    """A composed config's values that its run does not read, set apart from their option's default:
    "boundary.image_start=stride" -> "only boundary=gumbel reads it, not boundary=fixed". Empty for
    every run the command line would let through alone; a multirun's job can have some."""
    task, boundary = cfg.task.name, cfg.boundary
    schema = OPTIONS["boundary"][boundary.name]
    placement = {k: plain(boundary[k]) for k in PLACEMENT_CONDITIONS}
    out = {}
    for key in sorted(PLACEMENT):
        why = placement_unread(boundary.name, schema, key, task, placement)
        if why and written(boundary[key]) != written(option_default("boundary", boundary.name, key)):
            out[f"boundary.{key}={written(boundary[key])}"] = why
    if not schema.AUXILIARY_LOSS and boundary.get("loss_weight"):
        out[f"boundary.loss_weight={written(boundary.loss_weight)}"] = \
            f"boundary={boundary.name} has no auxiliary loss to weigh"
    for group in OPTIONS:
        node = cfg[group]
        option = node.get("name", "default")
        for key, conditions in getattr(OPTIONS[group].get(option), "READ_WHEN", {}).items():
            if written(node[key]) == written(option_default(group, option, key)):
                continue
            missed = unmet(conditions, node)
            # a condition on a placement key the job does not read (task=lm reads no image_start) is not met
            ignored = [k for k, _ in conditions if group == "boundary" and k in PLACEMENT
                       and placement_unread(boundary.name, schema, k, task, placement)]
            if missed:
                out[f"{group}.{key}={written(node[key])}"] = read_when_reason(group, conditions, missed, node)
            elif ignored:
                out[f"{group}.{key}={written(node[key])}"] = \
                    f"it needs boundary.{ignored[0]}, which this job does not read " \
                    f"({placement_unread(boundary.name, schema, ignored[0], task, placement)})"
    for group, keys in READ_BY.items():
        for key, reader in keys.items():
            value = cfg[group][key]
            if reader != task and written(value) not in task_default_ok(key, option_default(group, "default", key)):
                out[f"{group}.{key}={written(value)}"] = f"only task={reader} reads it ({UNREAD_BECAUSE[task]})"
    return out


def read_when_reason(group: str, conditions, missed: tuple, node) -> str:
    """Why a READ_WHEN key is not read: the conditions it needs (node: the job's values, which say
    which of them are lists), and the one this job misses."""
    def need(key, wanted) -> str:
        listed = isinstance(plain(node.get(key)), (list, tuple))
        return f"{wanted} in {group}.{key}" if listed else f"{group}.{key}={wanted}"
    return (f"only {' and '.join(need(k, w) for k, w in conditions)} reads it, not "
            f"{group}.{missed[0]}={written(node.get(missed[0]))}")


def unmet(conditions, node) -> tuple[str, object] | None:
    """The first of a key's READ_WHEN conditions ((key, value) pairs: the key has the value, or holds it
    where it is a list) that `node` does not meet, or None where it meets them all. node: a mapping of a
    job's values of that group; a value missing, None or interpolated is not known here, so taken as met."""
    for key, wanted in conditions:
        value = plain(node.get(key))
        if value is None or "${" in str(value):
            continue
        if (wanted not in value) if isinstance(value, (list, tuple)) else value != wanted:
            return key, wanted
    return None


def written(value) -> str:
    """A value as the command line writes it: true, null, a list as [a,b]."""
    value = plain(value)
    if isinstance(value, (list, tuple)):
        return f"[{','.join(map(written, value))}]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def plain(value):
    """A config value as plain Python (a ListConfig as a list)."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
