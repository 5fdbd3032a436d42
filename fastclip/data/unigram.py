"""Unigram boundaries: a sentencepiece Unigram model trained on the TRAINING split only,
cached under outputs/cache keyed by the data and the vocab size; boundaries = piece ends, in bytes."""
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import sentencepiece as spm

from fastclip.errors import InputError

log = logging.getLogger(__name__)
_LINE = 4000  # sentencepiece reads lines; text8 is one line, so it is cut at spaces
# hard_vocab_limit off: a small corpus (a few templates) yields fewer pieces than asked for
_TRAINER = dict(model_type="unigram", character_coverage=1.0, add_dummy_prefix=False, remove_extra_whitespaces=False,
                normalization_rule_name="identity", max_sentence_length=_LINE * 2, minloglevel=2,
                input_sentence_size=2_000_000, shuffle_input_sentence=True, hard_vocab_limit=False)
_SPECIAL_PIECES = ("<unk>", "<s>", "</s>")  # the trainer's own pieces, counted in vocab_size


def _lines(text: str):
    start = 0
    while start < len(text):
        end = min(len(text), start + _LINE)
        if end < len(text):
            cut = text.rfind(" ", start, end)
            end = cut if cut > start else end
        yield text[start:end]
        start = end


def train_or_load(train_text: str, vocab_size: int, cache_dir: str | Path) -> spm.SentencePieceProcessor:
    """A model of one long text8-format training split."""
    return _train_or_load(list(_lines(train_text)), vocab_size, cache_dir)


def train_on_captions(captions, vocab_size: int, cache_dir: str | Path | None) -> spm.SentencePieceProcessor:
    """A model of the training captions, normalised as the character tokenizer sees them."""
    lines = [" ".join(c.lower().split()) for c in captions]
    return _train_or_load(lines, vocab_size, cache_dir or Path.cwd() / "outputs" / "cache")


def min_vocab_size(corpus_text: str) -> int | None:
    """The smallest vocab_size sentencepiece's trainer accepts on this corpus with _TRAINER's
    arguments: one piece per character it reads (character_coverage=1.0 requires them all; a space
    is its '▁', NUL is skipped; lines over max_sentence_length BYTES are not read) plus its special
    pieces. Measured on sentencepiece 0.2.0 and 0.2.3. None when it would sample the lines (more
    than input_sentence_size), so that a rare character may go unread: its own error decides."""
    lines = [line for line in corpus_text.split("\n")
             if 0 < len(line.encode("utf-8")) <= _TRAINER["max_sentence_length"]]
    if len(lines) > _TRAINER["input_sentence_size"]:
        return None
    chars = set("".join(lines).replace(" ", "\u2581")) - {"\0"}
    return len(chars) + len(_SPECIAL_PIECES)


def _train_or_load(lines: list[str], vocab_size: int, cache_dir) -> spm.SentencePieceProcessor:
    """Raises ValueError naming boundary.vocab_size when sentencepiece cannot train with it."""
    corpus_text = "\n".join(lines)
    key = hashlib.sha256(corpus_text.encode()).hexdigest()[:16]
    prefix = Path(cache_dir) / "unigram" / f"{key}_v{vocab_size}"
    model = prefix.with_suffix(".model")
    if not model.exists():
        need = min_vocab_size(corpus_text)
        if need is not None and vocab_size < need:
            raise InputError(f"boundary.vocab_size={vocab_size} is too small for this corpus: sentencepiece needs at "
                             f"least {need} ({need - len(_SPECIAL_PIECES)} distinct characters + "
                             f"{', '.join(_SPECIAL_PIECES)})")
        prefix.parent.mkdir(parents=True, exist_ok=True)
        tmp_prefix = prefix.parent / f"tmp{os.getpid()}_{prefix.name}"
        try:
            Path(f"{tmp_prefix}.txt").write_text(corpus_text, encoding="utf-8")
            log.info("training a %d-piece unigram model on %d chars -> %s", vocab_size, len(corpus_text), model)
            try:
                spm.SentencePieceTrainer.train(input=f"{tmp_prefix}.txt", model_prefix=str(tmp_prefix),
                                               vocab_size=vocab_size, **_TRAINER)
            except RuntimeError as e:
                raise InputError(f"boundary.vocab_size={vocab_size}: sentencepiece could not train a unigram model "
                                 f"on this corpus: {e}") from e
            Path(f"{tmp_prefix}.vocab").replace(f"{prefix}.vocab")
            Path(f"{tmp_prefix}.model").replace(model)  # atomic: concurrent jobs never read half a model
        finally:
            for suffix in (".txt", ".vocab", ".model"):
                Path(f"{tmp_prefix}{suffix}").unlink(missing_ok=True)
    return spm.SentencePieceProcessor(model_file=str(model))


def _byte_spans(sp: spm.SentencePieceProcessor, texts: list[str]) -> list[list[tuple[int, int]]]:
    """Each text's pieces as (begin, end) offsets into its UTF-8 bytes, from sentencepiece itself
    (so a '▁' is the one space byte it stands for and a multi-byte character keeps its bytes)."""
    try:  # sentencepiece >= 0.2.3
        return [r["offsets"] for r in sp.encode(texts, out_type="offset_mapping", return_bytes=True)]
    except TypeError:  # older 0.2.x: no offset_mapping; its protos' begin/end count characters, surfaces do not
        spans = []
        for r in sp.encode(texts, out_type="immutable_proto"):
            ends = np.cumsum([len(p.surface.encode("utf-8")) for p in r.pieces]).tolist()
            spans.append(list(zip([0] + ends[:-1], ends)))
        return spans


def piece_end_bytes(sp: spm.SentencePieceProcessor, texts: list[str]) -> list[np.ndarray]:
    """Per text, the int64 positions in text.encode('utf-8') of the last byte of every piece.
    Raises RuntimeError when the pieces do not tile the text's bytes (a model that alters text)."""
    out = []
    for text, spans in zip(texts, _byte_spans(sp, texts)):
        spans = np.array(spans, dtype=np.int64).reshape(-1, 2)
        bounds = np.r_[0, spans[:, 1]]
        n = len(text.encode("utf-8"))
        if not (np.array_equal(spans[:, 0], bounds[:-1]) and bounds[-1] == n):
            raise RuntimeError(f"unigram pieces do not tile the {n} bytes of {text[:40]!r}: the model altered the text")
        out.append(spans[:, 1] - 1)
    return out


def piece_end_boundaries(sp: spm.SentencePieceProcessor, text: str) -> np.ndarray:
    """uint8 per byte of text.encode('utf-8') (per character of text8, which is ASCII): 1 on the
    last byte of every piece."""
    lines = list(_lines(text))
    out = np.zeros(len(text.encode("utf-8")), dtype=np.uint8)
    offset = 0
    for i in range(0, len(lines), 1000):  # a chunk at a time: a whole text8 split's offsets would take GBs
        chunk = lines[i:i + 1000]
        for line, ends in zip(chunk, piece_end_bytes(sp, chunk)):
            out[offset + ends] = 1
            offset += len(line.encode("utf-8"))
    return out
