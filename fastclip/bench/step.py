"""make bench-step: where a training step's time goes, with the data already in memory (no
loader in the timing). Per variant of bench-clip's CIFAR geometry (vit_tiny at patch 4, 64
patches, 4 blocks, BPE text tower, batch 128): the whole step (forward, backward, AdamW), the
image tower alone (forward + backward) and the text tower alone (AdamW as the loop
builds it: trainer.optimizer_impl); variants alternate within each
repeat and the table gives medians. The text tower and the optimizer do not shrink with image
compression, so `floor` = (step - image tower) / vanilla step is the step ratio that even a free
image tower could not beat.

    python -m fastclip.bench.step [--repeats 5] [--iters 5] [--batch 128]
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
from open_clip import ClipLoss

from fastclip.bench.clip import GEOMETRY, tome_r_for
from fastclip import PROJECT_ROOT
from fastclip.bench.common import emit, markdown_table
from fastclip.config import compose_train_config
from fastclip.eval.efficiency import count_gflops
from fastclip.optim import adamw_impl
from fastclip.models.clip import boundary_loss, build_clip, clip_objective

DTP = ["boundary.apply_to=[image]"]
PAPER_GUMBEL = ["boundary=gumbel", "boundary.prior=0.25", "boundary.predictor_ratio=4"] + DTP  # the paper's predictor
VARIANTS = [("vanilla ViT", ["boundary=none"]),
            ("DTP-ViT gumbel 0.25, predictor d->4d->1", PAPER_GUMBEL),
            ("DTP-ViT fixed k=4", ["boundary=fixed", "boundary.k=4"] + DTP),
            ("DTP-ViT gumbel 0.25, predictor d->d->1", ["boundary=gumbel", "boundary.prior=0.25",
                                                        "boundary.predictor_ratio=1"] + DTP),
            ("DTP-ViT gumbel 0.25, d->4d->1, padded, 4 buckets", PAPER_GUMBEL + ["boundary.image_layout=padded",
                                                                                 "boundary.image_buckets=4"]),
            ("DTP-ViT gumbel 0.25, d->4d->1, padded, one batch", PAPER_GUMBEL + ["boundary.image_layout=padded",
                                                                                 "boundary.image_buckets=1"])]


class Variant:
    def __init__(self, name, overrides, batch):
        cfg = compose_train_config(GEOMETRY + overrides)
        torch.manual_seed(0)
        self.name = name
        self.model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **adamw_impl(cfg.trainer.optimizer_impl))
        self.criterion = ClipLoss()
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, 32, 32, generator=gen)
        self.tokens = tokenizer([f"a photo of a thing number {i % 10}" for i in range(batch)])
        self.times = {"step": [], "image": [], "text": []}

    def step(self):
        loss, _ = clip_objective(self.model, self.criterion, self.model(self.images, self.tokens))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def image_tower(self):
        image = self.model.visual(self.images)
        loss = image.embedding.square().mean()
        aux = boundary_loss(self.model.image_method, image)
        (loss if aux is None else loss + aux).backward()

    def text_tower(self):
        self.model.text(self.tokens).embedding.square().mean().backward()

    def time(self, iters: int):
        for part, fn in (("step", self.step), ("image", self.image_tower), ("text", self.text_tower)):
            fn()  # warm-up
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            self.times[part].append((time.perf_counter() - t0) / iters)
        self.model.zero_grad(set_to_none=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench" / "step.md"))
    args = ap.parse_args(argv)
    variants = [Variant(name, overrides, args.batch) for name, overrides in VARIANTS]
    variants[1].model.eval()
    gumbel_gflops, _ = count_gflops(variants[1].model.visual, variants[1].images[:16])
    variants[1].model.train()
    r = tome_r_for(gumbel_gflops)
    variants.append(Variant(f"ToMe r={r}", ["boundary=tome", f"boundary.r={r}"], args.batch))
    for _ in range(args.repeats):
        for v in variants:
            v.time(args.iters)
    rows = []
    for v in variants:
        row = {"variant": v.name, **{f"{k}_s": statistics.median(t) for k, t in v.times.items()}}
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["step_ratio"] = row["step_s"] / base["step_s"]
        row["image_ratio"] = row["image_s"] / base["image_s"]
        row["floor"] = max(0.0, row["step_s"] - row["image_s"]) / base["step_s"]
    header = (f"batch {args.batch}, {torch.get_num_threads()} torch threads, median of {args.repeats} alternated "
              f"repeats of {args.iters} iterations")
    emit(header + "\n\n" + markdown_table(rows, [("variant", "variant", "s"), ("step (s)", "step_s", ".4f"),
                                ("step / vanilla", "step_ratio", ".2f"), ("image tower fwd+bwd (s)", "image_s", ".4f"),
                                ("image / vanilla", "image_ratio", ".2f"), ("text tower fwd+bwd (s)", "text_s", ".4f"),
                                ("floor: (step - image) / vanilla step", "floor", ".2f")]), Path(args.out))


if __name__ == "__main__":
    main()
