"""Which weights magnitude pruning zeroes (compression=prune; the schedule is prune.py's), how many
are zero, and the structurally pruned model with its pruned heads and channels removed.

The selection (a top-k over magnitudes) is written here rather than taken from torch.nn.utils.prune:
that one re-registers the parameters it prunes (reordering them under the optimizer and
DistributedDataParallel) and refreshes them in forward pre-hooks, which open_clip's
MultiheadAttention bypasses (it reads out_proj.weight and in_proj_weight directly: pytorch#69353).
"""
import copy

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from fastclip.compression.attention import ProjectedAttention, project_attention
from fastclip.compression import FLOAT_PARTS


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> the weights unstructured pruning ranks: every nn.Linear's weight and every
    MultiheadAttention's in_proj_weight, outside DTP's predictors and their auxiliary heads."""
    out = {}
    for name, module in model.named_modules():
        if set(name.split(".")) & set(FLOAT_PARTS):
            continue
        if isinstance(module, nn.Linear):
            out[f"{name}.weight"] = module.weight
        elif isinstance(module, nn.MultiheadAttention):
            out[f"{name}.in_proj_weight"] = module.in_proj_weight
    return out


def weight_sparsity(model: nn.Module) -> float:
    """compression/sparsity: the share of the prunable weights (`prunable_weights`) that are zero,
    counted from the weights."""
    weights = prunable_weights(model).values()
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))


def nonzero_parameters(model: nn.Module) -> int:
    """compression/params_nonzero: every parameter entry of the model that is not zero."""
    return sum(int(p.count_nonzero()) for p in model.parameters())


def unstructured_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """name -> bool mask (True: kept): the round(sparsity x N) smallest |w| of all prunable weights
    together set False (exactly that many; weights already zero are the smallest, so they stay pruned)."""
    weights = prunable_weights(model)
    scores = torch.cat([w.detach().abs().flatten().float().cpu() for w in weights.values()])
    k = round(sparsity * scores.numel())
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        keep[torch.topk(scores, k, largest=False, sorted=False).indices] = False
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = keep[start:start + w.numel()].view_as(w).to(w.device)
        start += w.numel()
    return out


def blocks(model: nn.Module) -> dict[str, ResidualAttentionBlock]:
    """The transformer blocks structured pruning acts on (open_clip's, image and text towers, DTP's)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ResidualAttentionBlock)
            and isinstance(m.attn, nn.MultiheadAttention) and hasattr(m.mlp, "c_fc")}


def structured_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """name -> bool mask (True: kept) over each block's attention projections (weights and biases)
    and MLP: in every block round(sparsity x heads) heads (at most all but one) and
    round(sparsity x channels) MLP channels with the smallest L1 norm pruned."""
    out = {}
    for name, block in blocks(model).items():
        attn, fc, proj = block.attn, block.mlp.c_fc, block.mlp.c_proj
        heads, d = attn.num_heads, attn.embed_dim
        hd = d // heads
        w_in = attn.in_proj_weight.detach().abs().view(3, heads, hd, d)
        score = w_in.sum((0, 2, 3)) + attn.out_proj.weight.detach().abs().view(d, heads, hd).sum((0, 2))
        head_keep = _keep_largest(score, min(round(sparsity * heads), heads - 1))
        rows = head_keep[None, :, None].expand(3, heads, hd).reshape(-1)
        out[f"{name}.attn.in_proj_weight"] = rows[:, None].expand_as(attn.in_proj_weight)
        if attn.in_proj_bias is not None:
            out[f"{name}.attn.in_proj_bias"] = rows
        out[f"{name}.attn.out_proj.weight"] = head_keep[:, None].expand(heads, hd).reshape(1, d).expand_as(
            attn.out_proj.weight)
        channels = fc.out_features
        score = fc.weight.detach().abs().sum(1) + proj.weight.detach().abs().sum(0)
        channel_keep = _keep_largest(score, min(round(sparsity * channels), channels - 1))
        out[f"{name}.mlp.c_fc.weight"] = channel_keep[:, None].expand_as(fc.weight)
        if fc.bias is not None:
            out[f"{name}.mlp.c_fc.bias"] = channel_keep
        out[f"{name}.mlp.c_proj.weight"] = channel_keep[None, :].expand_as(proj.weight)
    return {k: v.contiguous() for k, v in out.items()}


def _keep_largest(score: torch.Tensor, pruned: int) -> torch.Tensor:
    keep = torch.ones_like(score, dtype=torch.bool)
    if pruned:
        keep[torch.topk(score, pruned, largest=False).indices] = False
    return keep


@torch.no_grad()
def shrunk_copy(model: nn.Module) -> nn.Module:
    """A copy of a structurally pruned model with its pruned heads and MLP channels removed: attention
    becomes ProjectedAttention with fewer heads, c_fc / c_proj fewer channels. Its outputs equal the
    masked model's (a pruned head's q, k, v and out_proj columns are zero, so it adds nothing; a pruned
    channel's pre-activation is zero and GELU(0) = 0). The model itself is left as it is."""
    out = copy.deepcopy(model)
    for block in blocks(out).values():
        attn = block.attn
        hd = attn.embed_dim // attn.num_heads
        alive = attn.in_proj_weight.view(3, attn.num_heads, hd, -1).ne(0).flatten(2).any(-1).any(0)
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        channels = fc.weight.ne(0).any(1)
        block.attn = ProjectedAttention(attn)
        block.attn.keep_heads(alive.nonzero().flatten())
        kept = channels.nonzero().flatten()
        block.mlp.c_fc = _rows(fc, kept)
        block.mlp.c_proj = _columns(proj, kept)
    project_attention(out)  # any attention outside the blocks stays as it computed
    return out


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    out = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight[index])
    if linear.bias is not None:
        out.bias.copy_(linear.bias[index])
    return out


def _columns(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    out = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    out.weight.copy_(linear.weight[:, index])
    if linear.bias is not None:
        out.bias.copy_(linear.bias)
    return out
