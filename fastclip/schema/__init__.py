"""The config tree's typed schema: one dataclass per config-group option, registered in Hydra's
ConfigStore (`register`) and named first in each YAML file's defaults list (`/schema/<group>/<option>`),
as Hydra's structured configs document. Types are checked by Hydra when it composes (a YAML value
or a command-line override of the wrong type fails naming the key); ranges and choices in each
dataclass's __post_init__, run by `typed` (fastclip.checks.check_config calls it on every config a
run trains with, a resumed one included); what a resume may change is each field's `resume`
metadata (fields.py), which resume.py and the report read. The YAML files keep the defaults and
their explanations; the schema keeps types, ranges and the resume rule. One rule, one place.

Only omegaconf, hydra's ConfigStore and the standard library are imported here: keep it so
(fastclip.checks runs before torch loads).
"""
from fastclip.schema.groups import OPTIONS, ROOT, register, typed, typed_config, typed_group, typed_node

__all__ = ["OPTIONS", "ROOT", "register", "typed", "typed_config", "typed_group", "typed_node"]
