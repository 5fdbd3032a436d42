"""The command line judged before Hydra composes anything (fastclip.train's __main__): a key given
twice (bash's brace expansion), an override Hydra's grammar cannot read, a key the config tree lacks
or the chosen option does not declare, a value of the wrong form. Each is one line naming the
argument and what to write; Hydra's own messages name neither. The composed config's rules are
fastclip.checks'.

Only omegaconf, hydra's parser and torch-free fastclip modules are imported: keep it that way.
"""
import re
from dataclasses import fields

from omegaconf import OmegaConf

from fastclip.schema import OPTIONS, ROOT
from fastclip.schema.model import PLACEMENT_CONDITIONS, placement_unread
from fastclip.schema.unread import (PLACEMENT, UNREAD_BECAUSE, option_default, plain, read_when_reason, task_default_ok,
                                   unmet, written)
from fastclip.schema.errors import ConfigError


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
    deletions (`~`), hydra's and other groups' keys (cluster, hydra/launcher) are Hydra's to judge. An
    unknown option of a main group (`boundary=gumbl`) gets the same suggestion."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import OverrideParseException

    from fastclip.group_choices import conf_options, defaults_groups
    parser = OverridesParser.create()
    judged, given, keyed = [], {}, {}
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_overrides([arg])[0]
        except OverrideParseException:
            continue  # check_override_syntax names it
        group = override.key_or_group
        if (override.is_add() or override.is_force_add()) and override.package is None and "." not in group \
                and group in defaults_groups():
            sign = "++" if override.is_force_add() else "+"
            raise ConfigError(f"{arg}: {group} is in the run's defaults list (conf/train.yaml), so it is chosen "
                              f"without {sign}: write {arg.removeprefix(sign)} ({sign} adds a group that is not there)")
        if (override.is_add() or override.is_force_add()) and override.package is None and "." in group:
            keyed[group] = _job_values(override)  # the value its jobs get, for the rules that read it
        if override.is_add() or override.is_force_add() or override.is_delete() or override.package is not None:
            continue
        if override.value_type == ValueType.GLOB_CHOICE_SWEEP:  # the group's options it matches
            values = override.value().filter(conf_options(group)) if "." not in group else []
        elif override.is_sweep_override():  # a grid's values (a range or an interval names no option)
            values = list(override.sweep_string_iterator()) if override.is_choice_sweep() else []
        else:
            values = [override.value()]
        if "." not in group and any(isinstance(v, (list, dict)) for v in values):
            raise ConfigError(f"{arg}: {group} takes one option ({', '.join(OPTIONS.get(group, ()))}); a grid over "
                              f"options is -m {group}=a,b")
        judged.append((override, values))
        keyed[override.key_or_group] = _job_values(override)
        if "." not in override.key_or_group and values:
            given[override.key_or_group] = (values, override.is_sweep_override())
    multirun = is_multirun(args)
    for forms_only in (True, False):  # every key's form first: a wrong form misreads the rules that read it
        for override, values in judged:
            _check_key(override, values, given, multirun, keyed, forms_only)


def is_multirun(args: list[str]) -> bool:
    """Whether the command line asks Hydra for a multirun (-m, --multirun, hydra.mode=MULTIRUN)."""
    return bool({"-m", "--multirun"} & set(args)) or "hydra.mode=MULTIRUN" in {a.replace("RunMode.", "") for a in args}


