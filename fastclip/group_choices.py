"""Which option of a config group a command line composes, read from the command line and the config
files' defaults lists without composing (fastclip.override_checks judges overrides with it before Hydra runs).

The order is Hydra's: conf/train.yaml's default, then the chosen task's `override /<group>` (task=lm
swaps dataset and encoder), then the chosen experiment's, then the command line's `<group>=<option>`.
In a multirun Hydra first composes one config for the sweeper from the overrides that are not swept,
and applies every unswept key to it (`boundary=gumbel,fixed boundary.random_offset=true` is applied to
the default boundary=none first): `master` is that config's option.
"""
import functools
from dataclasses import dataclass

from fastclip import CONF_DIR


@dataclass(frozen=True)
class Choice:
    """An option of a group and why it is chosen ("the default", "chosen by task=lm", "chosen on the command line")."""
    option: str
    why: str


@dataclass(frozen=True)
class GroupChoices:
    """jobs: the options a run (or each job of a multirun) composes the group with; master: a multirun's
    config for the sweeper, composed from the overrides that are not swept."""
    jobs: tuple[Choice, ...]
    master: Choice


def chosen(group: str, given: dict[str, tuple[list[str], bool]]) -> GroupChoices | None:
    """given: group -> (the options the command line names for it, whether they are swept). None when
    a choice cannot be read here (a file Hydra will report missing): the caller leaves it to Hydra."""
    try:
        def layered(task: str, experiment: str | None) -> Choice:
            out = Choice(_defaults("train")[group], "the default") if group in _defaults("train") else None
            for kind, option in (("task", task), ("experiment", experiment)):
                override = _defaults(f"{kind}/{option}").get(group) if option else None
                if override:
                    out = Choice(override, f"chosen by {kind}={option}")
            return out

        def options(name: str, default: str | None) -> tuple[list, str | None]:
            values, swept = given.get(name, ([default], False))
            return values, (default if swept else values[-1])

        tasks, master_task = options("task", _defaults("train").get("task"))
        experiments, master_experiment = options("experiment", None)
        if group in given:
            values, swept = given[group]
            jobs = [Choice(v, "chosen on the command line") for v in values]
            master = layered(master_task, master_experiment) if swept else jobs[-1]
        else:
            jobs = list(dict.fromkeys(layered(t, e) for t in tasks for e in experiments))
            master = layered(master_task, master_experiment)
    except FileNotFoundError:
        return None
    if master is None or any(job is None for job in jobs):
        return None
    return GroupChoices(tuple(jobs), master)


@functools.cache  # read once a process: the check asks for every override, the help for every group
def defaults_list(name: str) -> tuple[tuple[str, str | None], ...]:
    """(group, option) of each group entry of conf/<name>.yaml's defaults list, in order (`- boundary: none`,
    `- override /encoder: rn50`); option None for a null choice (`- experiment: null`)."""
    from omegaconf import OmegaConf
    out = []
    for item in OmegaConf.load(CONF_DIR / f"{name}.yaml").get("defaults", []):
        if OmegaConf.is_dict(item):
            for key, value in item.items():
                group = str(key).removeprefix("override ").strip().lstrip("/")
                if "@" not in group and "/" not in group:
                    out.append((group, None if value is None else str(value)))
    return tuple(out)


def _defaults(name: str) -> dict[str, str]:
    """group -> option in conf/<name>.yaml's defaults list, null choices left out."""
    return {group: option for group, option in defaults_list(name) if option is not None}


def defaults_groups() -> set[str]:
    """The groups conf/train.yaml's defaults list names, a null choice included (experiment)."""
    return {group for group, _ in defaults_list("train")}


def conf_options(group: str) -> list[str]:
    """The options conf/<group>/ holds (what a `glob(...)` sweep of the group matches against)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
