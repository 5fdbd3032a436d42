"""make bench-gpu: one short script for a single GPU (under 5 minutes on an H100). CLIP training
steps of ViT-B/16 (open_clip geometry, BPE text tower) at batch 256 on synthetic images:
vanilla vs DTP-ViT gumbel 0.25 (its default layout, packed, and packed under a token budget) vs
DTP-ViT fixed k=4 (the config's default pre-layers) vs ToMe at each DTP row's GFLOPs, and vanilla
fed by the real loader from webdataset shards at 224 px. The step time is the throughput of N steps
between two synchronizations (the GPU queue never drains between steps, as in training). Prints
images/s, the whole training step's counted GFLOPs (both towers, forward and backward, at the bench
batch: fastclip.loop.probe_gflops, the count trainer.max_pflops plans with), image GFLOPs in eval
(FlopCounterMode, the boundaries the model produced), achieved compression, peak memory, and how
busy the GPU was: kernel time per step (torch.profiler's device kernels and copies over 3 steps,
annotation spans left out) / step time, and how often one step synchronizes the host with the GPU
(torch.cuda.set_sync_debug_mode). A step well under 100% busy is bound by the host issuing kernels,
not by the FLOPs DTP removes. AdamW uses the loop's kernel (trainer.optimizer_impl); --compile
compiles every transformer block as trainer.compile. No data-parallel row yet (one GPU only).

    python -m fastclip.bench.gpu [--batch 256] [--steps 30] [--warmup 10] [--workers N] [--compile] [--out table.md]
        [--only vanilla,gumbel,fixed,packed,budget,tome,loader]
    python -m fastclip.bench.gpu --device cpu --encoder vit_tiny --batch 2 --steps 1 --warmup 0   # smoke check
"""
import argparse
import collections
import contextlib
import resource
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip import ClipLoss

from fastclip.bench.clip import tome_r_for
from fastclip.bench.common import in_fresh_process
from fastclip import PROJECT_ROOT
from fastclip.config import compose_train_config
from fastclip.data import make_shards
from fastclip import runtime
from fastclip.eval.efficiency import count_gflops, unpadded_gflops
from fastclip.loop import probe_gflops
from fastclip.optim import adamw_impl
from fastclip.models.clip import build_clip, clip_objective
from fastclip.schema.workers import loader_workers
from fastclip.tasks import build_task
from fastclip.tasks.protocol import TaskBase

DTP_IMAGE = ["boundary.apply_to=[image]"]  # the config's default pre-layers
GUMBEL = ["boundary=gumbel", "boundary.prior=0.25"] + DTP_IMAGE  # the default predictor (d->d->1 since 2026-12-06)
# key (for --only) -> (table label, overrides); {encoder}: the --encoder option the rows run
VARIANTS = {"vanilla": ("vanilla {encoder}", ["boundary=none"]),
            "gumbel": ("DTP gumbel 0.25", GUMBEL),  # image_layout=auto: padded on CUDA
            "fixed": ("DTP fixed k=4", ["boundary=fixed", "boundary.k=4"] + DTP_IMAGE),
            "packed": ("DTP gumbel 0.25, packed", GUMBEL + ["boundary.image_layout=packed"]),
            # static shapes: room for 0.3 x 196 segments an image on average, no host read
            "budget": ("DTP gumbel 0.25, packed, budget 0.3", GUMBEL + ["boundary.image_layout=packed",
                                                                    "boundary.image_token_budget=0.3"])}
# the rows after the variants: ToMe at each DTP row's GFLOPs, vanilla fed by the real loader
LATER = ("tome", "loader")


def chosen(only: str | None) -> list[str]:
    """--only's comma-separated keys -> the keys to run, in table order; vanilla always (every ratio
    is over it). Raises SystemExit naming an unknown key."""
    if only is None:
        return [*VARIANTS, *LATER]
    keys = {k.strip() for k in only.split(",") if k.strip()}
    unknown = sorted(keys - set(VARIANTS) - set(LATER))
    if unknown:
        raise SystemExit(f"bench-gpu --only: unknown {', '.join(unknown)}; expected some of "
                         f"{', '.join([*VARIANTS, *LATER])}")
    if "tome" in keys and not keys & {"gumbel", "fixed"}:
        raise SystemExit("bench-gpu --only tome: ToMe's rows are matched to the gumbel and fixed rows' GFLOPs; "
                         "name one of them too")
    return [k for k in (*VARIANTS, *LATER) if k in keys or k == "vanilla"]


@dataclass
class _Counted:
    loss: torch.Tensor
    samples: int


class InMemorySteps(TaskBase):
    """The bench's model and batch in the shape fastclip.loop.probe_gflops counts a task's training
    step in: model, train_batches(epoch), loss(batch) -> (loss, samples); the task's plain
    accumulation (TaskBase.accumulate: one micro-batch a step here, so exact for a contrastive loss)."""

    def __init__(self, model, batch):
        self.model, self.batch, self.criterion = model, batch, ClipLoss()

    def train_batches(self, epoch):
        yield self.batch

    def loss(self, batch):
        loss, _ = clip_objective(self.model, self.criterion, self.model(*batch))
        return _Counted(loss, batch[0].shape[0])


