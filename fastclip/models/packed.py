"""Transformer blocks on packed rows: the valid tokens of every row laid end to end, no padding.

DTP's pooled rows differ in length (a sampled boundary count per image, a caption's own length and
boundaries). Padding them all to the batch's longest makes every shortened layer pay for tokens that
do not exist; for images, a Binomial spread of counts made that ~40% extra work (bench-clip
geometry). Packed, the LayerNorms, the QKV and output projections and the MLP, which are nearly all
of a block's FLOPs (12 L d^2 against attention's 2 L^2 d per row, L << d here), touch real tokens
only. Attention is the only op where rows interact within themselves. On a CUDA device in half
precision it runs on the packed tokens too, through torch's variable-length flash attention
(torch.nn.attention.varlen.varlen_attn: one kernel over every row, each attending within itself).
Elsewhere (CPU, float32, attention dropout, a torch without it) it runs on the padded [B, L] layout
with a key mask.

Written by hand because nothing we use does it: open_clip's blocks take padded batches, and torch's
jagged nested tensors (the library route) fail in scaled_dot_product_attention on a CPU machine with
a CUDA build (it probes the CUDA driver), and nn.MultiheadAttention refuses them in training.
"""
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from fastclip.errors import InputError


@dataclass
class PackedRows:
    """Index maps between a padded [B, L] layout whose valid tokens are a prefix of each row
    (lengths[b] of them) and a packed [size] layout: the real tokens, then filler rows up to size.
    size: a multiple of the batch size (on average B / 2 filler rows: ~1/(2 x mean row length) of
    the work, ~3% at 17 tokens a row), or a fixed size given by the caller (a token budget: the
    same shapes every step). The fixed sizes keep the tensor sizes to a few values: a new size every
    step made the CPU allocator's peak grow (bench-clip's CIFAR geometry, docs/results/benchmarks.md).

    Every map is one-to-one (no two slots read or write one row): src lists the real tokens' padded
    positions, then DISTINCT padding slots as filler, and unpack scatters the packed rows back with
    it (masking the filler). A gather from one shared zero row, the old unpack, put thousands of
    duplicates of one index in each call, and CUDA's index backward accumulates duplicates of one
    index serially. Built without a host read when size is given (total may then be unknown)."""
    batch: int
    length: int
    total: int | None      # real tokens, when the host knows it (None under a token budget)
    size: int
    src: torch.Tensor      # [size]: padded position of each packed row, pairwise distinct (filler: padding slots)
    real: torch.Tensor     # [size, 1] bool: which packed rows are real tokens (the others filler)
    starts: torch.Tensor   # [B]: packed position of each row's first token
    key_mask: torch.Tensor  # [B, 1, 1, L] bool (causal: [B, 1, L, L]): which keys a row's queries may attend to
    cu_seqlens: torch.Tensor  # [B + 1] int32: packed position where each row starts, then the real tokens' count
    causal: bool = False
    varlen: bool = False    # attention through varlen_attn (varlen_on: CUDA under half-precision autocast)

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, length: int, total: int | None, causal: bool = False,
                     size: int | None = None) -> "PackedRows":
        """lengths [B] long (each <= length). total: sum(lengths) if known on the host, else None
        with size given (>= sum(lengths), <= B x length). causal: each token attends to its row's
        tokens up to itself only. Raises ValueError when neither total nor size is given."""
        B = lengths.shape[0]
        if size is None:
            if total is None:
                raise ValueError("PackedRows.from_lengths needs the host total or a fixed size")
            size = -(-total // B) * B
        pos = torch.arange(length, device=lengths.device)
        valid = pos[None, :] < lengths[:, None]
        starts = lengths.cumsum(0) - lengths
        # the real positions in order, then the padding slots: a stable sort by (is padding, position),
        # static in shape (plain nonzero would sync on CUDA to size its output)
        flat = torch.arange(B * length, device=lengths.device)
        order = torch.where(valid.flatten(), flat, flat + B * length)
        src = order.sort().values[:size] % (B * length)
        real = (torch.arange(size, device=lengths.device) < lengths.sum())[:, None]
        # an empty row (a caption of no characters) may attend to its padding: its outputs are never
        # packed, but a query with every key masked would give NaN
        keys = (valid | (lengths == 0)[:, None])[:, None, None, :]
        if causal:
            keys = keys & torch.ones(length, length, dtype=torch.bool, device=lengths.device).tril()
        cu_seqlens = torch.cat([starts, lengths.sum().view(1)]).int()
        return cls(B, length, total, size, src, real, starts, keys, cu_seqlens, causal, varlen_on(lengths.device))

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [size, ...] (the real tokens first)"""
        return padded.flatten(0, 1).index_select(0, self.src)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[size, ...] -> [B, L, ...], zeros in the padding."""
        real = self.real.view(-1, *([1] * (packed.dim() - 1)))
        out = packed.new_zeros(self.batch * self.length, *packed.shape[1:])
        return out.index_copy(0, self.src, packed * real).unflatten(0, (self.batch, self.length))


def check_packable(block: nn.Module) -> None:
    """Packed blocks re-run open_clip's ResidualAttentionBlock from its own weights: refuse any
    block whose forward would differ from what packed_block computes."""
    attn = getattr(block, "attn", None)
    if type(block) is not ResidualAttentionBlock or not isinstance(attn, nn.MultiheadAttention):
        raise InputError(f"boundary.image_layout=packed needs open_clip ResidualAttentionBlocks with "
                         f"nn.MultiheadAttention; got {type(block).__name__} (use boundary.image_layout=padded)")
    if (not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn
            or hasattr(block, "ln_1_kv") or not attn.batch_first):
        raise InputError("boundary.image_layout=packed: this block's attention has options the packed path "
                         "does not reproduce (separate q/k/v weights, bias_k, add_zero_attn or cross-attention); "
                         "use boundary.image_layout=padded")


def packed_block(block: ResidualAttentionBlock, x: torch.Tensor, rows: PackedRows) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock.forward on packed tokens x [total, d]: the same weights
    and the same ops; only attention sees the padded layout (padded keys masked out)."""
    attn = block.attn
    heads = attn.num_heads
    # attention as Linears (compression/attention.py: quantization-aware training, a pruned copy) runs its
    # own in_proj, so that what wraps it (fake quantization) acts here too
    in_proj = getattr(attn, "in_proj", None)
    qkv = in_proj(block.ln_1(x)) if in_proj is not None else F.linear(block.ln_1(x), attn.in_proj_weight,
                                                                         attn.in_proj_bias)
    # the head width from the projection: a structurally pruned block has fewer heads than width // heads
    out = packed_attention(qkv, rows, heads, attn.dropout if block.training else 0.0)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def packed_attention(qkv: torch.Tensor, rows: PackedRows, heads: int, dropout: float = 0.0) -> torch.Tensor:
    """Multi-head attention of every row within itself (causal where rows.causal), on packed tokens.
    qkv [size, 3 x heads x head_dim] (q, k, v concatenated, as nn.MultiheadAttention's in_proj gives
    them) -> [size, heads x head_dim]; the filler rows' outputs are zeros on the varlen path and
    finite values nothing reads on the masked one. varlen_attn where rows.varlen (decided where the
    rows were built, outside any compiled block) and this attention suits it (half precision, head_dim
    a multiple of 8 up to 256, no dropout: varlen_attn has none), else scaled_dot_product_attention on
    the padded layout with rows.key_mask."""
    head_dim = qkv.shape[-1] // (3 * heads)
    if (rows.varlen and qkv.dtype in VARLEN_DTYPES and not dropout
            and head_dim % 8 == 0 and head_dim <= 256):
        # the filler rows lie beyond the last row's end: the kernel neither writes their outputs nor their
        # gradients (unset memory, possibly NaN). Selected, not multiplied: what is unset never gets through.
        qkv = torch.where(rows.real, qkv, 0)
        q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).unbind(1)  # each [size, heads, head_dim]
        # max_q = max_k = the padded length: an upper bound on every row's, read without a host sync
        out = VARLEN(q, k, v, rows.cu_seqlens, rows.cu_seqlens, rows.length, rows.length, **causal_kwargs(rows.causal))
        return torch.where(rows.real, out.flatten(-2), 0)
    q, k, v = rows.unpack(qkv).unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=rows.key_mask, dropout_p=dropout)
    return rows.pack(out.transpose(1, 2).flatten(-2))


def _varlen_kernel():
    try:  # torch >= 2.9
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


VARLEN = _varlen_kernel()
VARLEN_DTYPES = (torch.float16, torch.bfloat16)  # the kernel's
# its causal argument: window_size (-1, 0) in later torch, is_causal in the first release that has it (2.9)
_WINDOW = VARLEN is not None and "window_size" in inspect.signature(VARLEN).parameters


def causal_kwargs(causal: bool) -> dict:
    return {"window_size": (-1, 0) if causal else (-1, -1)} if _WINDOW else {"is_causal": causal}


def varlen_on(device: torch.device) -> bool:
    """Whether packed rows built now on `device` attend through varlen_attn: torch has it, the device is
    CUDA, autocast runs there in half precision or bfloat16 (the kernel's dtypes; float32 keeps the
    masked path), and the kernel runs on this device (checked once per device and dtype with tiny calls,
    forward and backward, on both the backends varlen_attn dispatches to: a GPU or build without them
    falls back with a warning instead of failing mid-run)."""
    if VARLEN is None or device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return False
    dtype = torch.get_autocast_dtype("cuda")
    return dtype in VARLEN_DTYPES and _varlen_runs(device, dtype)


@functools.cache
def _varlen_runs(device: torch.device, dtype: torch.dtype) -> bool:
    # rows of 1 token (flash attention), and rows of 129 without a causal mask, which torch 2.14 sends to
    # cuDNN on recent GPUs; head_dim 64, as ViT-B's
    try:  # the backward too (training), whatever grad mode or autocast the first call came in
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for length, causal in ((1, True), (129, False)):
                q = torch.zeros(2 * length, 1, 64, device=device, dtype=dtype, requires_grad=True)
                cu = torch.tensor([0, length, 2 * length], device=device, dtype=torch.int32)
                VARLEN(q, q, q, cu, cu, length, length, **causal_kwargs(causal)).sum().backward()
    except (RuntimeError, NotImplementedError) as exc:
        import logging
        logging.getLogger(__name__).warning("varlen attention unavailable on %s (%s): packed rows attend on the "
                                            "padded layout instead (%s)", device, dtype, exc)
        return False
    return True
