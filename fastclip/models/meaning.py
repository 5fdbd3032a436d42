"""What each boundary option means per CLIP tower, and which towers a config pools. A method with
no meaning on a tower is a clear error at config time, never a silent no-op. Imports nothing
heavy: checks.py reads it before torch loads."""

from fastclip.errors import InputError
from fastclip.schema.model import TOWERS
# None = no meaning there
MEANING = {
    "fixed": {"image": "every k patches in reading order (boundary.image_order: raster or hilbert)", "text": "every k characters"},
    "gumbel": {"image": "learned, over patches in reading order (boundary.image_order)", "text": "learned, over characters"},
    "entropy_spike": {"image": "spikes of an auxiliary next-patch predictor's error",
                      "text": "spikes of an auxiliary next-character head's entropy"},
    "whitespace": {"image": None, "text": "a space closes its word"},
    "unigram": {"image": None, "text": "sentencepiece Unigram piece ends of the training captions"},
    "tome": {"image": "ToMe bipartite soft matching on the keys, r tokens per layer", "text": None},
    "patch_dropout": {"image": "FLIP: a random keep fraction of the patches in training", "text": None},
    "evit": {"image": "EViT: the top keep fraction of patches by class attention, the rest fused", "text": None},
    "lowres": {"image": "CLIPA: the image read at a lower resolution (boundary.scale of its side)", "text": None},
}
# The text tower over BPE tokens (boundary.text_tokens=bpe; MEANING's text column is the byte tower's)
OVER_BPE = {
    "fixed": "every k BPE tokens",
    "gumbel": "learned, over BPE tokens",
    "entropy_spike": "spikes of an auxiliary next-BPE-token head's entropy",
    "whitespace": "a token that ends a word (BPE's </w>) closes its segment",
    "unigram": None,  # piece ends of another tokenizer, which need not fall on BPE token ends
}


def dtp_towers(boundary) -> tuple[str, ...]:
    """Which towers the boundary config pools; fails on a meaningless combination, naming it."""
    if boundary.name == "none":
        return ()
    if boundary.name not in MEANING:
        raise InputError(f"boundary={boundary.name!r}: expected none or one of {', '.join(MEANING)}")
    towers = tuple(boundary.apply_to)
    for tower in towers:
        if tower not in TOWERS:
            raise InputError(f"boundary.apply_to contains {tower!r}: expected image and/or text")
        if MEANING[boundary.name][tower] is None:
            raise InputError(f"boundary={boundary.name} has no meaning on the {tower} tower "
                             f"(boundary.apply_to={list(towers)}); apply it to "
                             f"{[t for t in TOWERS if MEANING[boundary.name][t]]} only")
    if "text" in towers and boundary.text_tokens == "bpe" and OVER_BPE.get(boundary.name) is None:
        raise InputError(f"boundary={boundary.name} has no meaning over BPE tokens (boundary.text_tokens=bpe): "
                         f"apply it to the byte-level text tower (boundary.text_tokens=bytes), or to "
                         f"{[t for t in TOWERS if t != 'text' and MEANING[boundary.name][t]] or 'no other tower'}")
    return towers


def check_tokenizer(tokenizer: str, boundary, towers: tuple[str, ...]) -> None:
    """encoder.tokenizer=char is the byte-level DTP text tower's: refused anywhere else, naming the keys.
    (encoder.tokenizer=bpe with boundary.text_tokens=bytes is what every run before text_tokens wrote.)"""
    if tokenizer != "char":
        return
    if "text" not in towers:
        raise InputError("encoder.tokenizer=char needs a DTP text tower (a boundary applied to text); "
                         "vanilla text towers use open_clip's BPE tokenizer")
    if boundary.text_tokens != "bytes":
        raise InputError(f"encoder.tokenizer=char with boundary.text_tokens={boundary.text_tokens}: the char "
                         f"tokenizer feeds the byte-level DTP text tower (boundary.text_tokens=bytes); the BPE one "
                         f"reads open_clip's BPE (encoder.tokenizer=bpe)")
