"""ToMe (Bolya et al. 2023, "Token Merging: Your ViT but Faster") as published: in every block,
between attention and MLP, bipartite soft matching on the attention KEYS (mean over heads) merges
r tokens into their most similar partners by size-weighted average; the class token is never
merged; proportional attention adds log(token size) to the attention logits so a merged token
counts for the patches it holds. Our earlier version merged after the whole block on the hidden
states; it is gone (the published one is the peer a DTP claim must beat)."""
import torch
import torch.nn.functional as F
from torch import nn

from fastclip.models.vision import require_vit
from fastclip.models.vit_block import attention_half, check_block, encode, mlp_half


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, r: int, metric: torch.Tensor | None = None):
    """ToMe's bipartite soft matching on x [B, 1 + N, D] (class token first, never merged): the
    patch tokens alternate into sets A (even) and B (odd); each A token's most similar B token by
    cosine of `metric` [B, 1 + N, C] (ToMe: the keys; default x itself) is its match, and the r
    best-matched A tokens are merged into their matches by size-weighted average (sizes [B, 1 + N, 1]).
    Returns (x, size) with N - r patch tokens: [class, unmerged A, B]."""
    cls, tokens = x[:, :1], x[:, 1:]
    cls_size, tok_size = size[:, :1], size[:, 1:]
    r = min(r, tokens.shape[1] // 2)
    if r <= 0:
        return x, size
    m = (metric if metric is not None else x)[:, 1:]
    a, b = tokens[:, ::2], tokens[:, 1::2]
    sa, sb = tok_size[:, ::2], tok_size[:, 1::2]
    score = F.normalize(m[:, ::2].float(), dim=-1) @ F.normalize(m[:, 1::2].float(), dim=-1).transpose(1, 2)
    best, match = score.max(dim=-1)                       # per A token
    order = best.argsort(dim=-1, descending=True)
    merged_idx, kept_idx = order[:, :r], order[:, r:]
    D = x.shape[-1]
    gather = lambda t, idx, d: t.gather(1, idx[..., None].expand(-1, -1, d))  # noqa: E731
    a_kept, sa_kept = gather(a, kept_idx, D), gather(sa, kept_idx, 1)
    a_m, sa_m = gather(a, merged_idx, D), gather(sa, merged_idx, 1)
    dst = match.gather(1, merged_idx)
    b_sum = (b * sb).scatter_add(1, dst[..., None].expand(-1, -1, D), a_m * sa_m)
    sb_new = sb.scatter_add(1, dst[..., None], sa_m)
    return (torch.cat([cls, a_kept, b_sum / sb_new], dim=1), torch.cat([cls_size, sa_kept, sb_new], dim=1))


class ToMeImageTower(nn.Module):
    """open_clip's ViT with ToMe in every block: attention with proportional attention -> merge r
    tokens by their keys -> MLP on the merged tokens."""

    def __init__(self, visual, r: int):
        super().__init__()
        self.vit = require_vit(visual, "boundary=tome")
        for block in self.vit.transformer.resblocks:
            check_block(block, "boundary=tome")
        self.r = r

    def forward(self, images):
        vit = self.vit
        x = vit._embeds(images)
        n_in = x.shape[1] - 1
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=x.dtype)
        for block in vit.transformer.resblocks:
            # proportional attention: log(size) on every key's logit, the same for every head and query
            x, keys, _ = attention_half(block, x, bias=size.squeeze(-1).log()[:, None, None, :])
            x, size = bipartite_merge(x, size, self.r, metric=keys.mean(1))
            x = mlp_half(block, x)
        return encode(vit, x, images, n_in)
