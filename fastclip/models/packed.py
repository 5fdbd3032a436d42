"""Transformer blocks on packed rows: the valid tokens of every row laid end to end, no padding.

DTP's pooled rows differ in length (a sampled boundary count per image). Padding them all to the
batch's longest makes every shortened layer pay for tokens that do not exist; with a Binomial spread
of counts that was ~40% extra work (bench-clip geometry). Packed, the LayerNorms, the QKV and output
projections and the MLP, which are nearly all of a block's FLOPs (12 L d^2 against attention's
2 L^2 d per row, L << d here), touch real tokens only. Attention alone is run on the padded
[B, L] layout with a key mask: it is the only op where rows interact within themselves.

Written by hand because nothing we use does it: open_clip's blocks take padded batches, and torch's
jagged nested tensors (the library route) fail in scaled_dot_product_attention on a CPU machine with
a CUDA build (it probes the CUDA driver), and nn.MultiheadAttention refuses them in training.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn


@dataclass
class PackedRows:
    """Index maps between a padded [B, L] layout whose valid tokens are a prefix of each row
    (lengths[b] of them) and a packed [total] layout. total is a host int (no sync to build)."""
    batch: int
    length: int
    total: int
    src: torch.Tensor      # [total]: flat padded position of each packed token
    dest: torch.Tensor     # [B * L]: packed position of each padded slot; padding -> total (a zero row)
    starts: torch.Tensor   # [B]: packed position of each row's first token
    key_mask: torch.Tensor  # [B, 1, 1, L] bool: which keys a row may attend to

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, length: int, total: int) -> "PackedRows":
        B = lengths.shape[0]
        pos = torch.arange(length, device=lengths.device)
        valid = pos[None, :] < lengths[:, None]
        starts = lengths.cumsum(0) - lengths
        # nonzero_static: the size is known on the host, so no sync (plain nonzero syncs on CUDA)
        src = torch.nonzero_static(valid.flatten(), size=total).squeeze(1)
        dest = torch.where(valid, starts[:, None] + pos[None, :], total).flatten()
        return cls(B, length, total, src, dest, starts, valid[:, None, None, :])

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [total, ...]"""
        return padded.flatten(0, 1)[self.src]

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[total, ...] -> [B, L, ...], zeros in the padding."""
        with_zero = torch.cat([packed, packed.new_zeros(1, *packed.shape[1:])])
        return with_zero[self.dest].unflatten(0, (self.batch, self.length))


def check_packable(block: nn.Module) -> None:
    """Packed blocks re-run open_clip's ResidualAttentionBlock from its own weights: refuse any
    block whose forward would differ from what packed_block computes."""
    attn = getattr(block, "attn", None)
    if type(block) is not ResidualAttentionBlock or not isinstance(attn, nn.MultiheadAttention):
        raise ValueError(f"boundary.image_layout=packed needs open_clip ResidualAttentionBlocks with "
                         f"nn.MultiheadAttention; got {type(block).__name__} (use boundary.image_layout=padded)")
    if (not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn
            or hasattr(block, "ln_1_kv") or not attn.batch_first):
        raise ValueError("boundary.image_layout=packed: this block's attention has options the packed path "
                         "does not reproduce (separate q/k/v weights, bias_k, add_zero_attn or cross-attention); "
                         "use boundary.image_layout=padded")


def packed_block(block: ResidualAttentionBlock, x: torch.Tensor, rows: PackedRows) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock.forward on packed tokens x [total, d]: the same weights
    and the same ops; only attention sees the padded layout (padded keys masked out)."""
    attn = block.attn
    heads, d = attn.num_heads, x.shape[-1]
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = rows.unpack(qkv).unflatten(-1, (3, heads, d // heads)).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=rows.key_mask,
                                         dropout_p=attn.dropout if block.training else 0.0)
    out = rows.pack(out.transpose(1, 2).flatten(-2))
    x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
