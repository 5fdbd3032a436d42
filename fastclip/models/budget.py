"""A token budget for the learned DTP image tower (boundary.image_token_budget): the shortened
layers run on a packed tensor of a size fixed by the config, not by the step's sampled boundaries.

Without it the tower reads the step's longest row and total back to the host to size its pooled
and packed tensors: one host sync per step, which drains the GPU queue, and a new shape every
step, which rules out CUDA graphs and makes a compiled block recompile. Under a budget every
shape is known before the step runs. The price: when a batch samples more segments than the
budget holds, the boundaries beyond it are dropped (in batch order: the later images of the
batch lose their last boundaries first) and counted (TowerOutput.dropped, logged as
boundaries/dropped_image). gumbel's counts are Binomial, so a budget a little above the prior's
rate drops almost nothing.
"""
import math

import torch

from fastclip.errors import InputError
from fastclip.models.dtp import segment_counts

KEY = "boundary.image_token_budget"


def segments_per_image(budget: float | int, n_patches: int) -> int:
    """The budget in segments per image on average, K: a fraction in (0, 1] of the n_patches
    patch tokens (ceil(budget x n_patches)) or a count 1 .. n_patches. Every image keeps its class
    token and at least one segment, so fewer than 1 segment an image means nothing; more than
    n_patches can never be used. Raises ValueError naming the key and value."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise InputError(f"{KEY}={budget!r}: expected a fraction in (0, 1] of the patch tokens or a count >= 1")
    if isinstance(budget, float) and budget <= 1.0:
        if budget <= 0:
            raise InputError(f"{KEY}={budget}: expected a fraction in (0, 1] of the {n_patches} patch tokens "
                             f"or a count >= 1 segment per image")
        return math.ceil(budget * n_patches)
    if budget != int(budget) or not 1 <= budget <= n_patches:
        raise InputError(f"{KEY}={budget}: a count of segments per image must be an integer from 1 (every image "
                         f"keeps one segment) to the {n_patches} patch tokens of this tower")
    return int(budget)


def drop_beyond_budget(b: torch.Tensor, per_image: int):
    """b [B, N] boundaries (straight-through float, 1 closes a segment) -> (b_kept [B, N], kept [B]
    long segments per row, dropped [B] long boundaries dropped per row), with sum(kept) <= B x
    per_image and every row keeping >= 1 segment. Rows are served in batch order: each keeps its
    first boundaries while the batch's budget lasts. No host read: every shape is B or B x N.
    A kept boundary keeps its straight-through gradient; past a row's last kept boundary the
    gradient is 0 (a boundary there would be dropped too)."""
    counts = segment_counts(b)
    extra = counts - 1                                  # the segments beyond each row's first
    room = b.shape[0] * (per_image - 1)
    allowed = (room - (extra.cumsum(0) - extra)).clamp_min(0).minimum(extra)
    rank = b[:, :-1].detach().cumsum(1)                 # inner boundary t is the rank[t]-th of its row
    keep = (rank <= allowed[:, None]).to(b.dtype)
    # the last patch's boundary closes no new segment (segment_counts): kept as is
    kept_b = torch.cat([b[:, :-1] * keep, b[:, -1:]], dim=1)
    return kept_b, allowed + 1, extra - allowed
