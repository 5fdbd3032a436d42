"""text8-format character data: a-z and single spaces, split the DTP way.

Full text8 (100M chars): first 90M train, next 5M valid, last 5M test. A smaller file is split
in the same proportions (dataset.split). Characters outside the 27-symbol vocabulary are
rejected, naming the character and its position, unless dataset.clean=true maps them by the
text8 rule (clean_to_text8).
"""
import re
from pathlib import Path

import numpy as np

from fastclip.data.textfile import decode_utf8
from fastclip.errors import InputError, InputNotFound

ALPHABET = " abcdefghijklmnopqrstuvwxyz"
SPACE_ID = 0
_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def clean_to_text8(text: str) -> str:
    """The text8 rule (Mahoney's wikifil): lowercase, digits spelled out, anything else not a-z
    becomes a space, runs of spaces collapse to one."""
    text = text.lower()
    text = re.sub(r"[0-9]", lambda m: f" {_DIGITS[int(m.group())]} ", text)
    text = re.sub(r"[^a-z]+", " ", text)
    return text.strip()


def validate(text: str, source: str) -> None:
    bad = re.search(r"[^ a-z]", text)
    if bad:
        raise InputError(f"{source}: character {bad.group()!r} at position {bad.start()} is outside the text8 "
                         f"vocabulary (a-z and space); clean the file or set dataset.clean=true")


def default_text() -> str:
    """English prose every CPython ships: the pydoc topics (about 390K chars once cleaned)."""
    from pydoc_data.topics import topics
    return clean_to_text8(" ".join(topics[k] for k in sorted(topics)))


def load_text(path: str | None, clean: bool = False) -> tuple[str, str]:
    """(text, where it came from). path None: the built-in default text."""
    if path is None:
        return default_text(), "pydoc_data.topics (built-in)"
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"dataset.path={str(path)!r}: no such file")
    text = decode_utf8(p.read_bytes(), f"dataset.path={str(p)!r}")  # not UTF-8: names the byte offset
    text = text[:-1] if text.endswith("\n") else text
    if clean:
        text = clean_to_text8(text)
    validate(text, str(p))
    return text, str(p.resolve())


def split(text: str, fractions) -> tuple[str, str, str]:
    """(train, valid, test): consecutive, non-overlapping slices of `text` in that order, sized by
    `fractions` (dataset.split). valid serves per-epoch evaluation and a sweep's objective (val/bpc),
    test the final lm/test_bpc. ValueError naming dataset.split when the fractions do not sum to 1
    or a split would be empty."""
    train_f, valid_f, test_f = fractions
    if abs(train_f + valid_f + test_f - 1.0) > 1e-6:
        raise InputError(f"dataset.split={list(fractions)}: fractions must sum to 1")
    n = len(text)
    n_valid, n_test = round(n * valid_f), round(n * test_f)
    n_train = n - n_valid - n_test
    empty = [name for name, size in (("train", n_train), ("valid", n_valid), ("test", n_test)) if size <= 0]
    if empty:
        raise InputError(f"dataset.split={list(fractions)}: the {' and '.join(empty)} split of this {n}-char text "
                         f"would be empty; each of train, valid (per-epoch evaluation) and test needs a share")
    return text[:n_train], text[n_train:n_train + n_valid], text[n_train + n_valid:]


def encode(text: str) -> np.ndarray:
    table = np.zeros(256, dtype=np.uint8)
    for i, ch in enumerate(ALPHABET):
        table[ord(ch)] = i
    return table[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]


def decode(ids) -> str:
    return "".join(ALPHABET[int(i)] for i in ids)
