"""The one parser of "steps or a fraction of the run": trainer.warmup_steps, compression.finetune_steps
and compression.start_step take an integer number of optimizer steps, or a fraction of the run in (0, 1)."""
from fastclip.schema.errors import ConfigError

FORM = "steps >= 0 or a fraction of the run in (0, 1)"


def check_steps(key: str, value) -> None:
    """Raises ConfigError naming key and value unless it is a step count or a fraction (the form only:
    the run's length is known once the data is read)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{key}={value}: expected {FORM}")


def steps_of(value, total: int, key: str = "steps") -> int:
    """value as optimizer steps of a `total`-step run: round(value x total) for a fraction in (0, 1),
    else int(value). Raises ConfigError naming `key` for a value of neither form."""
    check_steps(key, value)
    return round(value * total) if 0 < value < 1 else int(value)
