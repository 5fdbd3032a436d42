"""Image towers on open_clip's VisionTransformer: vanilla, and DTP-ViT (boundaries over patches in
raster or Hilbert order, models/patch_order.py), reusing open_clip's patch embedding, blocks, final
norm and projection, so its geometry comes from `encoder`. The peer baselines have rooms of their
own: models/tome.py, patch_dropout.py, evit.py; eval.placement_control's passes, models/placement.py."""
from typing import Callable

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from fastclip.errors import InputError
from fastclip.models.boundaries import EntropySpike, every_kth, spikes
from fastclip.models.budget import drop_beyond_budget, segments_per_image
from fastclip.models.dtp import (BoundaryPredictor, check_finite, downsample, finite_flag, mean_of_valid,
                                 padding_attn_mask, segment_counts)
from fastclip.models.outputs import TowerOutput
from fastclip.models.packed import PackedRows, check_packable, packed_block
from fastclip.models.patch_order import patch_order
from fastclip.schema.fields import choice
from fastclip.schema.model import IMAGE_LAYOUTS, IMAGE_POOLS, IMAGE_STARTS


def _heads(vit: VisionTransformer) -> int:
    return vit.transformer.resblocks[0].attn.num_heads


def require_vit(visual, what: str) -> VisionTransformer:
    if not isinstance(visual, VisionTransformer):
        raise InputError(f"{what} needs a ViT image tower; this encoder's image tower is {type(visual).__name__} "
                         f"(set boundary.apply_to=[text] to keep it vanilla)")
    return visual


class VanillaImageTower(nn.Module):
    """open_clip's tower as is (ViT or ModifiedResNet)."""
    full_tokens = False  # nothing to turn off: it always runs on every token

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, images) -> TowerOutput:
        grid = getattr(self.visual, "grid_size", None)  # ModifiedResNet has no tokens: reported as 0
        n = torch.full((images.shape[0],), float(grid[0] * grid[1] if grid else 0), device=images.device)
        return TowerOutput(self.visual(images), tokens=n, segments=n)


