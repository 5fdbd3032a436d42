"""EViT (Liang et al. 2022, "Not All Patches are What You Need"): at the given blocks, between
attention and MLP, the patch tokens the class token attends to most (its attention averaged over
heads) are kept, the top `keep` fraction, and the rest are fused into one token, their sum
weighted by that attention (not divided by its total: the published code's `extra_token`, Block.forward
in github.com/youweiliang/evit, evit.py); the fused token is a token like the others in later blocks."""
import math

import torch
from torch import nn

from fastclip.errors import InputError
from fastclip.models.outputs import TowerOutput
from fastclip.models.vision import require_vit
from fastclip.models.vit_block import attention_half, check_block, encode, full_token_forward, mlp_half


def keep_attentive(x: torch.Tensor, cls_attention: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, 1 + N, D] (class token first), cls_attention [B, 1 + N] (the class token's attention,
    mean over heads) -> ([B, 1 + k + 1, D]: the class token, the k = ceil(keep x N) patches it attends
    to most (in their original order), and the fused token: sum over the others of their attention x
    token, as published (the attention is a softmax over all 1 + N tokens, so the fused token is
    smaller the less the class token attends to what it fuses); [B, N] bool: the patches kept)."""
    cls, tokens = x[:, :1], x[:, 1:]
    n = tokens.shape[1]
    k = math.ceil(keep * n)
    if k >= n:
        return x, torch.ones(x.shape[0], n, dtype=torch.bool, device=x.device)
    score = cls_attention[:, 1:]
    top = score.topk(k, dim=-1).indices.sort(dim=-1).values
    kept = tokens.gather(1, top[..., None].expand(-1, -1, tokens.shape[-1]))
    rest = torch.ones_like(score, dtype=torch.bool).scatter(1, top, False)
    weight = (score * rest).to(tokens.dtype)
    fused = (weight[..., None] * tokens).sum(1, keepdim=True)
    return torch.cat([cls, kept, fused], dim=1), ~rest


class EViTImageTower(nn.Module):
    """open_clip's ViT with EViT's keep-and-fuse at `layers` (block indices)."""

    def __init__(self, visual, keep: float, layers):
        super().__init__()
        if not 0 < keep < 1:
            raise InputError(f"boundary.keep={keep}: expected the fraction of patch tokens kept, in (0, 1)")
        self.vit = require_vit(visual, "boundary=evit")
        n_blocks = len(self.vit.transformer.resblocks)
        self.layers = sorted(set(int(i) for i in layers))
        if not self.layers or not all(0 <= i < n_blocks for i in self.layers):
            raise InputError(f"boundary.layers={list(layers)}: expected block indices in 0 .. {n_blocks - 1}")
        for i in self.layers:
            check_block(self.vit.transformer.resblocks[i], "boundary=evit")
        self.keep = keep

    full_tokens = False  # trainer.full_token_steps' phase: keep 1, nothing fused (FastCLIP.set_full_tokens)

    def forward(self, images, record: dict | None = None) -> TowerOutput:
        if self.full_tokens and record is None:
            return full_token_forward(self.vit, images)
        vit = self.vit
        x = vit._embeds(images)
        n_in = x.shape[1] - 1
        for i, block in enumerate(vit.transformer.resblocks):
            if i in self.layers:
                x, _, cls = attention_half(block, x, cls_attention=True)
                x, kept = keep_attentive(x, cls.mean(1), self.keep)
                if record is not None and i == self.layers[0]:  # the first reduction sees the raster patches
                    record["kept"] = kept
                x = mlp_half(block, x)
            else:
                x = block(x)
        return encode(vit, x, images, n_in)

    drops_at_eval = True  # a boundary picture at every evaluation

    @torch.no_grad()
    def kept_patches(self, images) -> torch.Tensor:
        """[B, N] bool, raster order: the patches the first EViT block keeps (the boundary picture's
        kept vs fused)."""
        record = {}
        self(images, record)
        return record["kept"]
