"""What each boundary option means per CLIP tower, and which towers a config pools. A method with
no meaning on a tower is a clear error at config time, never a silent no-op. Imports nothing
heavy: checks.py reads it before torch loads."""

TOWERS = ("image", "text")
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


def dtp_towers(boundary) -> tuple[str, ...]:
    """Which towers the boundary config pools; fails on a meaningless combination, naming it."""
    if boundary.name == "none":
        return ()
    if boundary.name not in MEANING:
        raise ValueError(f"boundary={boundary.name!r}: expected none or one of {', '.join(MEANING)}")
    towers = tuple(boundary.apply_to)
    for tower in towers:
        if tower not in TOWERS:
            raise ValueError(f"boundary.apply_to contains {tower!r}: expected image and/or text")
        if MEANING[boundary.name][tower] is None:
            raise ValueError(f"boundary={boundary.name} has no meaning on the {tower} tower "
                             f"(boundary.apply_to={list(towers)}); apply it to "
                             f"{[t for t in TOWERS if MEANING[boundary.name][t]]} only")
    return towers
