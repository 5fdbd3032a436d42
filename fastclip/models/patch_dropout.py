"""FLIP's random patch dropout (Li et al. 2023, "Scaling Language-Image Pre-training via Masking"):
in training each image keeps a random `keep` fraction of its patches (the class token always) and
the whole ViT runs on them; evaluation sees every patch, or with eval_keep=true the same random
fraction, so that its GFLOPs match training's. The dropping is open_clip's PatchDropout (the module
open_clip's `patch_dropout` option installs after the positional embedding)."""
import contextlib

import torch
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


class PatchDropoutImageTower(nn.Module):
    """open_clip's ViT with its patch_dropout set to drop 1 - keep of the patches."""

    def __init__(self, visual, keep: float, eval_keep: bool = False):
        super().__init__()
        if not 0 < keep <= 1:
            raise InputError(f"boundary.keep={keep}: expected the fraction of patches kept, in (0, 1]")
        self.vit = require_vit(visual, "boundary=patch_dropout")
        self.keep, self.eval_keep = keep, eval_keep
        self.vit.patch_dropout = (_EvalToo if eval_keep else PatchDropout)(1.0 - keep) if keep < 1 else nn.Identity()

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
        return self.eval_keep and self.keep < 1

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

