"""How a schema field is declared: its default comes from the YAML file (MISSING here, so each default
has one source), its resume rule from the metadata written here.

A resume (fastclip.resume) may change a key only if its rule says so:
  frozen   (the default) what the run is: its model, data, objective, seed. Changing it is a new run.
  mutable  how long and how fast it goes on, and what it evaluates: epochs, trainer.max_steps, the lr.
  runtime  how it executes and where it writes, never what it learns or measures (workers, device,
           paths); the report does not tell runs apart by these either.

A key added after runs were written may declare `legacy`: the value every config written before it
meant (a checkpoint without the key ran that way). Resuming or loading such a checkpoint reads the
legacy value, not today's default (resume_rules.with_legacy; fastclip.resume and fastclip.inference).
`guessed=True`: the behaviour changed some commits before the key came, so a checkpoint without it
may have run either way; the legacy value is the likelier one, and a resume may state the other on
its command line (a frozen key otherwise refuses any change).
"""
import dataclasses
from typing import Any

from omegaconf import MISSING

FROZEN, MUTABLE, RUNTIME = "frozen", "mutable", "runtime"


def frozen(default: Any = MISSING, legacy: Any = MISSING, guessed: bool = False) -> Any:
    metadata = {"resume": FROZEN} if legacy is MISSING else {"resume": FROZEN, "legacy": legacy, "guessed": guessed}
    return dataclasses.field(default=default, metadata=metadata)


def mutable(default: Any = MISSING) -> Any:
    return dataclasses.field(default=default, metadata={"resume": MUTABLE})


def runtime(default: Any = MISSING) -> Any:
    return dataclasses.field(default=default, metadata={"resume": RUNTIME})


def resume_rule(schema: type, name: str) -> str:
    """A field's rule (every field declares one: frozen(), mutable() or runtime())."""
    for f in dataclasses.fields(schema):
        if f.name == name:
            return f.metadata["resume"]
    raise KeyError(f"{schema.__name__} has no field {name!r}")


def choice(key: str, value: Any, allowed: tuple) -> None:
    """Raises ConfigError unless value is one of `allowed`."""
    from fastclip.schema.errors import ConfigError
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected {_one_of(allowed)}")


def at_least(key: str, value: Any, low: float, what: str = "") -> None:
    from fastclip.schema.errors import ConfigError
    if value is not None and value < low:
        raise ConfigError(f"{key}={value}: expected {what or f'>= {low}'}")


def _one_of(allowed: tuple) -> str:
    return " or ".join(allowed) if len(allowed) <= 2 else "one of " + ", ".join(allowed)

