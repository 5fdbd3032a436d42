"""Which MLflow store a run, a report or the UI uses, and whether it can be used: each fault named
in one line before any work (fastclip.errors: InputError), where MLflow would retry for minutes or
fail deep in a run's start with its own trace. fastclip.tracking opens and writes the store.

Standard library and fastclip.errors only at import (mlflow is imported where a check needs it).
"""
import contextlib
import os
import re
from pathlib import Path
from urllib.parse import urlparse

from fastclip.errors import InputError


class TrackingStoreError(InputError):
    """The MLflow store a URI names cannot be used (absent, not writable, a server that does not answer)."""


def default_store_uri(launch_dir: str | os.PathLike | None = None) -> str:
    root = Path(launch_dir or os.getcwd()).resolve() / "outputs"
    return f"sqlite:///{root / 'mlflow.db'}"


def resolve_uri(cfg_uri: str | None, launch_dir=None) -> str:
    """tracking.uri wins, then $MLFLOW_TRACKING_URI, then the project default."""
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri(launch_dir)


def refuse_file_store(uri: str) -> None:
    """A directory store (`file:`, or a plain path such as ./mlruns) is refused by MLflow 3 unless
    MLFLOW_ALLOW_FILE_STORE is set, with a stack trace from deep in a run's start: here it is one line
    naming the URI and both ways on. MLflow's own reading of a URI decides what is a path (a Windows
    drive is one; `databricks`, `databricks-uc` and `uc` are stores by name). Older MLflow (no such
    switch) keeps taking it."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
        from mlflow.utils.uri import get_uri_scheme
    except ImportError:
        return
    try:
        scheme = get_uri_scheme(uri)
    except ValueError as exc:  # urllib's reading: an unclosed IPv6 bracket
        raise TrackingStoreError(f"tracking.uri={redacted(uri)!r} is not a URI MLflow can read: {exc}") from None
    if uri in ("databricks", "databricks-uc", "uc") or scheme not in ("", "file"):
        return
    try:
        allowed = MLFLOW_ALLOW_FILE_STORE.get()
    except ValueError as exc:  # MLflow's reading of the variable: true/false/1/0
        raise TrackingStoreError(f"MLFLOW_ALLOW_FILE_STORE={os.environ.get('MLFLOW_ALLOW_FILE_STORE')!r}: "
                                 f"expected true or false ({exc})") from None
    if not allowed:
        folder = urlparse(uri).path if uri.startswith("file:") else uri
        raise TrackingStoreError(
            f"MLflow store {uri!r} (tracking.uri, --uri or $MLFLOW_TRACKING_URI) is a directory store, which this "
            f"MLflow keeps only for migration: use sqlite:///{Path(folder).resolve().parent / 'mlflow.db'} "
            f"(`mlflow migrate-filestore` moves an existing one there), or set MLFLOW_ALLOW_FILE_STORE=true")


def check_writable(uri: str) -> None:
    """Fail before training, naming the path or server, when the store cannot be used: a directory
    store MLflow refuses (refuse_file_store), a local store that cannot be written (nothing is created
    here), an MLflow server that does not answer within a few seconds (MLflow's own client retries for
    minutes before it gives up)."""
    refuse_file_store(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        _check_server(uri)
        return
    if parsed.scheme in ("databricks", "postgresql", "mysql", "mssql"):
        return  # checked by creating the experiment
    if parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if path is None or not str(path):
            raise TrackingStoreError(f"tracking.uri={uri!r}: expected sqlite:///<absolute path to .db>")
        _check_sqlite_file(uri, path)
    else:
        path = Path(parsed.path or uri) / "store"  # a file: or plain-path store is a directory
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    problem = (None if (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
                        and (not path.exists() or os.access(path, os.W_OK)))
               else f"{folder} is not a directory" if not folder.is_dir() else f"{folder if not path.exists() else path} "
                                                                                f"is not writable")
    if problem:
        raise TrackingStoreError(f"tracking.uri={uri!r}: cannot write the MLflow store at {path.parent}: {problem}")


def _check_sqlite_file(uri: str, path: Path) -> None:
    """An existing store file that SQLite cannot read (another file at that path, a truncated copy),
    opened read-only, so nothing is written: MLflow would fail in every job with its own trace."""
    import sqlite3
    if not path.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as exc:
        raise TrackingStoreError(f"tracking.uri={uri!r}: {path} is not an MLflow store SQLite can read ({exc}); "
                                 f"name another file") from None


def require_store(uri: str, hint: str = "train something first (make train), or pass the store's URI") -> None:
    """Fail naming the store when there is nothing to read: a local sqlite store that does not exist
    (MLflow would create an empty one), an MLflow server that does not answer within a few seconds, a
    directory store MLflow refuses (refuse_file_store)."""
    refuse_file_store(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise TrackingStoreError(f"no MLflow store at {uri} yet: {hint}")
    if urlparse(uri).scheme in ("http", "https"):
        _check_server(uri)


def redacted(uri: str) -> str:
    """`uri` without a password (postgresql://user:secret@host/db -> postgresql://user:***@host/db)."""
    return re.sub(r"(//[^/:@]+:)[^/@]+@", r"\1***@", uri)


def _check_server(uri: str, timeout_s: float = 5.0) -> None:
    import urllib.request
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except OSError as exc:  # URLError, timeouts and refused connections are OSErrors
        raise TrackingStoreError(f"tracking.uri={uri!r}: the MLflow server does not answer ({exc}); start it, or "
                                 f"point tracking.uri (or MLFLOW_TRACKING_URI) at a store that exists") from None
