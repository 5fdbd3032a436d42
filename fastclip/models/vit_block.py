"""open_clip's ResidualAttentionBlock run in its two halves, for the peer baselines that act between
attention and MLP (ToMe merges there, EViT drops and fuses there): the same weights and ops as the
block's forward, with what those methods read from attention (its keys, the class token's attention)
handed back. Written here because open_clip's block returns only its output."""
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from fastclip.errors import InputError
from fastclip.models.outputs import TowerOutput


def check_block(block: nn.Module, what: str) -> None:
    """Refuse a block whose forward attention_half + mlp_half would not reproduce."""
    attn = getattr(block, "attn", None)
    if type(block) is not ResidualAttentionBlock or not hasattr(attn, "in_proj_weight") or hasattr(block, "ln_1_kv"):
        raise InputError(f"{what} runs open_clip's ResidualAttentionBlock in halves; got {type(block).__name__}")
    if isinstance(attn, nn.MultiheadAttention) and (not attn._qkv_same_embed_dim or attn.bias_k is not None
                                                    or attn.add_zero_attn or not attn.batch_first):
        raise InputError(f"{what}: this block's attention has options the split block does not reproduce")


def attention_half(block: ResidualAttentionBlock, x: torch.Tensor, bias: torch.Tensor | None = None,
                   cls_attention: bool = False):
    """x [B, L, d] -> (x + attention(ln_1(x)) [B, L, d], keys [B, heads, L, head_dim], the class token's
    attention over the L tokens [B, heads, L] or None). bias: added to the attention logits,
    broadcastable to [B, heads, L, L] (ToMe's log token sizes)."""
    attn = block.attn
    heads = attn.num_heads
    in_proj = getattr(attn, "in_proj", None)  # attention as Linears (compression/attention.py)
    h = block.ln_1(x)
    qkv = in_proj(h) if in_proj is not None else F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.unflatten(-1, (3, heads, qkv.shape[-1] // (3 * heads))).permute(2, 0, 3, 1, 4)
    if bias is not None:
        bias = bias.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.dropout if block.training else 0.0)
    x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).flatten(-2)))
    cls = None
    if cls_attention:  # one query row: the class token's softmax over the keys (the same logits SDPA used)
        logits = (q[:, :, :1] @ k.transpose(-1, -2)).squeeze(2) * q.shape[-1] ** -0.5
        if bias is not None:
            logits = logits + bias.expand(q.shape[0], heads, q.shape[2], k.shape[2])[:, :, 0]
        cls = logits.float().softmax(-1)
    return x, k, cls


def mlp_half(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def encode(vit, x: torch.Tensor, images: torch.Tensor, n_in: int) -> TowerOutput:
    """The tower's end: ln_post, the class token, the projection -> TowerOutput (tokens: n_in patches,
    segments: the patch tokens left in x [B, 1 + segments, d])."""
    x = vit.ln_post(x)
    emb = x[:, 0]
    if vit.proj is not None:
        emb = emb @ vit.proj
    B = images.shape[0]
    return TowerOutput(emb, tokens=torch.full((B,), float(n_in), device=x.device),
                       segments=torch.full((B,), float(x.shape[1] - 1), device=x.device))


def full_token_forward(vit, images: torch.Tensor) -> TowerOutput:
    """The ViT on every patch (trainer.full_token_steps' phase for a token-reducing peer): every
    block on [class token, N patches], then `encode`: tokens = segments = N, the vanilla tower's cost."""
    x = vit._embeds(images)
    n_in = x.shape[1] - 1
    for block in vit.transformer.resblocks:
        x = block(x)
    return encode(vit, x, images, n_in)

