"""Hourglass character LM: pre-layers at full length -> boundary predictor -> segment-mean
downsample (null group first) -> shortened layers -> causal upsample + residual -> post-layers.

boundary=none is the vanilla baseline at the same depth: all layers at full length.
Blocks are open_clip's ResidualAttentionBlock (pre-norm), all causal.
"""
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from fastclip.models.dtp import (BoundaryPredictor, causal_upsample, check_finite, downsample, finite_flag,
                                 segment_counts)
from fastclip.models.outputs import CharLMOutput


def causal_mask(n: int, device) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), device=device).triu(1)


class HourglassLM(nn.Module):
    def __init__(self, vocab_size: int, width: int, heads: int, mlp_ratio: float, pre_layers: int,
                 short_layers: int, post_layers: int, max_len: int, boundary=None, dropout: float = 0.0,
                 block_dropout: bool = True):
        super().__init__()
        self.boundary = boundary

        def blocks(n):
            out = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(n))
            for block in out if dropout and block_dropout else ():  # the paper's dropout and dropatt (0.1 on text8)
                block.attn.dropout = dropout  # on the attention weights (nn.MultiheadAttention's own)
                block.ls_1, block.ls_2 = nn.Dropout(dropout), nn.Dropout(dropout)  # on each residual branch
            return out

        self.embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.embed.weight, std=0.02)  # same scale as positions, or order is drowned out
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.pre, self.short, self.post = blocks(pre_layers), blocks(short_layers), blocks(post_layers)
        self.predictor = BoundaryPredictor(width, dropout, boundary.init_rate, boundary.predictor_ratio) if boundary is not None and boundary.needs_predictor else None
        self.null_group = nn.Parameter(torch.zeros(1, 1, width)) if boundary is not None else None
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    @staticmethod
    def _run(blocks, x):
        mask = causal_mask(x.shape[1], x.device).to(x.dtype)
        for block in blocks:
            x = block(x, attn_mask=mask)
        return x

    def forward(self, tokens: torch.Tensor) -> CharLMOutput:
        """tokens [B, T] character ids -> CharLMOutput (logits [B, T, V]; segments, and for DTP the
        boundaries and the predictor's logits)."""
        B, T = tokens.shape
        x = self.drop(self.embed(tokens) + self.pos[:T])
        x = self._run(self.pre, x)
        logits = b = None
        segments = torch.full((B,), T, device=tokens.device)
        if self.boundary is None:
            x = self._run(self.short, x)
        else:
            logits = self.predictor(x) if self.predictor is not None else None
            b = self.boundary.boundaries(logits, tokens)
            # Only closed segments are ever read; the open one at the end is dropped. One host sync.
            closed = b.detach().sum(1).max().long()
            n_closed, finite = torch.stack([closed, finite_flag(logits, closed)]).tolist()
            check_finite(finite, "DTP char LM")
            pooled, _ = downsample(x, b, n_segments=max(n_closed, 1), grad=self.boundary.pooling_grad)
            short = torch.cat([self.null_group.expand(B, 1, -1).to(x.dtype), pooled], dim=1)
            short = self._run(self.short, short)
            x = x + causal_upsample(short, b, grad=self.boundary.pooling_grad)  # the same sign both ways
            segments = segment_counts(b)
        x = self._run(self.post, x)
        return CharLMOutput(self.head(self.ln_f(x)), segments=segments, boundaries=b, boundary_logits=logits)
