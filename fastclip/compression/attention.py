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
    (True: masked out) or float (added to the logits); key_padding_mask [B, S] bool (True: ignored).

    keep_heads(index) removes the other heads (structured pruning): the projections shrink to
    3 x kept x head_dim rows and kept x head_dim columns; per-head masks built for the original
    head count still apply (their kept heads are taken).

    Its state_dict has MultiheadAttention's keys (in_proj_weight, in_proj_bias, out_proj.*), and it
    loads them: a model trained with it (quantization-aware training) saves checkpoints that a model
    built with MultiheadAttention loads, and the other way round."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or not mha.batch_first:
            raise ValueError("ProjectedAttention reproduces batch-first self-attention with one packed in-projection "
                             "and no bias_k / add_zero_attn; this MultiheadAttention has other options")
        d = mha.embed_dim
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = d, mha.num_heads, mha.dropout, True
        self._qkv_same_embed_dim, self.bias_k, self.add_zero_attn = True, None, False  # what callers check on MHA
        self.head_dim = d // mha.num_heads
        self.register_buffer("kept", torch.arange(mha.num_heads), persistent=False)  # of the original heads
        self.register_state_dict_post_hook(_as_multihead_keys)
        self.register_load_state_dict_pre_hook(_from_multihead_keys)
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

    @torch.no_grad()
    def keep_heads(self, index: torch.Tensor) -> None:
        """Keeps the heads `index` (of the current ones, ascending) and drops the rest, in place."""
        hd, device = self.head_dim, self.in_proj.weight.device
        index = index.to(device)
        rows = (torch.arange(3, device=device)[:, None, None] * self.num_heads * hd + index[None, :, None] * hd
                + torch.arange(hd, device=device)[None, None, :]).flatten()
        cols = (index[:, None] * hd + torch.arange(hd, device=device)[None, :]).flatten()
        self.in_proj = _sliced(self.in_proj, rows=rows)
        self.out_proj = _sliced(self.out_proj, cols=cols)
        self.kept = self.kept[index.to(self.kept.device)]
        self.num_heads = len(index)

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
        q, k, v = self.in_proj(query).unflatten(-1, (3, heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        mask = _additive_mask(attn_mask, key_padding_mask, b, self.kept, length, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).flatten(-2)), None


# ProjectedAttention's keys <-> MultiheadAttention's
_KEYS = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias"}


def _as_multihead_keys(module, state_dict, prefix, local_metadata) -> None:
    for own, mha in _KEYS.items():
        if prefix + own in state_dict:
            state_dict[prefix + mha] = state_dict.pop(prefix + own)


def _from_multihead_keys(module, state_dict, prefix, *args) -> None:
    for own, mha in _KEYS.items():
        if prefix + mha in state_dict:
            state_dict[prefix + own] = state_dict.pop(prefix + mha)


def _sliced(linear: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A new Linear holding the given output rows and input columns of `linear`'s weight (and bias rows)."""
    weight = linear.weight if rows is None else linear.weight[rows]
    weight = weight if cols is None else weight[:, cols]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    out.weight.copy_(weight)
    if linear.bias is not None:
        out.bias.copy_(linear.bias if rows is None else linear.bias[rows])
    return out


def _additive_mask(attn_mask, key_padding_mask, batch: int, kept: torch.Tensor, length: int, dtype):
    """MHA's masks (bool True = masked, or float added) as one float mask SDPA broadcasts, or None.
    kept: the heads this attention has, of the heads a per-head mask may have been built for."""
    out = None
    if attn_mask is not None:
        mask = attn_mask
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
        out = mask.to(dtype)
        if mask.dim() == 3:
            out = out.view(batch, -1, length, out.shape[-1])
            if out.shape[1] != len(kept):  # built for the heads before some were pruned
                out = out[:, kept.to(out.device)]
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
