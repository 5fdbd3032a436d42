"""ToMe (Bolya et al. 2023, "Token Merging: Your ViT but Faster") as published: in every block,
between attention and MLP, bipartite soft matching on the attention KEYS (mean over heads) merges
r tokens into their most similar partners by size-weighted average; the class token is never
merged; proportional attention adds log(token size) to the attention logits so a merged token
counts for the patches it holds. The split into the sets A and B and the order of the merged tokens
follow ToMe's reference code (A: the even positions with the class token; unmerged A tokens kept in
position order). Our earlier version merged after the whole block on the hidden
states; it is gone (the published one is the peer a DTP claim must beat)."""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.models.outputs import TowerOutput
from fastclip.models.vision import require_vit
from fastclip.models.vit_block import attention_half, check_block, encode, full_token_forward, mlp_half


class Matching(NamedTuple):
    """One bipartite soft matching over the tokens of [B, T, C], split as ToMe's code does: set A is
    the even positions (the class token at 0 among them, never merged), B the odd ones. A's tokens at
    `kept` [B, T_A - r] (indices into A, in position order, so the class token stays first) stay;
    those at `merged` [B, r] (indices into A) go into B's at `into` [B, r] (indices into B)."""
    kept: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor

    def add(self, t: torch.Tensor) -> torch.Tensor:
        """t [B, T, C] -> [B, T - r, C]: [kept A, B], each merged A row added to its partner's (a sum:
        sizes and sources merge this way, features as size-weighted sums)."""
        a, b = t[:, ::2], t[:, 1::2]
        rows = lambda idx: a.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        b = b.scatter_add(1, self.into[..., None].expand(-1, -1, t.shape[-1]), rows(self.merged))
        return torch.cat([rows(self.kept), b], dim=1)


def bipartite_matching(metric: torch.Tensor, r: int) -> Matching | None:
    """ToMe's matching on metric [B, T, C] (the class token at 0): each A token's most similar B token
    by cosine is its partner, and the r best-matched A tokens merge (r capped at (T - 1) // 2, the
    patch tokens' half). None when nothing merges."""
    r = min(r, (metric.shape[1] - 1) // 2)
    if r <= 0:
        return None
    m = F.normalize(metric.float(), dim=-1)
    score = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    score[:, 0] = -math.inf  # the class token is never merged
    best, partner = score.max(dim=-1)  # per A token
    order = best.argsort(dim=-1, descending=True)
    return Matching(kept=order[:, r:].sort(dim=-1).values, merged=order[:, :r], into=partner.gather(1, order[:, :r]))


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, r: int, metric: torch.Tensor | None = None,
                    source: torch.Tensor | None = None):
    """ToMe's merge of x [B, T, D] (the class token at 0, never merged) with token sizes [B, T, 1]
    (float32: a bf16 count is exact only to 256): the r best-matched tokens by `metric` [B, T, C]
    (ToMe: the keys; default x itself) merge into their partners by size-weighted average. source
    [B, T, P] (optional, ToMe's source tracking: which of the P input tokens each token holds) merges
    by sum. Returns (x [B, T - r, D] in x's dtype, size, source), the tokens ordered [class, unmerged
    A in position order, B] as in ToMe's code; r is capped at (T - 1) // 2; source stays None when
    not given."""
    match = bipartite_matching(metric if metric is not None else x, r)
    if match is None:
        return x, size, source
    new_size = match.add(size)
    return ((match.add(x * size) / new_size).to(x.dtype), new_size,
            None if source is None else match.add(source))


class ToMeImageTower(nn.Module):
    """open_clip's ViT with ToMe in every block: attention with proportional attention -> merge r
    tokens by their keys -> MLP on the merged tokens."""

    def __init__(self, visual, r: int):
        super().__init__()
        self.vit = require_vit(visual, "boundary=tome")
        for block in self.vit.transformer.resblocks:
            check_block(block, "boundary=tome")
        self.r = r

    full_tokens = False  # trainer.full_token_steps' phase: r = 0, every token kept (FastCLIP.set_full_tokens)

    def forward(self, images, record: dict | None = None) -> TowerOutput:
        if self.full_tokens and record is None:
            return full_token_forward(self.vit, images)
        vit = self.vit
        x = vit._embeds(images)
        n_in = x.shape[1] - 1
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device)  # float32 under autocast too
        # each token's input tokens (the picture only: [B, T, 1 + N] per block is too dear to train with)
        source = torch.eye(x.shape[1], device=x.device).expand(x.shape[0], -1, -1) \
            if record is not None else None
        for block in vit.transformer.resblocks:
            # proportional attention: log(size) on every key's logit, the same for every head and query
            x, keys, _ = attention_half(block, x, bias=size.squeeze(-1).log()[:, None, None, :])
            x, size, source = bipartite_merge(x, size, self.r, metric=keys.mean(1), source=source)
            x = mlp_half(block, x)
        if record is not None:
            record["source"] = source
        return encode(vit, x, images, n_in)

    @torch.no_grad()
    def merged_groups(self, images) -> torch.Tensor:
        """[B, N] long, raster order: for each patch, the final token holding it (the boundary picture
        draws each token's patches as one outlined segment). Token 0, the class token, holds no patch."""
        record = {}
        self(images, record)
        return record["source"][:, :, 1:].argmax(dim=1)
