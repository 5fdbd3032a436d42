"""FLIP's random patch dropout (Li et al. 2023, "Scaling Language-Image Pre-training via Masking"):
in training each image keeps a random `keep` fraction of its patches (the class token always) and
the whole ViT runs on them; evaluation sees every patch, or with eval_keep=true the same random
fraction, so that its GFLOPs match training's. The dropping is open_clip's PatchDropout (the module
open_clip's `patch_dropout` option installs after the positional embedding).

mask_only=true is the control that separates what FLIP's dropout does as an augmentation from what it
saves: the same random patches lose their content (their tokens keep the positional embedding alone,
as if those pixels were zero after normalisation: open_clip's patch embedding has no bias), but every
token still runs through every block, so the model costs vanilla's FLOPs. Written here: open_clip has
no such mode."""
import contextlib

import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout
from torch import nn

from fastclip.errors import InputError
from fastclip.models.outputs import TowerOutput
from fastclip.models.vision import require_vit


class _EvalToo(PatchDropout):
    """open_clip's PatchDropout, acting in eval mode as well (it checks self.training)."""

    def forward(self, x):
        was_training = self.training
        self.training = True
        try:
            return super().forward(x)
        finally:
            self.training = was_training


def mask_patches(images: torch.Tensor, grid: tuple[int, int], patch: tuple[int, int], keep: float) -> torch.Tensor:
    """images [B, 3, H, W] (normalised) with a random 1 - keep of each image's patches ([gh, gw] grid
    cells of [ph, pw] pixels) set to zero: their tokens are then the positional embedding alone
    (open_clip's patch embedding has no bias). The draw is open_clip PatchDropout's, on the CPU
    generator as it draws: as many patches keep their content as it keeps (max(1, int(N x (1 - (1 -
    keep))))), so from the same generator state it blanks the very patches the dropout drops. Pixels beyond the grid
    (which the patch embedding crops) are left as they are."""
    B, (gh, gw), (ph, pw) = images.shape[0], grid, patch
    n = gh * gw
    order = torch.randn(B, n).topk(max(1, int(n * (1 - (1 - keep)))), dim=-1).indices.to(images.device)
    cells = torch.zeros(B, n, device=images.device, dtype=images.dtype).scatter_(1, order, 1.0)
    pixels = cells.view(B, 1, gh, 1, gw, 1).expand(B, 1, gh, ph, gw, pw).reshape(B, 1, gh * ph, gw * pw)
    return images * F.pad(pixels, (0, images.shape[-1] - gw * pw, 0, images.shape[-2] - gh * ph), value=1.0)


class PatchDropoutImageTower(nn.Module):
    """open_clip's ViT with its patch_dropout set to drop 1 - keep of the patches (mask_only: their
    content blanked and their tokens kept, mask_patches)."""

    def __init__(self, visual, keep: float, eval_keep: bool = False, mask_only: bool = False):
        super().__init__()
        if not 0 < keep <= 1:
            raise InputError(f"boundary.keep={keep}: expected the fraction of patches kept, in (0, 1]")
        self.vit = require_vit(visual, "boundary=patch_dropout")
        self.keep, self.eval_keep, self.mask_only = keep, eval_keep, mask_only
        if keep == 1 or mask_only:  # mask_only: every token runs, the masking is on the pixels (_forward)
            self.vit.patch_dropout = nn.Identity()
        else:
            self.vit.patch_dropout = (_EvalToo if eval_keep else PatchDropout)(1.0 - keep)

    full_tokens = False  # trainer.full_token_steps' phase: every patch, in training too (FastCLIP.set_full_tokens)

    def forward(self, images) -> TowerOutput:
        if self.full_tokens:
            with self.all_patches():
                return self._forward(images)
        return self._forward(images)

    def _forward(self, images) -> TowerOutput:
        """images [B, 3, H, W] -> TowerOutput: tokens = the patches in, segments = the
        patches the blocks ran on, read off the dropout module's output (so the logged compression is
        the count open_clip drew, whatever rounding its keep fraction takes: it keeps
        int(n x (1 - (1 - keep))), which is not always int(n x keep))."""
        grid = self.vit.grid_size
        n = grid[0] * grid[1]
        if self.mask_only and self.keep < 1 and (self.training or self.eval_keep) and not self.full_tokens:
            images = mask_patches(images, grid, self.vit.conv1.stride, self.keep)
        ran = {}
        hook = self.vit.patch_dropout.register_forward_hook(lambda m, a, out: ran.update(patches=out.shape[1] - 1))
        try:
            emb = self.vit(images)
        finally:
            hook.remove()
        B = images.shape[0]
        return TowerOutput(emb, tokens=torch.full((B,), float(n), device=emb.device),
                           segments=torch.full((B,), float(ran["patches"]), device=emb.device))

    @contextlib.contextmanager
    def all_patches(self):
        """Inside, the tower runs on every patch, in evaluation and training alike: the eval_keep
        run's own weights read at full cost, its `zeroshot/top1_all_patches`."""
        saved = self.vit.patch_dropout, self.eval_keep
        self.vit.patch_dropout, self.eval_keep = nn.Identity(), False
        try:
            yield self
        finally:
            self.vit.patch_dropout, self.eval_keep = saved

    @property
    def drops_at_eval(self) -> bool:
        """Whether evaluation runs on fewer patches (only then is there a boundary picture)."""
        return self.eval_keep and self.keep < 1 and not self.mask_only

    @torch.no_grad()
    def kept_patches(self, images) -> torch.Tensor:
        """[B, N] bool, raster order: the patches one forward runs on, a fresh random draw (the boundary
        picture's kept vs dropped). open_clip's PatchDropout does not expose its draw, so the rows it
        returns are matched to its input's on their first features (it copies rows; the positional
        embedding makes each distinct), which keeps the comparison [B, N, kept, 8]."""
        seen = {}

        def record(module, inputs, output):
            seen["in"], seen["out"] = inputs[0][:, 1:, :8], output[:, 1:, :8]
        handle = self.vit.patch_dropout.register_forward_hook(record)
        try:
            self(images)
        finally:
            handle.remove()
        return (seen["in"][:, :, None] == seen["out"][:, None]).all(-1).any(-1)

