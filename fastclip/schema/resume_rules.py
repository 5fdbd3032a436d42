"""What a resume may change, read from the schema's field metadata (fields.py): resume.py refuses a
change to any other key, and the report (report/table.py) leaves the runtime keys out of what tells
runs apart."""
import dataclasses
from typing import Optional

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