class DTPImageTower(nn.Module):
    """pre-layers on all patches -> boundary predictor over the patches in reading order (raster or
    Hilbert: image_order) -> segment means (padding mask) -> shortened layers on [class token,
    segments] -> pooled embedding. Boundaries, logits and the stride grid are in reading order."""

    def __init__(self, visual, method, pre_layers: int, pool: str = "cls", next_patch_dim: int | None = None,
                 buckets: int | str = "auto", layout: str = "packed", row_breaks: bool = False,
                 start: str = "prior", order: str = "raster", token_budget: float | int | None = None,
                 shift_start: bool = False):
        super().__init__()
        if not (buckets == "auto" or (isinstance(buckets, int) and buckets >= 1)):
            raise InputError(f"boundary.image_buckets={buckets!r}: expected auto or an integer >= 1")
        choice("boundary.image_layout", layout, IMAGE_LAYOUTS)
        if layout == "packed" and buckets not in ("auto", 1):
            raise InputError(f"boundary.image_buckets={buckets} applies to boundary.image_layout=padded only: "
                             f"packed rows have no padding to bucket")
        self.buckets, self.layout = buckets, layout
        self.vit = require_vit(visual, f"boundary={method.name} on the image tower")
        n_layers = len(self.vit.transformer.resblocks)
        if not 0 < pre_layers < n_layers:
            raise InputError(f"boundary.image_pre_layers={pre_layers}: expected 1 .. {n_layers - 1} for a {n_layers}-layer ViT")
        if layout != "padded":
            for block in self.vit.transformer.resblocks[pre_layers:]:
                check_packable(block)
        n_patches = self.vit.grid_size[0] * self.vit.grid_size[1]
        self.budget = None if token_budget is None else segments_per_image(token_budget, n_patches)
        # fixed's count is known in advance (random_offset: within one), whatever the module's mode now
        if self.budget is not None and (layout == "padded" or method.name == "fixed"
                                        or method.static_segments(n_patches) is not None):
            raise InputError(f"boundary.image_token_budget={token_budget} sizes the packed layout of learned "
                             f"boundaries; boundary={method.name} with boundary.image_layout={layout} has no use for it")
        self.packed_block = packed_block  # trainer.compile swaps in a compiled copy (runtime.compile_blocks)
        if row_breaks and method.name != "gumbel":
            raise InputError(f"boundary.image_row_breaks=true needs learned boundaries (boundary=gumbel), "
                             f"not boundary={method.name}")
        self.row_breaks = row_breaks
        # Position embeddings are added before the pre-layers, so reading the patches in another
        # order changes only which patches can share a segment (None: raster, the identity).
        scan = patch_order(order, *self.vit.grid_size)
        if row_breaks and scan is not None:
            raise InputError(f"boundary.image_row_breaks=true forces breaks at raster row ends; with "
                             f"boundary.image_order={order} runs never wrap across rows (set one of the two)")
        self.register_buffer("scan", scan, persistent=False)
        choice("boundary.image_start", start, IMAGE_STARTS)  # the schema checks configs; this, direct callers
        choice("boundary.image_pool", pool, IMAGE_POOLS)
        self.method, self.pre_layers, self.pool = method, pre_layers, pool
        width = self.vit.conv1.out_channels
        self.predictor = BoundaryPredictor(width, init_rate=method.init_rate, hidden_ratio=method.predictor_ratio) if method.needs_predictor else None
        # image_start=stride: fixed k's stride (k = round(1/prior)), where the per-position logits start
        self.stride_k = self._stride(method) if start == "stride" else None
        self.position_logits = self._stride_start(method, self.stride_k) if self.stride_k else None
        if shift_start and self.position_logits is None:
            raise InputError("boundary.random_offset shifts the stride start: it needs boundary.image_start=stride")
        self.shift_start = shift_start
        # eval.placement_control's hook on the logits (RecordedPlacement / BorrowedPlacement), else None
        self.placement: Callable[[torch.Tensor], torch.Tensor] | None = None
        # entropy_spike's image analog: spikes of an auxiliary next-patch predictor's error
        self.next_patch = nn.Linear(width, next_patch_dim) if isinstance(method, EntropySpike) else None

    full_tokens = False  # trainer.full_token_steps' phase: every patch its own token (FastCLIP.set_full_tokens)

    def forward(self, images) -> TowerOutput:
        """images [B, 3, H, W] -> TowerOutput with boundaries and boundary_logits over the N patches in
        reading order (scan: that order, when not raster); boundary_targets and auxiliary_loss from the
        next-patch head (entropy_spike). full_tokens: every block on every patch (no predictor, no
        pooling: the vanilla tower's cost, its weights), tokens = segments = N, no boundaries."""
        vit = self.vit
        if self.full_tokens:
            return self._full_tokens(images)
        x = vit._embeds(images)
        blocks = vit.transformer.resblocks
        for block in blocks[:self.pre_layers]:
            x = block(x)
        cls, patches = x[:, :1], x[:, 1:]
        if self.scan is not None:
            patches = patches[:, self.scan]
        B, N, _ = patches.shape
        logits = self.predictor(patches) if self.predictor is not None else None
        if self.position_logits is not None:
            logits = logits + self._positions(B, N, images.device)
        if self.placement is not None:
            logits = self.placement(logits)
        if self.row_breaks:
            logits = self._break_at_row_ends(logits)
        order = torch.arange(N, device=images.device).expand(B, N)
        b = self.method.boundaries(logits, order)
        counts = segment_counts(b)
        dropped = None
        if self.budget is not None:  # static shapes: no host read (models/budget.py)
            kept_b, counts, dropped = drop_beyond_budget(b, self.budget)
            emb = self._shortened_in_budget(cls, patches, kept_b, counts)
        elif self.layout_on(images.device) == "packed" and self.method.static_segments(N) is None:
            emb = self._shortened_packed(cls, patches, b, counts, logits)
        else:
            emb = self._shortened_padded(cls, patches, b, counts, logits)
        if vit.proj is not None:
            emb = emb @ vit.proj
        targets = auxiliary_loss = None
        if self.next_patch is not None and self.training:  # a training objective: evaluation pools without it
            targets, auxiliary_loss = self._next_patch_spikes(patches, images)
        return TowerOutput(emb, tokens=torch.full((B,), float(N), device=images.device), segments=counts.float(),
                           boundaries=b, boundary_logits=logits, boundary_targets=targets,
                           auxiliary_loss=auxiliary_loss, scan=self.scan, dropped=dropped)

    def _full_tokens(self, images) -> TowerOutput:
        vit = self.vit
        x = vit.ln_post(vit.transformer(vit._embeds(images)))
        emb = x[:, 0] if self.pool == "cls" else x[:, 1:].mean(1)  # mean: every patch its own segment
        if vit.proj is not None:
            emb = emb @ vit.proj
        n = torch.full((images.shape[0],), float(x.shape[1] - 1), device=images.device)
        return TowerOutput(emb, tokens=n, segments=n)

    # A logit no logistic noise overturns (p(noise < -30) ~ 1e-13): a sure boundary, which the prior
    # counts like any other, and no gradient (masked_fill), as the predictor has nothing to decide there.
    SURE_LOGIT = 30.0

    def _break_at_row_ends(self, logits):
        """image_row_breaks: the last patch of every patch-grid row closes its segment, so no segment
        joins the right end of one row to the left end of the next (raster order wraps there).
        Forced through the logits, so every eval rule (threshold, expected_count) keeps them too."""
        width = self.vit.grid_size[1]
        return logits.masked_fill(every_kth(logits.shape[1], width, logits.device), self.SURE_LOGIT)

    # image_start=stride: the probability a stride patch starts as a boundary (the others start low
    # enough that the mean rate is the prior). High, but not saturated: the relaxed Bernoulli's
    # straight-through gradient vanishes as |logit| grows, and then nothing could move.
    STRIDE_START_P = 0.9

    @staticmethod
    def _stride(method) -> int:
        """image_start=stride's k = round(1/prior): learned boundaries (gumbel) only, k >= 2."""
        if method.name != "gumbel":
            raise InputError(f"boundary.image_start=stride starts learned boundaries (boundary=gumbel) at fixed "
                             f"k's; boundary={method.name} has none to start")
        k = round(1 / method.prior)
        if k < 2:
            raise InputError(f"boundary.image_start=stride needs boundary.prior <= 0.5 (a stride k = round(1/prior) "
                             f">= 2); got prior={method.prior}")
        return k

    def _stride_start(self, method, k: int) -> nn.Parameter:
        """A learned logit per patch position, added to the predictor's, that starts the boundaries
        at fixed k's (every k-th patch in reading order) at the prior's rate; the predictor's own bias
        starts at 0. Training begins from the fixed segmentation and moves a boundary where the task
        pays for it."""
        n = self.vit.grid_size[0] * self.vit.grid_size[1]
        on = every_kth(n, k)
        share, hi = on.float().mean().item(), self.STRIDE_START_P
        lo = (method.prior - hi * share) / (1 - share)
        lo = min(max(lo, 1e-3), 0.5)  # a grid whose stride share exceeds the prior: others near 0
        nn.init.zeros_(self.predictor.mlp[-1].bias)
        return nn.Parameter(torch.where(on, torch.logit(torch.tensor(hi)), torch.logit(torch.tensor(lo))))

    def _positions(self, b: int, n: int, device) -> torch.Tensor:
        """The stride start's logits, [N] (broadcast over rows); with boundary.random_offset in training
        [B, N]: each row's shifted by its own offset 0..k-1, drawn every forward (torch's generator), so
        the stride boundaries fall where fixed's random_offset puts its grid (a boundary at t where
        (t + 1 + offset) % k == 0; the last k - 1 positions take the first ones' logits)."""
        if not (self.shift_start and self.training):
            return self.position_logits
        offset = torch.randint(self.stride_k, (b, 1), device=device)
        return self.position_logits[(torch.arange(n, device=device) + offset) % n]

    def _shortened_packed(self, cls, patches, b, counts, logits):
        """Shortened blocks on every row's [class token, segments] laid end to end (models/packed.py).
        ONE sync fetches the longest row and the total, which size the tensors (each sync drains
        the GPU queue), and whether the logits are finite (NonFiniteBoundaries before a diverged
        predictor's garbage counts size anything)."""
        longest, total, finite = torch.stack([counts.max(), counts.sum(), finite_flag(logits, counts)]).tolist()
        check_finite(finite, "DTP image tower")
        pooled, seg_mask = downsample(patches, b, n_segments=longest, grad=self.method.pooling_grad)
        rows = PackedRows.from_lengths(counts + 1, 1 + longest, total + counts.shape[0])
        x = rows.pack(torch.cat([cls, pooled], dim=1))
        for block in self.vit.transformer.resblocks[self.pre_layers:]:
            x = self.packed_block(block, x, rows)
        x = self.vit.ln_post(x)
        if self.pool == "cls":
            return x[rows.starts]
        return mean_of_valid(rows.unpack(x)[:, 1:], seg_mask)  # the class token left out

    def _shortened_in_budget(self, cls, patches, b, kept):
        """_shortened_packed at the budget's fixed size, B x (1 + budget) packed rows: every shape
        static, nothing read back (non-finite logits surface as a non-finite loss, loop/divergence.py)."""
        B, N, _ = patches.shape
        pooled, seg_mask = downsample(patches, b, n_segments=N, grad=self.method.pooling_grad)
        rows = PackedRows.from_lengths(kept + 1, 1 + N, None, size=B * (1 + self.budget))
        x = rows.pack(torch.cat([cls, pooled], dim=1))
        for block in self.vit.transformer.resblocks[self.pre_layers:]:
            x = self.packed_block(block, x, rows)
        x = self.vit.ln_post(x)
        return x[rows.starts] if self.pool == "cls" else mean_of_valid(rows.unpack(x)[:, 1:], seg_mask)

    # image_layout=auto: padded on CUDA, where it measured faster (docs/results/benchmarks.md, bench-gpu's
    # ViT-B/16 rows, measured before the packed maps lost their shared zero row and before packed
    # attention went through varlen_attn on CUDA: both to be measured again on a GPU);
    # packed on CPU, where compute bounds the step and packing saves the padding's FLOPs.
    AUTO_LAYOUT = {"cuda": "padded", "cpu": "packed"}

    def layout_on(self, device: torch.device) -> str:
        """The layout the shortened blocks run in on this device (image_layout, auto resolved)."""
        return self.AUTO_LAYOUT.get(device.type, "packed") if self.layout == "auto" else self.layout

    def _shortened_padded(self, cls, patches, b, counts, logits):
        """Shortened blocks on [class token, segments] padded to the longest row, in one batch or
        in segment-count buckets (image_buckets)."""
        groups, n_seg, by_count = self._buckets(counts, patches.shape[1], logits)
        pooled, seg_mask = downsample(patches, b, n_segments=n_seg, grad=self.method.pooling_grad)
        seq = torch.cat([cls, pooled], dim=1)
        if by_count is None:
            _, n, padded = groups[0]
            emb = self._shortened(seq, seg_mask, padded)
        else:
            parts = [self._shortened(seq[rows, :1 + n], seg_mask[rows, :n], padded) for rows, n, padded in groups]
            emb = torch.cat(parts)[by_count.argsort()]  # the groups partition by_count in order: back to batch order
        return emb

    def _buckets(self, counts: torch.Tensor, n_patches: int, logits: torch.Tensor | None):
        """-> ([(rows, segments, padded)], longest, rows sorted by count or None for one group).
        The pooled length must be known on the host:
        a fixed rule knows it in advance (no sync); otherwise ONE sync fetches the sorted counts
        and whether the logits are finite (each sync drains the GPU queue). With image_buckets > 1
        the rows, sorted by segment count, are cut into that many equal groups, each padded only to
        its own longest row:
        sampled counts spread (Binomial), and padding every row to the batch's longest wastes
        shortened-layer work. Rows never interact, so this changes no result. auto: by device."""
        n_seg = self.method.static_segments(n_patches)
        if n_seg is not None:
            return [(None, n_seg, False)], n_seg, None
        sorted_counts, by_count = counts.sort()
        *host, finite = torch.cat([sorted_counts, finite_flag(logits, counts)[None]]).tolist()
        check_finite(finite, "DTP image tower")
        B, k = len(host), min(self._bucket_count(counts.device), len(host))
        if k == 1:
            return [(None, host[-1], host[0] != host[-1])], host[-1], None
        cuts = [round(i * B / k) for i in range(k + 1)]
        return [(by_count[lo:hi], host[hi - 1], host[lo] != host[hi - 1])
                for lo, hi in zip(cuts, cuts[1:]) if hi > lo], host[-1], by_count

    # image_buckets=auto: on CUDA each bucket's small kernels cost more host time to launch than the
    # GPU spends on the padding they save, so one padded batch wins; on CPU (compute-bound) the padding
    # saved wins. The measurements (bench-gpu, bench-step) are in docs/results/benchmarks.md.
    AUTO_BUCKETS = {"cuda": 1, "cpu": 4}

    def _bucket_count(self, device: torch.device) -> int:
        return self.AUTO_BUCKETS.get(device.type, 1) if self.buckets == "auto" else self.buckets

    def _shortened(self, seq, seg_mask, padded: bool):
        """Shortened blocks on [class token, segments] -> pooled embedding (before the projection).
        No padded segment: no mask, so the blocks keep the fused (flash) attention path."""
        vit = self.vit
        if padded:
            valid = torch.cat([torch.ones_like(seg_mask[:, :1]), seg_mask], dim=1)
            mask = padding_attn_mask(valid, _heads(vit)).to(seq.dtype)
        else:
            mask = None
        for block in vit.transformer.resblocks[self.pre_layers:]:
            seq = block(seq, attn_mask=mask)
        seq = vit.ln_post(seq)
        return seq[:, 0] if self.pool == "cls" else mean_of_valid(seq[:, 1:], seg_mask)  # the class token left out

    def _next_patch_spikes(self, patches, images):
        """Predict patch t+1's pixels from patch t's features; boundary targets where that error
        spikes above the previous `window` errors (the image analog of next-token entropy)."""
        p = self.vit.conv1.kernel_size[0]
        pixels = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)  # [B, N, 3 p p], raster order
        if self.scan is not None:
            pixels = pixels[:, self.scan]  # the next patch in reading order
        pred = self.next_patch(patches[:, :-1])
        err = (pred.float() - pixels[:, 1:].float()).pow(2).mean(-1)     # [B, N-1]
        err = F.pad(err, (0, 1), value=0.0)                              # last patch has no next
        with torch.no_grad():
            spike = spikes(err, self.method.window)
            spike[:, :self.method.window] = False  # patches need a full window of history here
            spike[:, -1] = False                   # the last patch has no next-patch error
        return spike.float(), err[:, :-1].mean()
