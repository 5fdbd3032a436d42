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
    key = hashlib.sha256(train_text.encode()).hexdigest()[:16]
    prefix = Path(cache_dir) / "unigram" / f"{key}_v{vocab_size}"
    model = prefix.with_suffix(".model")
    if not model.exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        corpus = prefix.with_suffix(".txt")
        corpus.write_text("\n".join(_lines(train_text)))
        log.info("training a %d-piece unigram model on %d chars -> %s", vocab_size, len(train_text), model)
        tmp_prefix = prefix.parent / f"tmp{os.getpid()}_{prefix.name}"
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(tmp_prefix), vocab_size=vocab_size, model_type="unigram",
            character_coverage=1.0, add_dummy_prefix=False, remove_extra_whitespaces=False,
            normalization_rule_name="identity", max_sentence_length=_LINE * 2, minloglevel=2,
            input_sentence_size=2_000_000, shuffle_input_sentence=True)
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
