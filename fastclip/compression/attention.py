"""nn.MultiheadAttention as plain Linears, so that weight quantization reaches attention.

torchao's quantize_ (like torch.ao's quantize_dynamic) only converts nn.Linear modules: the
attention inside open_clip's blocks keeps its fused input projection in a bare Parameter
(`in_proj_weight`) and its output projection in a NonDynamicallyQuantizableLinear, so by default
only the MLPs are quantized. Quantizing `in_proj_weight` in place through torchao's FqnToConfig
does not work either: measured with torchao 0.18, MultiheadAttention's forward then fails
(`aten.t` is not implemented for Int8Tensor). ProjectedAttention computes the same self-attention
from an nn.Linear (3d outputs) and an nn.Linear out_proj with torch's scaled_dot_product_attention,
so quantize_ converts both. Written here because neither library offers the swap.
"""
import torch
import torch.nn.functional as F
from torch import nn


class ProjectedAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's call signature and results (batch_first), its
    projections as nn.Linear: in_proj (d -> 3d, q|k|v as MHA packs them) and out_proj (d -> d).

    forward(query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None)
    -> (out [B, L, d], None). query, key and value must be the same tensor (self-attention, as
    every fastclip tower calls it). attn_mask as MHA takes it: [L, S] or [B * heads, L, S], bool
    (True: masked out) or float (added to the logits); key_padding_mask [B, S] bool (True: ignored)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or not mha.batch_first:
            raise ValueError("ProjectedAttention reproduces batch-first self-attention with one packed in-projection "
                             "and no bias_k / add_zero_attn; this MultiheadAttention has other options")
        d = mha.embed_dim
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = d, mha.num_heads, mha.dropout, True
        self._qkv_same_embed_dim, self.bias_k, self.add_zero_attn = True, None, False  # what callers check on MHA
        bias = mha.in_proj_bias is not None
        self.in_proj = nn.Linear(d, 3 * d, bias=bias, device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None, device=mha.out_proj.weight.device,
                                  dtype=mha.out_proj.weight.dtype)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            if bias:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    @property
    def in_proj_weight(self):  # models.packed reads the packed projection as MHA keeps it
        return self.in_proj.weight

    @property
    def in_proj_bias(self):
        return self.in_proj.bias

    def forward(self, query, key, value, need_weights: bool = True, attn_mask=None, key_padding_mask=None,
                is_causal: bool = False, average_attn_weights: bool = True):
        if key is not query or value is not query:
            raise ValueError("ProjectedAttention is self-attention: query, key and value must be the same tensor")
        if need_weights or is_causal:
            raise ValueError("ProjectedAttention returns no attention weights and takes causality as attn_mask "
                             "(need_weights=False, is_causal=False), as open_clip's blocks call it")
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise ValueError("ProjectedAttention takes a bool key_padding_mask (True: ignored)")
        b, length, d = query.shape
        heads = self.num_heads
        q, k, v = self.in_proj(query).unflatten(-1, (3, heads, d // heads)).permute(2, 0, 3, 1, 4)
        mask = _additive_mask(attn_mask, key_padding_mask, b, heads, length, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(-2)), None


def _additive_mask(attn_mask, key_padding_mask, batch: int, heads: int, length: int, dtype):
    """MHA's masks (bool True = masked, or float added) as one float mask SDPA broadcasts, or None."""
    out = None
    if attn_mask is not None:
        mask = attn_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        out = mask.to(dtype).view(batch, heads, length, -1) if mask.dim() == 3 else mask.to(dtype)
    if key_padding_mask is not None:
        pad = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
        pad = pad.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        out = pad if out is None else out + pad
    return out


def project_attention(model: nn.Module) -> int:
    """Replaces every nn.MultiheadAttention in `model` with an equal ProjectedAttention, in place
    -> how many were replaced."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.MultiheadAttention)]
    for parent, name, child in targets:
        setattr(parent, name, ProjectedAttention(child))
    return len(targets)
