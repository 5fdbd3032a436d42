"""ConfigError: a config value that cannot run, named with its key, its value and what to set instead."""
from fastclip.errors import InputError


class ConfigError(InputError):
    pass
