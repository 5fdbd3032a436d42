"""make bench-gpu: one short script for a single GPU (under 5 minutes on an H100). CLIP training
steps of ViT-B/16 (open_clip geometry, BPE text tower) at batch 256 on synthetic images:
vanilla vs DTP-ViT gumbel 0.25 vs DTP-ViT fixed k=4 (2 blocks at full length, 10 on segments)
vs ToMe at each DTP row's GFLOPs. Prints step time, images/s, image GFLOPs (FlopCounterMode,
the boundaries the model produced), achieved compression and peak memory, and how busy the GPU
was: kernel time per step (torch.profiler over 3 steps) / step time, and how often one step
synchronizes the host with the GPU (torch.cuda.set_sync_debug_mode). A step well under 100%
busy is bound by the host issuing kernels, not by the FLOPs DTP removes. AdamW uses the loop's
kernel (trainer.optimizer_impl); --compile compiles every transformer block as trainer.compile.

    python -m fastclip.bench.gpu [--batch 256] [--steps 30] [--warmup 10] [--compile] [--out table.md]
    python -m fastclip.bench.gpu --device cpu --batch 2 --steps 1 --warmup 0   # smoke check
"""
import argparse
import collections
import contextlib
import resource
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch
from open_clip import ClipLoss

from fastclip.bench.clip import tome_r_for
from fastclip.bench.common import in_fresh_process
from fastclip.config import compose_train_config
from fastclip import runtime
from fastclip.eval.efficiency import count_gflops, unpadded_gflops
from fastclip.optim import adamw_impl
from fastclip.models.clip import build_clip, clip_objective

DTP_IMAGE = ["boundary.apply_to=[image]", "boundary.image_pre_layers=2"]
VARIANTS = [("vanilla ViT-B/16", ["boundary=none"]),
            ("DTP gumbel 0.25", ["boundary=gumbel", "boundary.prior=0.25"] + DTP_IMAGE),
            ("DTP fixed k=4", ["boundary=fixed", "boundary.k=4"] + DTP_IMAGE),
            # the default packs the rows (image_layout=packed); session 5's layout was one padded batch
            ("DTP gumbel 0.25, padded", ["boundary=gumbel", "boundary.prior=0.25",
                                         "boundary.image_layout=padded", "boundary.image_buckets=1"] + DTP_IMAGE)]


def build(overrides, device):
    cfg = compose_train_config(["encoder=vit_b16"] + overrides)
    torch.manual_seed(0)
    model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
    return model.to(device), tokenizer, cfg.trainer.optimizer_impl


@torch.no_grad()
def image_efficiency(model, images):
    """GFLOPs per image of the padded batch (what runs), of each image alone, and the compression
    the predictor actually produced, all in eval mode (the boundaries eval uses)."""
    model.eval()
    gflops, image = count_gflops(model.visual, images)
    alone = unpadded_gflops(model.visual, images, 4) if model.image_method is not None else None
    return gflops, alone, float(image.tokens.sum() / image.segments.sum())


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS (CPU smoke runs)


