"""make bench-gpu: one short script for a single GPU (under 5 minutes on an H100). CLIP training
steps of ViT-B/16 (open_clip geometry, BPE text tower) at batch 256 on synthetic images:
vanilla vs DTP-ViT gumbel 0.25 vs DTP-ViT fixed k=4 (2 blocks at full length, 10 on segments).
Prints step time, images/s, image GFLOPs (FlopCounterMode, real boundaries) and peak memory.

    python -m fastclip.bench.gpu [--batch 256] [--steps 30] [--warmup 10]
"""
import argparse
import statistics
import time

import torch
from open_clip import ClipLoss

from fastclip.config import compose_train_config
from fastclip.eval.efficiency import count_gflops
from fastclip.models.clip import boundary_loss, build_clip

VARIANTS = [("vanilla ViT-B/16", ["boundary=none"]),
            ("DTP gumbel 0.25", ["boundary=gumbel", "boundary.prior=0.25", "boundary.apply_to=[image]",
                                 "boundary.image_pre_layers=2"]),
            ("DTP fixed k=4", ["boundary=fixed", "boundary.k=4", "boundary.apply_to=[image]",
                               "boundary.image_pre_layers=2"])]


def bench_variant(overrides, batch, steps, warmup, device):
    cfg = compose_train_config(["encoder=vit_b16"] + overrides)
    torch.manual_seed(0)
    model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = ClipLoss()
    images = torch.randn(batch, 3, 224, 224, device=device)
    texts = tokenizer([f"a synthetic photo number {i}" for i in range(batch)]).to(device)
    times = []
    torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images, texts)
            loss = criterion(out["image_features"], out["text_features"], out["logit_scale"])
            aux = boundary_loss(model.image_method, out["image_info"])
            if aux is not None:
                loss = loss + model.image_method.loss_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    model.eval()
    gflops, (_, info) = count_gflops(model.visual, images[:16])
    compression = float(info["tokens"].sum() / info["segments"].sum())
    step = statistics.median(times)
    return {"step_s": step, "images_s": batch / step, "image_gflops": gflops, "peak_gib": peak,
            "compression": compression}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench-gpu needs a CUDA device")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, batch {args.batch}, "
          f"median of {args.steps} steps after {args.warmup} warm-up, bf16 autocast")
    rows = []
    for name, overrides in VARIANTS:
        r = bench_variant(overrides, args.batch, args.steps, args.warmup, device)
        rows.append((name, r))
        print(f"{name}: {r}", flush=True)
    base = rows[0][1]
    print("\n| variant | step (s) | images/s | image GFLOPs/img | compression | peak mem (GiB) | step / vanilla |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['step_s']:.3f} | {r['images_s']:.0f} | {r['image_gflops']:.2f} | "
              f"{r['compression']:.2f} | {r['peak_gib']:.1f} | {r['step_s'] / base['step_s']:.2f} |")


if __name__ == "__main__":
    main()