def _check_key(override, values: list, given: dict, multirun: bool, keyed: dict, forms_only: bool = False) -> None:
    key = override.key_or_group
    head, _, rest = key.partition(".")
    if head == "hydra" or "/" in head:
        return
    root = {f.name for f in fields(ROOT)} - set(OPTIONS)
    if head not in OPTIONS:
        if head in root and not rest:
            _check_form(override, ROOT, head)
        if head in root or _is_conf_group(head):  # a run key (seed, epochs), or cluster=, experiment=
            return
        known = sorted(root | set(OPTIONS))
        if rest:  # a misspelt group: suggest only the groups that declare the key
            known = [g for g in OPTIONS if rest.split(".")[0] in _declared(g)] or known
        owners = [] if rest else [g for g in OPTIONS if head in _declared(g)]  # `lr=` for trainer.lr
        meant = (f"; did you mean {' or '.join(f'{g}.{head}' for g in owners)}?" if owners
                 else _nearest(head, known, suffix="." + rest if rest else ""))
        raise ConfigError(f"{key} is not a config key{meant} (top-level keys and groups: "
                          f"{', '.join(sorted(root | set(OPTIONS)))})")
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
    if "." not in rest:
        for option in dict.fromkeys(job.option for job in jobs):
            _check_form(override, OPTIONS[head][option], field)
    if forms_only:
        return
    if (head, field) == ("boundary", "loss_weight") and jobs and any(_number(v) for v in values):
        if not any(OPTIONS[head][job.option].AUXILIARY_LOSS for job in jobs):  # else a job that has none ignores it
            raise ConfigError(f"{override.input_line}: boundary={','.join(job.option for job in jobs)} has no auxiliary "
                              f"loss to weigh (gumbel, entropy_spike and unigram have one); leave it 0")
    if head == "boundary" and field in PLACEMENT and jobs and "." not in rest:
        _check_placement_reads(override, field, jobs, given, keyed)
    if jobs and "." not in rest and any(field in getattr(OPTIONS[head][j.option], "READ_WHEN", {}) for j in jobs):
        _check_read_when(override, head, field, jobs, keyed)
    reader = getattr(OPTIONS[head][jobs[0].option], "READ_BY", {}).get(field) if jobs and "." not in rest else None
    if reader:
        _check_task_reads(override, values, head, jobs[0].option, field, reader, given)
    master = choices.master if choices else None
    if multirun and master and not override.is_sweep_override() and master.option not in owners:
        value = override.input_line.split("=", 1)[1]
        raise ConfigError(f"{key}={value} in a multirun: Hydra first applies a key that is not swept to one config "
                          f"for the sweeper, composed with {head}={master.option} ({master.why}), which has no "
                          f"{field}; give it as a one-value sweep, which reaches each job alone: '{key}=choice({value})'")


def _check_task_reads(override, values: list, head: str, option: str, field: str, reader: str, given: dict) -> None:
    """A key one task alone reads (schema READ_BY), set apart from its default where no job runs that
    task (in a multirun over both tasks, the other task's jobs ignore it, as loss_weight's do)."""
    from fastclip.group_choices import chosen
    tasks = chosen("task", given)
    if tasks is None or any(job.option in (reader, None) for job in tasks.jobs):
        return
    default = written(option_default(head, option, field))
    if any(written(_typed(OPTIONS[head][option], field, v)) not in task_default_ok(field, default) for v in values):
        task = ",".join(job.option for job in tasks.jobs)
        raise ConfigError(f"{override.input_line} with task={task}: only task={reader} reads it "
                          f"({UNREAD_BECAUSE[task] if task in UNREAD_BECAUSE else 'the other task'}); leave it {default}")


def _check_placement_reads(override, field: str, jobs: list, given: dict, keyed: dict) -> None:
    """A placement key (conf/_shared/boundary_placement.yaml) set apart from its default where no job
    reads it (schema.model.placement_unread: the option, the task, the towers boundary.apply_to pools):
    `boundary=tome boundary.image_order=hilbert` once trained plain ToMe without a word. In a multirun
    across options the jobs that do not read it ignore it (`-m boundary=fixed,gumbel
    boundary.image_start=stride`), as loss_weight's do."""
    import itertools

    from fastclip.group_choices import chosen
    tasks, values = chosen("task", given), keyed.get(override.key_or_group)
    if tasks is None or values is None or any(t.option is None for t in tasks.jobs):  # left to Hydra; unread here
        return
    reasons = []
    for job in jobs:
        schema = OPTIONS["boundary"][job.option]
        known = _may_have("boundary", job.option, PLACEMENT_CONDITIONS, keyed)
        for task, *combo in itertools.product(dict.fromkeys(t.option for t in tasks.jobs), *known.values()):
            why = placement_unread(job.option, schema, field, task, dict(zip(known, combo)))
            if why is None:
                return
            reasons.append(why)
    _refuse_if_set(override, "boundary", field, jobs, values, reasons)