def kernel_seconds_per_step(step, steps: int = 3) -> float | None:
    """Device time of the kernels (and copies) one step launches, from the profiler's device
    events; None without CUDA or when the profiler saw no device event (no CUPTI)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    if not torch.cuda.is_available():
        return None
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    except RuntimeError as err:  # a profiler that cannot start costs one column, not the timings above it
        print(f"GPU busy not measured: torch.profiler failed: {err}", flush=True)
        return None
    total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return total_us / 1e6 / steps if total_us > 0 else None


def host_syncs_per_step(step) -> collections.Counter | None:
    """Where one step synchronizes the host with the GPU: torch warns on every synchronizing CUDA
    call in sync-debug mode; each is attributed to the innermost project frame (outside this
    benchmark) on the Python stack at the time. None without CUDA."""
    if not torch.cuda.is_available():
        return None
    package = Path(__file__).resolve().parents[1]
    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        ours = [f for f in traceback.extract_stack()[:-1]
                if Path(f.filename).resolve().is_relative_to(package) and "bench" not in Path(f.filename).parts]
        sites[f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else f"{Path(filename).name}:{lineno}"] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


def bench_variant(overrides, batch, steps, warmup, device, compile_blocks=False):
    model, tokenizer, optimizer_impl = build(overrides, device)
    if compile_blocks:
        runtime.compile_blocks(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_impl(optimizer_impl))
    criterion = ClipLoss()
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=gen).to(device)
    texts = tokenizer([f"a synthetic photo number {i}" for i in range(batch)]).to(device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True  # here, not in main: a --compile variant runs in its own process
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    last = {}

    def step():
        with autocast:
            last["out"] = out = model(images, texts)
            loss, _ = clip_objective(model, criterion, out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = peak_memory_gib(device)
    kernel_s = kernel_seconds_per_step(step)
    syncs = host_syncs_per_step(step)
    out = last["out"]
    gflops, alone, compression = image_efficiency(model, images[:16])
    step_s = statistics.median(times)
    return {"step_s": step_s, "images_s": batch / step_s, "image_gflops": gflops, "unpadded_gflops": alone,
            "peak_gib": peak, "compression": compression, "kernel_s": kernel_s, "syncs": syncs, "train_compression":
            float(out["image_output"].tokens.sum() / out["image_output"].segments.sum())}


def table(rows) -> str:
    base = rows[0][1]
    lines = ["| variant | step (s) | images/s | step / vanilla | image GFLOPs/img | GFLOPs / vanilla | "
             "unpadded GFLOPs/img | compression (eval / last train step) | peak mem (GiB) | "
             "kernel time / step (GPU busy) | host syncs / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        alone = "n/a" if r["unpadded_gflops"] is None else f"{r['unpadded_gflops']:.2f}"
        busy = "n/a" if r["kernel_s"] is None else f"{r['kernel_s']:.3f} s ({100 * r['kernel_s'] / r['step_s']:.0f}%)"
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['images_s']:.0f} | {r['step_s'] / base['step_s']:.2f} | "
                     f"{r['image_gflops']:.2f} | {r['image_gflops'] / base['image_gflops']:.2f} | {alone} | "
                     f"{r['compression']:.2f} / {r['train_compression']:.2f} | {r['peak_gib']:.1f} | {busy} | "
                     f"{'n/a' if r['syncs'] is None else sum(r['syncs'].values())} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke check only)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every transformer block (trainer.compile)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench-gpu needs a CUDA device (--device cpu runs a smoke check)")
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    print(f"device: {name}, torch {torch.__version__}, batch {args.batch}, median of {args.steps} steps "
          f"after {args.warmup} warm-up, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
          f"{', blocks compiled' if args.compile else ''}", flush=True)
    # Compiled variants each get a fresh process: on the H200 the DTP rows measured after a compiled
    # vanilla model in the same process ran at their eager kernel time, with no compile logged.
    measure = (lambda *a: in_fresh_process(bench_variant, *a)) if args.compile else bench_variant
    rows = []

    def add(label, overrides):
        t0 = time.perf_counter()
        rows.append((label, measure(overrides, args.batch, args.steps, args.warmup, device, args.compile)))
        print(f"{label}: {rows[-1][1]} ({time.perf_counter() - t0:.0f} s)", flush=True)

    for label, overrides in VARIANTS:
        add(label, overrides)
    # ToMe matched to each DTP row's GFLOPs (fixed k=4: the peers' target in bench-clip), once per r
    matched = {}
    for label, result in rows[1:3]:
        matched.setdefault(tome_r_for(result["image_gflops"], ["encoder=vit_b16"], 224, device), []).append(label)
    for r, labels in matched.items():
        add(f"ToMe r={r} (GFLOPs of {' and '.join(labels)})", ["boundary=tome", f"boundary.r={r}"])
    text = table(rows)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
