"""make bench-train-flops: the whole model's training compute per sample, counted, per variant and
geometry: both towers, boundary predictors and their auxiliary heads, the loss, forward and backward
(fastclip.loop.probe_gflops: torch's FlopCounterMode on a real training batch of digits, with the
boundaries the model draws at initialisation; learned boundaries then move as it trains, and a run's
own efficiency/train_gflops follows them). FLOPs are machine-independent: a few samples suffice.

    python -m fastclip.bench.train_flops [--batch 8] [--encoders vit_tiny,vit_b16]
"""
import argparse
from pathlib import Path

import torch

from fastclip import PROJECT_ROOT, runtime
from fastclip.bench.common import emit, markdown_table
from fastclip.config import compose_train_config
from fastclip.loop import probe_gflops
from fastclip.tasks import build_task

VARIANTS = [
    ("vanilla", ["boundary=none"]),
    ("DTP gumbel, both towers (the default DTP: boundary=gumbel)", ["boundary=gumbel"]),
    ("DTP gumbel, both towers, byte-level text (boundary.text_tokens=bytes)",
     ["boundary=gumbel", "boundary.text_tokens=bytes"]),
    ("DTP gumbel, image tower", ["boundary=gumbel", "boundary.apply_to=[image]"]),
    ("DTP fixed k=4 Hilbert, image tower", ["boundary=fixed", "boundary.k=4", "boundary.image_order=hilbert",
                                            "boundary.apply_to=[image]"]),
    ("DTP fixed k=4, both towers", ["boundary=fixed", "boundary.k=4"]),
]


def count(encoder: str, overrides: list[str], batch: int) -> float:
    cfg = compose_train_config([f"encoder={encoder}", *overrides, f"trainer.batch_size={batch}",
                                "trainer.progress=false", "eval.boundary_picture=false"])
    runtime.seed_everything(0)
    task = build_task(cfg, torch.device("cpu"), None)
    return probe_gflops(task, None, torch.device("cpu"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--encoders", default="vit_tiny,vit_b16")
    ap.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench" / "train_flops.md"))
    args = ap.parse_args(argv)
    rows = []
    for encoder in args.encoders.split(","):
        vanilla = None
        for name, overrides in VARIANTS:
            gflops = count(encoder, overrides, args.batch)
            vanilla = vanilla or gflops
            rows.append({"encoder": encoder, "variant": name, "gflops": gflops, "ratio": gflops / vanilla})
            print(rows[-1], flush=True)
    table = markdown_table(rows, [("encoder", "encoder", ""), ("variant", "variant", ""),
                                  ("train GFLOPs/sample", "gflops", ".4g"), ("x vanilla", "ratio", ".2f")])
    emit(f"Whole model, one training step (forward + backward) per sample, counted on digits (torch "
         f"{torch.__version__}, batch {args.batch}):\n\n{table}", Path(args.out))


if __name__ == "__main__":
    main()
