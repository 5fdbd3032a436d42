"""make bench-gpu-recipe: does learned DTP close its accuracy gap with longer training? The
bench-clip CIFAR-10 comparison (vit_tiny at patch 4, batch 128, class-template captions,
zero-shot on held-out images with unseen templates) run 10x longer on one GPU: vanilla, DTP
gumbel 0.25 (predictor d->4d->1 and d->d->1, the latter also with row breaks and a stride start,
or in Hilbert order with a stride start), fixed k=4 (raster strips or Hilbert 2x2 squares), ToMe at gumbel's GFLOPs. Each run goes
through the same task and loop as `python -m fastclip.train`; zero-shot top-1 is recorded at
every evaluation (about every third of the run). Not tracked in MLflow (the GPU machine has no
store): the table and a JSON of every evaluation go to --out.

    python -m fastclip.bench.gpu_recipe [--data ../shared/data/cifar10-test] [--steps 3000] [--out DIR]
        [--only vanilla,gumbel,fixed,tome,gumbel_r1,gumbel_r1_rb,gumbel_r1_rb_stride,fixed_hilbert,gumbel_r1_hilbert_stride]
        [--tome-r R] [--device cuda|cpu]
"""
import argparse
import json
import time
from pathlib import Path

import torch

from fastclip import runtime
from fastclip.bench.clip import CIFAR, DTP_VARIANTS, GEOMETRY, tome_r_for
from fastclip.bench.common import markdown_table, schedule
from fastclip.config import compose_train_config
from fastclip.loop import fit
from fastclip.tasks import build_task

# key -> (table label, overrides); the DTP rows are bench-clip's (their learned rows also report
# top-1 with their boundaries shuffled); ToMe's r is matched to the gumbel run's GFLOPs unless --tome-r.
VARIANTS = {"vanilla": ("vanilla ViT", ["boundary=none"]), "tome": ("ToMe", None), **DTP_VARIANTS}

class EvalRecorder:
    """Stands in for the MLflow tracker: keeps every evaluation's metrics, drops the rest."""
    run_id = None

    def __init__(self):
        self.evals: list[dict] = []

    def log_metrics(self, metrics: dict, step: int, flush: bool = False):
        if "zeroshot/top1" in metrics:
            self.evals.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path, artifact_path=None):
        pass

    def flush(self):
        pass


def train_one(overrides: list[str], run_dir: Path, device: torch.device) -> tuple[dict, list[dict]]:
    cfg = compose_train_config(overrides)
    runtime.seed_everything(cfg.seed)
    runtime.set_torch_threads(cfg.trainer.get("torch_threads"), cfg.trainer.num_workers, device)
    torch.set_float32_matmul_precision("high")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    task = build_task(cfg, device, run_dir)
    recorder = EvalRecorder()
    metrics = fit(task, cfg, recorder, run_dir, device)
    if device.type == "cuda":
        metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return metrics, recorder.evals


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(CIFAR), help="CIFAR-10 test set as class folders")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--evals", type=int, default=3, help="evaluations spread over the run")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default="vanilla,gumbel,fixed,tome,gumbel_r1", help="variants, in this order")
    ap.add_argument("--tome-r", type=int, default=None, help="ToMe merge rate (default: matched to gumbel)")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every variant run, e.g. boundary.image_pool=cls")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/gpu_recipe"))
    args = ap.parse_args(argv)
    steps_per_epoch = int(0.8 * sum(1 for p in Path(args.data).rglob("*") if p.is_file())) // 128
    every = max(1, args.steps // max(1, steps_per_epoch) // args.evals)
    common = ["dataset=image_folder", f"dataset.path={args.data}"] + GEOMETRY + [
        *schedule(args.steps, warmup=20), "epochs=100000", f"eval.every_epochs={every}", "trainer.progress=false",
        f"trainer.num_workers={args.workers}", f"device={args.device}"]
    extra = list(args.set)
    rows, history = [], {}
    keys = args.only.split(",")
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"--only {args.only!r}: unknown {unknown}; choose from {list(VARIANTS)}")
    if "tome" in keys and args.tome_r is None and ("gumbel" not in keys or keys.index("tome") < keys.index("gumbel")):
        raise SystemExit("--only: ToMe is matched to the gumbel run's GFLOPs, so gumbel must run first (or give --tome-r)")
    tome_r = args.tome_r
    device = runtime.pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    for key in keys:
        name, overrides = VARIANTS[key]
        if key == "tome":
            name, overrides = f"ToMe r={tome_r}", ["boundary=tome", f"boundary.r={tome_r}"]
        t0 = time.perf_counter()
        metrics, evals = train_one(common + overrides + extra, args.out / key, device)
        rows.append({"variant": name, **metrics, "wall_s": time.perf_counter() - t0})
        history[name] = evals
        print(f"== {name}: top1 {metrics['zeroshot/top1']:.3f} at {[round(e['zeroshot/top1'], 3) for e in evals]} "
              f"({rows[-1]['wall_s']:.0f} s)", flush=True)
        (args.out / "history.json").write_text(json.dumps(history, indent=1))
        if key == "gumbel" and tome_r is None:  # ToMe matched to the gumbel run's padded GFLOPs
            tome_r = tome_r_for(metrics["efficiency/image_gflops"])
    base = rows[0]
    for row in rows:
        row["gflops_ratio"] = row["efficiency/image_gflops"] / base["efficiency/image_gflops"]
        row["top1_delta"] = 100 * (row["zeroshot/top1"] - base["zeroshot/top1"])
        row["top1_curve"] = " / ".join(f"{e['zeroshot/top1']:.3f}" for e in history[row["variant"]])
    table = markdown_table(rows, [
        ("variant", "variant", "s"), ("zero-shot top-1", "zeroshot/top1", ".3f"), ("Δ top-1 (pts)", "top1_delta", "+.1f"),
        ("top-1 at each eval", "top1_curve", "s"),
        ("top-1, boundaries shuffled", "zeroshot/top1_shuffled_placement", ".3f"), ("image GFLOPs", "efficiency/image_gflops", ".4f"),
        ("GFLOPs / vanilla", "gflops_ratio", ".2f"), ("achieved compression", "efficiency/compression_image", ".2f"),
        ("median step (s)", "time/step_median_s", ".4f"), ("of which data wait (s)", "time/data_median_s", ".4f"),
        ("wall (s)", "wall_s", ".0f")])
    header = (f"CIFAR-10, {args.steps} steps, batch 128, vit_tiny patch 4 (64 patches, 4 blocks), "
              f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
              f"evals every {every} epochs")
    print(header + "\n\n" + table, flush=True)
    (args.out / "table.md").write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
