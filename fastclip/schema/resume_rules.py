"""What a resume may change, read from the schema's field metadata (fields.py): resume.py refuses a
change to any other key, and the report (report/table.py) leaves the runtime keys out of what tells
runs apart."""
import copy
import dataclasses
from typing import Any, Optional

from fastclip.schema.fields import MUTABLE, RUNTIME, resume_rule
from fastclip.schema.groups import OPTIONS, ROOT


def rule_of(key: str) -> Optional[str]:
    """A flat config key's rule (frozen, mutable or runtime): its field's, or the field above it for a
    key inside a mapping (encoder.vision.width: encoder.vision's). None: no schema has the key."""
    group, _, rest = key.partition(".")
    if group in OPTIONS and rest:
        name = rest.split(".")[0]
        for schema in OPTIONS[group].values():
            if name in {f.name for f in dataclasses.fields(schema)}:
                return resume_rule(schema, name)
        return None
    if group in {f.name for f in dataclasses.fields(ROOT)} and group not in OPTIONS:
        return resume_rule(ROOT, group)
    return None


def keys_with(*rules: str) -> frozenset:
    """Every flat key (group.field; the root's own fields bare) whose rule is one of `rules`."""
    keys = {f.name for f in dataclasses.fields(ROOT) if f.name not in OPTIONS}
    for group, options in OPTIONS.items():
        keys |= {f"{group}.{f.name}" for schema in options.values() for f in dataclasses.fields(schema)}
    return frozenset(k for k in keys if rule_of(k) in rules)


RUNTIME_KEYS = keys_with(RUNTIME)            # how a run executes and where it writes
MUTABLE_KEYS = keys_with(RUNTIME, MUTABLE)   # everything a resume may change


def legacy_values() -> dict[str, Any]:
    """{flat key: the value configs written before the key existed meant} (fields.py, `legacy`)."""
    out = {}
    for group, options in OPTIONS.items():
        for schema in options.values():
            out.update({f"{group}.{f.name}": f.metadata["legacy"] for f in dataclasses.fields(schema)
                        if "legacy" in f.metadata})
    return out


LEGACY = legacy_values()
# legacy keys whose value is a guess (fields.py, `guessed`): a resume may state the other value
GUESSED = frozenset(f"{group}.{f.name}" for group, options in OPTIONS.items() for schema in options.values()
                    for f in dataclasses.fields(schema) if f.metadata.get("guessed"))


def missing_legacy(flat: dict) -> dict[str, Any]:
    """{legacy key: its legacy value} for each legacy key a flat config (group.key -> value: a
    checkpoint's, a run's logged params) lacks where its group's option (group.name) has that key."""
    out = {}
    for key, value in LEGACY.items():
        group, name = key.split(".", 1)
        schema = OPTIONS[group].get(flat.get(f"{group}.name"))
        if key not in flat and schema is not None and name in {f.name for f in dataclasses.fields(schema)}:
            out[key] = value
    return out


def with_legacy(config: dict) -> dict:
    """A checkpoint's config (a nested dict) with each legacy key it lacks set to its legacy value:
    what the run it came from ran with."""
    config = copy.deepcopy(config)
    top = {f"{group}.{k}": v for group, node in config.items() if isinstance(node, dict) for k, v in node.items()}
    for key, value in missing_legacy(top).items():
        group, name = key.split(".", 1)
        config[group][name] = value
    return config
