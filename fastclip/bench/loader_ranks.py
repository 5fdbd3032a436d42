"""make bench-loader, rank scaling: the CPU one rank spends per sample it trains on, with W simulated
data-parallel ranks (1, 8, 64), on 224 px shards. Each rank's training stream is read in this
process as one loader worker would read it (task.data.train.set_epoch with rank and world size);
the cost is process CPU time over the samples the rank delivers. Where every rank reads every
sample, it grows with W; where each rank reads only its own shards (or its own draw), it does not.

    python -m fastclip.bench.loader_ranks [--ranks 1,8,64] [--samples 256]
"""
import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastclip import PROJECT_ROOT
from fastclip.bench.common import emit, markdown_table
from fastclip.config import compose_train_config
from fastclip.data import make_shards
from fastclip.tasks import build_task

SIZE = 224


def shards_224(root: Path, shards: int = 64, per_shard: int = 8) -> tuple[str, str, str]:
    """Generated photos-like images (smooth colour fields, JPEG at 224 px), written once ->
    (training pattern of `shards` shards, a test shard, a validation shard)."""
    out = root / "shards224"
    if not (out / "sizes.json").is_file():
        rng = np.random.default_rng(0)
        records = []
        for i in range((shards + 2) * per_shard):
            path = root / "generated224" / f"{i:05d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                small = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
                small.resize((288, 256), Image.BICUBIC).save(path)
            records.append((str(path), f"a photo of pattern {i % 10}", {}))
        make_shards.convert(records, out, image_size=SIZE, shard_size=per_shard, progress=False)
    return (str(out / f"shard-{{000000..{shards - 1:06d}}}.tar"), str(out / f"shard-{shards:06d}.tar"),
            str(out / f"shard-{shards + 1:06d}.tar"))


def cpu_ms_per_sample(stream, ranks: int, measured_ranks: int, batch: int) -> tuple[float, int]:
    """(process CPU ms per delivered sample, samples) over the first `measured_ranks` ranks of `ranks`,
    each rank's stream read whole."""
    cpu, samples = 0.0, 0
    for rank in range(measured_ranks):
        stream.set_epoch(0, 0, batch_size=batch, rank=rank, world_size=ranks)
        t0 = time.process_time()
        samples += sum(1 for _ in stream)
        cpu += time.process_time() - t0
    return 1000 * cpu / max(1, samples), samples


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ranks", default="1,8,64")
    ap.add_argument("--samples", type=int, default=256, help="samples each measured rank delivers (resampled)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", default=str(PROJECT_ROOT / "outputs" / "bench" / "loader"), help="where the shards go")
    ap.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench" / "loader_ranks.md"))
    args = ap.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    pattern, test, val = shards_224(Path(args.root))
    torch.set_num_threads(1)  # one loader worker's view: its CPU time, not a thread pool's
    rows = []
    for resampled in (True, False):
        streams = {}
        for world in ranks:
            extra = [f"dataset.num_samples={args.samples * world}"] if resampled else []
            cfg = compose_train_config(["dataset=webdataset", f"dataset.train_shards='{pattern}'",
                                        f"dataset.eval_shards='{test}'", f"dataset.val_shards='{val}'",
                                        f"dataset.resampled={str(resampled).lower()}", "dataset.shuffle_buffer=16",
                                        f"encoder.vision.image_size={SIZE}", f"trainer.batch_size={args.batch}",
                                        "trainer.progress=false", *extra])
            streams[world] = build_task(cfg, torch.device("cpu")).data.train
        times = {w: [] for w in ranks}
        counts = {}
        for _ in range(args.repeats):  # alternated, medians reported (a noisy shared machine)
            for world in ranks:
                # resampled: one rank's own draw; a pass over the shards: every rank, so each shard counts once
                ms, counts[world] = cpu_ms_per_sample(streams[world], world, 1 if resampled else world, args.batch)
                times[world].append(ms)
        base = statistics.median(times[ranks[0]])
        for world in ranks:
            ms = statistics.median(times[world])
            rows.append({"mode": "resampled" if resampled else "one pass over the shards", "ranks": world,
                         "samples": counts[world], "ms": ms, "ratio": ms / base,
                         "all": ", ".join(f"{x:.2f}" for x in times[world])})
    emit(f"### bench-loader rank scaling: {pattern}\n\n{SIZE} px shards, CPU ms one rank spends per sample it "
         f"delivers (decoded), ranks simulated in one process as one loader worker, batch {args.batch}, median of "
         f"{args.repeats} alternated repeats, 1 torch thread\n\n"
         + markdown_table(rows, [("stream", "mode", "s"), ("ranks", "ranks", "d"), ("samples", "samples", "d"),
                                 ("CPU ms / sample (median)", "ms", ".2f"), (f"/ {ranks[0]} rank", "ratio", ".2f"),
                                 ("repeats", "all", "s")]), Path(args.out))


if __name__ == "__main__":
    main()
