"""make bench-loader: is the shard loader ever the bottleneck? In one run, on pre-resized shards
(CIFAR-10 test converted by make_shards, or generated images when ../shared is absent):
  1. the loader alone (trainer.num_workers workers, default 2): samples/s
  2. the vit_tiny training step alone, on a batch already in memory: samples/s it consumes
  3. training fed by the loader (the real thing): samples/s
The loader keeps up when 3 is close to 2 (and 1 is above 2). Also the wait for an epoch's first batch:
in the first epoch (the workers start, as they did every epoch before they persisted) and in the later
ones (persistent workers).

    python -m fastclip.bench.loader [--workers 2] [--steps 30]
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from fastclip import PROJECT_ROOT, runtime
from fastclip.bench import loader_ranks
from fastclip.bench.common import emit, markdown_table
from fastclip.bench.clip import CIFAR
from fastclip.data import make_shards
from fastclip.tasks import build_task


def prepared_shards(root: Path) -> tuple[str, str]:
    """Pre-resized shards (32 px, the vit_tiny input), converted once and reused -> (training pattern,
    the test shard): the first shard is the test split, the rest train (their last one held out for
    validation: dataset.val_shards=null), the splits disjoint as the data requires."""
    out = root / "shards"
    if not (out / "sizes.json").is_file():
        if CIFAR.is_dir():
            records = make_shards.folder_records(CIFAR, "a photo of a {}.")
        else:  # generated: coloured noise images, one class per colour
            from PIL import Image
            import numpy as np
            src = root / "generated"
            rng = np.random.default_rng(0)
            records = []
            for i in range(5000):
                path = src / f"{i:05d}.png"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
                records.append((str(path), f"a photo of pattern {i % 10}", {}))
        make_shards.convert(records, out, image_size=32, shard_size=1000)
    n = len(list(out.glob("shard-*.tar")))
    return str(out / f"shard-{{000001..{n - 1:06d}}}.tar"), str(out / "shard-000000.tar")


def timed_batches(batches, n: int) -> tuple[float, float]:
    """(samples/s over n batches after the first, seconds waited for the first: the epoch's start)."""
    start = time.perf_counter()
    it = iter(batches)
    next(it)
    t0, samples = time.perf_counter(), 0
    for _ in range(n):
        batch = next(it)
        samples += batch.images.shape[0]
    return samples / (time.perf_counter() - t0), t0 - start


def train_steps(task, batches, steps: int) -> float:
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-4)
    times, samples = [], 0
    it = iter(batches)
    for i in range(steps + 1):
        t0 = time.perf_counter()
        out = task.loss(next(it))
        if out.loss is None:  # a batch whose every sample was bad
            continue
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if i:  # the first step pays for worker start-up
            times.append(time.perf_counter() - t0)
            samples += out.samples
    return samples / sum(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", default="1,8,64", help="simulated data-parallel ranks (loader_ranks); empty: none")
    ap.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench" / "loader.md"))
    args = ap.parse_args(argv)
    root = PROJECT_ROOT / "outputs" / "bench" / "loader"
    pattern, test_shard = prepared_shards(root)
    from fastclip.config import compose_train_config
    cfg = compose_train_config(["dataset=webdataset", f"dataset.train_shards='{pattern}'", "dataset.resampled=true",
                                "dataset.num_samples=1000000", f"dataset.eval_shards='{test_shard}'",
                                "dataset.eval_max_images=64", f"trainer.num_workers={args.workers}",
                                "trainer.progress=false"])
    threads = runtime.set_torch_threads(cfg.trainer.torch_threads, args.workers, torch.device("cpu"))  # as train.run
    task = build_task(cfg, torch.device("cpu"))
    task.model.train()
    in_memory = next(iter(task.train_batches(0)))
    task.close()  # so the first measured epoch starts its workers, as every epoch did before they persisted
    rows = {"loader alone": [], "training step alone (batch in memory)": [], "training fed by the loader": []}
    waits = []  # the first batch of each epoch of the loader alone (epoch 0: its workers start)
    for r in range(args.repeats):  # alternated, medians reported (a noisy 2-core machine)
        rate, wait = timed_batches(task.train_batches(r), args.steps)
        rows["loader alone"].append(rate)
        waits.append(wait)
        rows["training step alone (batch in memory)"].append(
            train_steps(task, (in_memory for _ in range(args.steps + 1)), args.steps))
        rows["training fed by the loader"].append(train_steps(task, task.train_batches(100 + r), args.steps))
    step_rate = statistics.median(rows["training step alone (batch in memory)"])
    table = [{"what": k, "samples_s": statistics.median(v), "ratio": statistics.median(v) / step_rate,
              "all": ", ".join(f"{x:.0f}" for x in v)} for k, v in rows.items()]
    emit(f"### bench-loader: {pattern}\n\nvit_tiny (32 px), batch {cfg.trainer.batch_size}, {args.workers} loader "
         f"workers, {args.steps} batches per measurement, median of {args.repeats} alternated repeats, "
         f"{threads} torch threads\n\n"
         + markdown_table(table, [("measurement", "what", "s"), ("samples/s (median)", "samples_s", ".0f"),
                                  ("/ training step alone", "ratio", ".2f"), ("repeats", "all", "s")])
         + f"\n\nwait for an epoch's first batch: {waits[0]:.3f} s in the first epoch (workers start), "
         f"median {statistics.median(waits[1:] or [float('nan')]):.3f} s in the later ones (persistent workers; "
         "the wait includes discarding the batches the previous, unfinished epoch had in flight, which an "
         "epoch read to its end has none of)",
         Path(args.out))
    if args.ranks:  # rank scaling: the CPU a rank spends per sample as ranks grow
        loader_ranks.main(["--ranks", args.ranks, "--repeats", str(args.repeats)])


if __name__ == "__main__":
    main()