def _check_read_when(override, head: str, field: str, jobs: list, keyed: dict) -> None:
    """A key that values of other keys decide whether a job reads (a schema's READ_WHEN:
    compression.prune_every under schedule=gradual; gumbel's random_offset under image_start=stride with
    an image tower), set apart from its default where no job meets them; a job whose option reads it
    whatever the rest (fixed's random_offset) reads it."""
    import itertools
    values = keyed.get(override.key_or_group)
    if values is None:
        return
    reasons = []
    for job in jobs:
        conditions = getattr(OPTIONS[head][job.option], "READ_WHEN", {}).get(field)
        if conditions is None:
            return
        known = _may_have(head, job.option, [k for k, _ in conditions], keyed)
        for combo in itertools.product(*known.values()):
            node = dict(zip(known, combo))
            missed = unmet(conditions, node)
            if missed is None:
                return
            reasons.append(read_when_reason(head, conditions, missed, node))
    _refuse_if_set(override, head, field, jobs, values, reasons)


def _may_have(head: str, option: str, keys, keyed: dict) -> dict[str, list]:
    """key -> the values a job of `head`=`option` may have of each of `keys`: the command line's (None
    where it gives one this check cannot read, a rule taking it as reading), else the option's."""
    return {k: keyed.get(f"{head}.{k}", [option_default(head, option, k)]) or [None] for k in keys}


def _refuse_if_set(override, head: str, field: str, jobs: list, values: list, reasons: list) -> None:
    """A key no job reads (`reasons`: why each does not), refused unless every value is its default
    (spelled as the schema's type makes it)."""
    default = {written(option_default(head, job.option, field)) for job in jobs}
    if any(written(_typed(OPTIONS[head][jobs[0].option], field, v)) not in default for v in values):
        raise ConfigError(f"{override.input_line}: no job reads it ({'; '.join(dict.fromkeys(reasons))}); leave it "
                          f"{' or '.join(sorted(default))}")


def _typed(schema: type, field: str, value):
    """`value` as the schema field's type makes it (OmegaConf's conversion: `0` and `no` for a bool are
    false), so that a default spelled another way is the default; as given where it does not convert."""
    from omegaconf.errors import OmegaConfBaseException
    try:
        return plain(OmegaConf.merge(OmegaConf.structured(schema), {field: value})[field])
    except (OmegaConfBaseException, ValueError, TypeError):
        return value


def _job_values(override) -> list | None:
    """The values an override gives its jobs (one, or a choice sweep's); None for a range, an
    interval or a glob, whose values are numbers or options."""
    from hydra.core.override_parser.types import Glob
    if not override.is_sweep_override():
        values = [plain(override.value())]
    elif override.is_choice_sweep() and not isinstance(override.value(), Glob):
        values = [plain(v) for v in override.value().list]
    else:
        return None
    return None if any("${" in str(v) for v in values) else values  # an interpolation: known when resolved


def _check_form(override, schema: type, field: str) -> None:
    """The value's form against the schema field's type, as Hydra would merge it (OmegaConf's
    validation), with what to write: Hydra's own message ("str is not a ListConfig") names no fix."""
    from hydra.core.override_parser.types import Glob, QuotedString
    from omegaconf.errors import ValidationError
    line = override.input_line
    if override.is_choice_sweep() and not isinstance(override.value(), Glob):
        values = override.value().list  # each job's value
    elif override.is_sweep_override():  # a range or an interval: numbers by construction
        return
    else:
        values = [override.value()]
    node = OmegaConf.structured(schema)
    for value in values:
        value = value.text if isinstance(value, QuotedString) else value  # a sweep's quoted item: a job's string
        if isinstance(value, str) and "${" in value:  # an interpolation: resolved later
            continue
        try:
            node[field] = value
        except ValidationError as exc:
            _wrong_form(line, schema, field, value, exc)


def _wrong_form(line: str, schema: type, field: str, value, exc: Exception) -> None:
    """Raises the ConfigError for a value of the wrong form: what the field takes, and how to write it."""
    import typing
    kind = next(f.type for f in fields(schema) if f.name == field)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = typing.get_origin(kind) or kind
    if base is typing.Union and len(args) == 1:  # Optional[X]
        base = typing.get_origin(args[0]) or args[0]
    key = line.split("=", 1)[0].lstrip("+~")
    expected = ("a value, not null" if value is None else
                f"a list: write {key}=[{written(value)}]" if base in (list, typing.List) else
                {int: "an integer", float: "a number", bool: "true or false"}.get(base, str(exc).splitlines()[0]))
    one = "" if line.split("=", 1)[1] == written(value) else f" ({written(value)})"  # a sweep: the value at fault
    raise ConfigError(f"{line}{one}: expected {expected}")


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