def seconds_per_step(step, steps: int, device) -> float:
    """Throughput: the wall time of `steps` steps between two synchronizations, / steps. A sync around
    each step would time it with an empty GPU queue, which training never has."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def build(overrides, device):
    cfg = compose_train_config(overrides)
    torch.manual_seed(0)
    model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
    return model.to(device), tokenizer, cfg.trainer.optimizer_impl


def image_size(overrides) -> int:
    """The input side of the encoder the overrides name (open_clip's ViT-B/16: 224)."""
    return compose_train_config(overrides).encoder.vision.get("image_size", 224)


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


def device_busy_us(events) -> float:
    """Microseconds of the device's kernels and copies among torch.profiler's events. The device-side
    annotation spans (gpu_user_annotation: record_function, ProfilerStep#) are left out: they span
    kernels already counted, and counting them too reported more than 100% busy."""
    from torch.autograd import DeviceType
    return sum(e.time_range.elapsed_us() for e in events
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation)


def kernel_seconds_per_step(step, steps: int = 3) -> float | None:
    """Device time of the kernels (and copies) one step launches, from the profiler's device
    events; None without CUDA or when the profiler saw no device event (no CUPTI)."""
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
    total_us = device_busy_us(prof.events())
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
    size = image_size(overrides)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    texts = tokenizer([f"a synthetic photo number {i}" for i in range(batch)]).to(device)
    cuda = device.type == "cuda"
    if cuda:  # TF32 float32 matmuls as a training run's (process-wide: on CPU, IEEE fp32 stays)
        runtime.use_tf32_matmuls(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    last = {}

    def step():
        with autocast:
            last["out"] = out = model(images, texts)
            loss, _ = clip_objective(model, criterion, out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    step_s = seconds_per_step(step, steps, device)
    peak = peak_memory_gib(device)
    kernel_s = kernel_seconds_per_step(step)
    syncs = host_syncs_per_step(step)
    out = last["out"]
    model.train()
    train_gflops = probe_gflops(InMemorySteps(model, (images, texts)), torch.bfloat16 if cuda else None, device) * batch
    gflops, alone, compression = image_efficiency(model, images[:16])
    return {"step_s": step_s, "images_s": batch / step_s, "train_gflops": train_gflops, "image_gflops": gflops,
            "unpadded_gflops": alone,
            "peak_gib": peak, "compression": compression, "kernel_s": kernel_s, "syncs": syncs, "train_compression":
            float(out["image_output"].tokens.sum() / out["image_output"].segments.sum())}


def generated_shards(root: Path, n: int) -> tuple[str, str]:
    """n generated 256 px JPEGs (noise: the dearest to decode) converted once to webdataset shards at
    224 px -> (training pattern, test shard): shard 0 the test split, the rest train (their last
    one held out for validation)."""
    out = root / "shards224"
    if not (out / "sizes.json").is_file():
        import numpy as np
        from PIL import Image
        rng, records = np.random.default_rng(0), []
        for i in range(n):
            path = root / "generated" / f"{i:05d}.jpg"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(path, quality=90)
            records.append((str(path), f"a photo of pattern {i % 10}", {}))
        make_shards.convert(records, out, image_size=224, shard_size=max(1, n // 4), progress=False)
    last = len(list(out.glob("shard-*.tar"))) - 1
    return str(out / f"shard-{{000001..{last:06d}}}.tar"), str(out / "shard-000000.tar")


def loader_fed(encoder, batch, steps, warmup, device, workers: int | None) -> dict:
    """Vanilla training steps of the CLIP task (task.loss, the loop's path) fed by its real loader
    from 224 px webdataset shards with `workers` loader workers, against the same task's step on one
    batch kept on the device: {feed: seconds per step}, each over `steps` steps between two syncs."""
    pattern, test = generated_shards(PROJECT_ROOT / "outputs" / "bench" / "gpu", max(64, 4 * batch))
    cfg = compose_train_config([f"encoder={encoder}", "boundary=none", "dataset=webdataset",
                                f"dataset.train_shards='{pattern}'", "dataset.resampled=true",
                                "dataset.num_samples=100000000", f"dataset.eval_shards='{test}'",
                                "dataset.eval_max_images=16", f"trainer.batch_size={batch}",
                                f"trainer.num_workers={'auto' if workers is None else workers}",
                                "trainer.progress=false"])
    workers = loader_workers(cfg)  # auto: the rule a training run uses
    task = build_task(cfg, device)
    task.model.train()
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-4, **adamw_impl(cfg.trainer.optimizer_impl))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    batches = iter(task.train_batches(0))
    in_memory = next(batches)

    def step(batch):
        with autocast:
            out = task.loss(batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    try:
        for _ in range(warmup + 1):  # the workers' start-up is not a step's cost
            step(next(batches))
        fed = seconds_per_step(lambda: step(next(batches)), steps, device)
    finally:  # the persistent workers stop here, not when the process ends, beside the next measurement
        task.close()
    memory = seconds_per_step(lambda: step(in_memory), steps, device)
    return {f"fed by the loader ({workers} workers)": fed, "batch in memory": memory}


def table(rows) -> str:
    base = rows[0][1]
    lines = ["| variant | step (s) | images/s | step / vanilla | train GFLOPs/step | / vanilla | image GFLOPs/img "
             "(eval) | / vanilla | unpadded GFLOPs/img | compression (eval / last train step) | peak mem (GiB) | "
             "kernel time / step (GPU busy) | host syncs / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        alone = "n/a" if r["unpadded_gflops"] is None else f"{r['unpadded_gflops']:.2f}"
        busy = "n/a" if r["kernel_s"] is None else f"{r['kernel_s']:.3f} s ({100 * r['kernel_s'] / r['step_s']:.0f}%)"
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['images_s']:.0f} | {r['step_s'] / base['step_s']:.2f} | "
                     f"{r['train_gflops']:.0f} | {r['train_gflops'] / base['train_gflops']:.2f} | {r['image_gflops']:.2f} | {r['image_gflops'] / base['image_gflops']:.2f} | {alone} | "
                     f"{r['compression']:.2f} / {r['train_compression']:.2f} | {r['peak_gib']:.1f} | {busy} | "
                     f"{'n/a' if r['syncs'] is None else sum(r['syncs'].values())} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke check only)")
    ap.add_argument("--encoder", default="vit_b16", help="conf/encoder option (vit_tiny: a CPU smoke check)")
    ap.add_argument("--workers", type=int, default=None,
                    help="loader workers of the loader-fed row (default: trainer.num_workers=auto's count)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every transformer block (trainer.compile)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--only", default=None, help=f"comma-separated rows ({', '.join([*VARIANTS, *LATER])}); "
                    "vanilla always runs (default: all)")
    args = ap.parse_args(argv)
    keys = chosen(args.only)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench-gpu needs a CUDA device (--device cpu runs a smoke check)")
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    print(f"device: {name}, torch {torch.__version__}, {args.encoder}, batch {args.batch}, {args.steps} steps "
          f"between two syncs after {args.warmup} warm-up, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
          f"{', blocks compiled' if args.compile else ''}", flush=True)
    # Compiled variants each get a fresh process: on the H200 the DTP rows measured after a compiled
    # vanilla model in the same process ran at their eager kernel time, with no compile logged.
    measure = (lambda *a: in_fresh_process(bench_variant, *a)) if args.compile else bench_variant
    rows, failed = [], []

    def written(more: str = "") -> str:
        """The table so far (--out rewritten after every row: a phase cut short keeps what it measured)."""
        text = (table(rows) if rows else "") + "".join(f"\n| {label} | failed: {why} |" for label, why in failed) + more
        if args.out:
            args.out.write_text(text + "\n")
        return text

    def add(label, overrides):
        t0 = time.perf_counter()
        try:
            result = measure([f"encoder={args.encoder}"] + overrides, args.batch, args.steps, args.warmup, device,
                             args.compile)
        except Exception as exc:  # one row's out-of-memory or compile error costs that row only
            traceback.print_exc()
            failed.append((label, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        else:
            rows.append((label, result))
            print(f"{label}: {result} ({time.perf_counter() - t0:.0f} s)", flush=True)
        written()

    for key in keys:
        if key in VARIANTS:
            label, overrides = VARIANTS[key]
            add(label.format(encoder=args.encoder), overrides)
    # ToMe matched to each DTP row's GFLOPs (fixed k=4: the peers' target in bench-clip), once per r
    matched = {}
    targets = [row for row in rows if "tome" in keys and row[0] in (VARIANTS["gumbel"][0], VARIANTS["fixed"][0])]
    for label, result in targets:
        encoder = [f"encoder={args.encoder}"]
        matched.setdefault(tome_r_for(result["image_gflops"], encoder, image_size(encoder), device), []).append(label)
    for r, labels in matched.items():
        add(f"ToMe r={r} (GFLOPs of {' and '.join(labels)})", ["boundary=tome", f"boundary.r={r}"])
    more = ""
    if "loader" in keys:
        fed = loader_fed(args.encoder, args.batch, args.steps, args.warmup, device, args.workers)
        memory = fed["batch in memory"]
        more = ("\n\n| vanilla, the CLIP task's step | step (s) | images/s | / batch in memory |\n|---|---|---|---|\n"
                + "\n".join(f"| {feed} | {s:.3f} | {args.batch / s:.0f} | {s / memory:.2f} |" for feed, s in fed.items()))
    print("\n" + written(more))
    if failed:
        raise SystemExit(f"bench-gpu: {len(failed)} row(s) failed: {', '.join(label for label, _ in failed)}")


if __name__ == "__main__":
    main()
