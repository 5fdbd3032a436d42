"""The errors a user's input causes (a config value, a file, a checkpoint, a data set), each raised with
a message that names the key, file or value and what to do: the entrypoints print that one line and
no stack trace (FASTCLIP_TRACEBACK=1 shows it). Anything else is a fault of fastclip's and keeps its
traceback. Standard library only: every layer may import it."""
import contextlib
import os


class InputError(ValueError):
    """A value or file the user gave cannot be used; the message says which and what instead."""


class InputNotFound(InputError, FileNotFoundError):
    """A path the user gave (a data set, a checkpoint, a run dir) is not there; the message names it
    and the key it came from. Still a FileNotFoundError to callers that catch that."""


def show_traceback() -> bool:
    """FASTCLIP_TRACEBACK=1: an input error is raised with its stack trace, not printed as one line."""
    return os.environ.get("FASTCLIP_TRACEBACK", "") not in ("", "0")


@contextlib.contextmanager
def one_line_errors():
    """A command-line entrypoint's body: an InputError leaves as `error: <message>` on stderr with exit
    status 1 and no stack trace (unless FASTCLIP_TRACEBACK=1); every other exception keeps its traceback."""
    try:
        yield
    except InputError as exc:
        if show_traceback():
            raise
        raise SystemExit(f"error: {exc}") from None
