"""Unigram boundaries: a sentencepiece Unigram model trained on the TRAINING split only,
cached under outputs/cache keyed by the data and the vocab size; boundaries = piece ends."""
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import sentencepiece as spm

log = logging.getLogger(__name__)
_LINE = 4000  # sentencepiece reads lines; text8 is one line, so it is cut at spaces


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


def _train_or_load(lines: list[str], vocab_size: int, cache_dir) -> spm.SentencePieceProcessor:
    corpus_text = "\n".join(lines)
    key = hashlib.sha256(corpus_text.encode()).hexdigest()[:16]
    prefix = Path(cache_dir) / "unigram" / f"{key}_v{vocab_size}"
    model = prefix.with_suffix(".model")
    if not model.exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        tmp_prefix = prefix.parent / f"tmp{os.getpid()}_{prefix.name}"
        corpus = Path(f"{tmp_prefix}.txt")
        corpus.write_text(corpus_text)
        log.info("training a %d-piece unigram model on %d chars -> %s", vocab_size, len(corpus_text), model)
        # hard_vocab_limit off: a small corpus (a few templates) yields fewer pieces than asked for
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(tmp_prefix), vocab_size=vocab_size, model_type="unigram",
            character_coverage=1.0, add_dummy_prefix=False, remove_extra_whitespaces=False,
            normalization_rule_name="identity", max_sentence_length=_LINE * 2, minloglevel=2,
            input_sentence_size=2_000_000, shuffle_input_sentence=True, hard_vocab_limit=False)
        Path(f"{tmp_prefix}.vocab").replace(f"{prefix}.vocab")
        Path(f"{tmp_prefix}.model").replace(model)  # atomic: concurrent jobs never read half a model
        corpus.unlink()
    return spm.SentencePieceProcessor(model_file=str(model))


def piece_end_boundaries(sp: spm.SentencePieceProcessor, text: str) -> np.ndarray:
    """uint8 per character: 1 where a piece ends (the last char of every piece)."""
    out = np.zeros(len(text), dtype=np.uint8)
    pos = 0
    for line in _lines(text):
        for piece in sp.encode(line, out_type=str):
            pos += len(piece)
            out[pos - 1] = 1
    if pos != len(text):
        raise RuntimeError(f"unigram pieces cover {pos} of {len(text)} chars: the model altered the text")
    return out
