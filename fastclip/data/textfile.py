"""Text files that must be UTF-8 (CSV, COCO / Karpathy JSON, text8, class names): where decoding
fails is named (file, byte offset), never a bare UnicodeDecodeError. A UTF-8 byte order mark at
the start is dropped, as Python's utf-8-sig does (offsets still count it)."""
import codecs
import json
import re
from pathlib import Path

from fastclip.errors import InputError

BOM = codecs.BOM_UTF8
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8
REENCODE = "re-encode it as UTF-8 (e.g. iconv -f cp1252 -t utf-8 in > out)"


def _body(data: bytes) -> tuple[bytes, int]:
    """(data without a leading BOM, bytes dropped)."""
    return (data[len(BOM):], len(BOM)) if data.startswith(BOM) else (data, 0)


def first_bad_byte(data: bytes) -> int | None:
    """Byte offset (BOM included) of the first byte that is not valid UTF-8; None when all are."""
    body, skip = _body(data)
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return skip + exc.start
    return None


def not_utf8(source: str, data: bytes, offset: int, detail: str = "") -> ValueError:
    """The error for `data` (read from `source`) whose first bad byte is at `offset`."""
    return ValueError(f"{source}: not UTF-8{detail}: first bad byte 0x{data[offset]:02x} at byte offset {offset}; "
                      f"{REENCODE}")


def decode_utf8(data: bytes, source: str) -> str:
    """`data` decoded as UTF-8 (BOM dropped). Raises ValueError naming `source` (file, config key)
    and the byte offset of the first undecodable byte."""
    body, skip = _body(data)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(source, data, skip + exc.start) from None


def decode_lenient(data: bytes) -> str:
    """`data` as UTF-8 (BOM dropped) where each undecodable byte becomes a lone surrogate
    U+DC80..U+DCFF (surrogateescape), so a reader can skip just the lines that hold one."""
    return _body(data)[0].decode("utf-8", "surrogateescape")


def has_undecodable(text: str) -> bool:
    """True when `text` (from decode_lenient) holds a byte that was not UTF-8."""
    return _ESCAPED_BYTE.search(text) is not None


def undecoded_repr(text: str) -> str:
    """`text` with its undecodable bytes shown as \\xNN (for a warning)."""
    return repr(text.encode("utf-8", "surrogateescape"))[2:-1]


def read_names(path: Path, source: str) -> list[str]:
    """The non-blank lines of a UTF-8 file, stripped (class names): ValueError naming `source` and
    the byte offset where it is not UTF-8."""
    return [line.strip() for line in decode_utf8(path.read_bytes(), source).splitlines() if line.strip()]


def read_json(path: Path, source: str):
    """The parsed JSON of a UTF-8 file. ValueError naming `source` and, when the file is not
    UTF-8, the byte offset of the first bad byte, or, when the JSON is malformed, its line and column."""
    text = decode_utf8(path.read_bytes(), source)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
