"""CLIPA's token reduction (Li et al. 2023, "An Inverse Scaling Law for CLIP Training"): the image tower
reads each image at a lower resolution, `boundary.scale` x its side (rounded to whole patches), so
it runs on (scale x grid)^2 patches; the position embeddings are bilinearly interpolated to the
smaller grid, the class token's kept. In a full-token phase (trainer.full_token_steps, CLIPA's
fine-tune) it reads the full resolution again. Written here: open_clip resizes its position
embeddings only when loading a checkpoint, not per forward."""
import torch
import torch.nn.functional as F
from torch import nn

from fastclip.errors import InputError
from fastclip.models.outputs import TowerOutput
from fastclip.models.vision import require_vit
from fastclip.models.vit_block import encode, full_token_forward


class LowResImageTower(nn.Module):
    """open_clip's ViT on images resized to `scale` of their side (a whole number of patches)."""

    full_tokens = False  # trainer.full_token_steps' phase: the full resolution (FastCLIP.set_full_tokens)

    def __init__(self, visual, scale: float):
        super().__init__()
        self.vit = require_vit(visual, "boundary=lowres")
        grid = self.vit.grid_size
        self.grid = tuple(max(1, round(g * scale)) for g in grid)
        if not 0 < scale <= 1 or self.grid[0] > grid[0]:
            raise InputError(f"boundary.scale={scale}: expected a share of the image side in (0, 1]")
        self.scale = scale

    def forward(self, images) -> TowerOutput:
        """images [B, 3, H, W] -> TowerOutput: tokens = the full grid's patches, segments = the patches
        the blocks ran on at the lower resolution."""
        vit = self.vit
        n_full = vit.grid_size[0] * vit.grid_size[1]
        if self.full_tokens:
            return full_token_forward(vit, images)
        patch = vit.conv1.kernel_size
        size = (self.grid[0] * patch[0], self.grid[1] * patch[1])
        small = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = vit.conv1(small).flatten(2).transpose(1, 2)  # [B, grid, width]
        cls = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions().to(x.dtype)
        x = vit.ln_pre(vit.patch_dropout(x))
        for block in vit.transformer.resblocks:
            x = block(x)
        out = encode(vit, x, images, n_full)
        return out

    def positions(self) -> torch.Tensor:
        """[1 + h x w, width]: the class token's position embedding, then the patch grid's resized
        (bilinear, as CLIPA and open_clip's resize_pos_embed do) to the lower resolution's grid."""
        pos = self.vit.positional_embedding
        h, w = self.vit.grid_size
        grid = pos[1:].reshape(1, h, w, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=self.grid, mode="bilinear", align_corners=False)
        return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])])
