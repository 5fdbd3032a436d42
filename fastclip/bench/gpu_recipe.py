"""make bench-gpu-recipe: bench-clip's comparison (vit_tiny at patch 4, batch 128, class-template
captions, zero-shot on held-out images with unseen templates) on one GPU, longer and over seeds:
vanilla, the DTP rows (gumbel 0.25 with the d->4d->1 or d->d->1 predictor, row breaks, a stride
start, Hilbert order; fixed k=4 as raster strips or Hilbert 2x2 squares), and the peer baselines
(ToMe, patch dropout, EViT, a coarser grid) with their knob solved for the DTP fixed k=4 Hilbert
row's image GFLOPs, as bench-clip does. Each run goes through the same task and loop as
`python -m fastclip.train` in a fresh process; zero-shot top-1 is recorded at every evaluation
(about every third of the run). The recipe is bound by its loader, not the GPU (H200, digits, no
loader workers: 0.131 s of a 0.157 s step waiting for data), so give each run many loader workers
(--workers, default 8) and as many --jobs as the cores feed; runs at once make step times
shared-machine times: read top-1 from such a table, speed from bench-gpu. Not tracked in MLflow (the GPU machine has no store): the table, the
ranking at matched GFLOPs and a JSON per run go to --out.

    python -m fastclip.bench.gpu_recipe [--datasets cifar10,digits] [--data ../shared/data/cifar10-test]
        [--steps 3000] [--seeds 0,1,2] [--jobs 1] [--workers 8] [--out DIR] [--device cuda|cpu]
        [--only vanilla,fixed_hilbert,tome,patch_dropout,evit,coarser_grid,...]
"""
import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import statistics
import time
import traceback
from pathlib import Path

import torch

from fastclip import runtime
from fastclip.bench.clip import (CIFAR, DATASETS, DTP_VARIANTS, GEOMETRY, PEERS, all_patches_row, matched_knob,
                                 per_seed, ranking, tower_gflops)
from fastclip.bench.common import markdown_table, schedule
from fastclip.config import compose_train_config
from fastclip.loop import fit
from fastclip.schema.workers import loader_workers
from fastclip.tasks import build_task

# key -> (table label, overrides); the DTP rows are bench-clip's (their learned rows also report
# top-1 with each image at another image's boundaries); the peers' labels and overrides come from their matched knob.
VARIANTS = {"vanilla": ("vanilla ViT", ["boundary=none"]), **DTP_VARIANTS}
PEER_KEYS = list(PEERS)  # patch dropout's row is followed by its runs scored on every patch
MATCH_TO = "fixed_hilbert"  # the row whose image GFLOPs the peers are matched to


class EvalRecorder:
    """Stands in for the MLflow tracker: keeps every per-epoch evaluation's metrics (the validation
    split's), drops the rest (the final test numbers come back from fit)."""
    run_id = None

    def __init__(self):
        self.evals: list[dict] = []

    def log_metrics(self, metrics: dict, step: int, flush: bool = False):
        if "val/zeroshot_top1" in metrics:
            self.evals.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def log_artifact(self, path, artifact_path=None):
        pass

    def flush(self):
        pass


def train_one(overrides: list[str], run_dir: Path, device: torch.device) -> tuple[dict, list[dict]]:
    cfg = compose_train_config(overrides)
    runtime.seed_everything(cfg.seed)
    runtime.set_torch_threads(cfg.trainer.torch_threads, loader_workers(cfg), device)
    runtime.use_tf32_matmuls(device)  # CUDA only, as a training run
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    task = build_task(cfg, device, run_dir)
    recorder = EvalRecorder()
    metrics = fit(task, cfg, recorder, run_dir, device)
    if device.type == "cuda":
        metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return metrics, recorder.evals


def _job(overrides: list[str], run_dir: str, device: str) -> dict:
    """One run in a spawned process -> its metrics, evaluations and wall time (also left in result.json)."""
    t0 = time.perf_counter()
    metrics, evals = train_one(overrides, Path(run_dir), runtime.pick_device(device))
    result = {"metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
              "evals": evals, "wall_s": time.perf_counter() - t0}
    Path(run_dir, "result.json").write_text(json.dumps(result, indent=1))
    return result


def peer_variants(keys: list[str], tome_r: int | None, target: float, extra: list[str]) -> dict:
    """The requested peers with their knob solved for `target` image GFLOPs (the DTP fixed k=4 Hilbert
    tower's), under the runs' extra overrides."""
    out = {}
    for key in [k for k in keys if k in PEER_KEYS]:
        label, candidates, overrides_for = PEERS[key]
        value = (tome_r if key == "tome" and tome_r is not None
                 else matched_knob(candidates, overrides_for, target, GEOMETRY + extra)[0])
        out[key] = (label.format(value), overrides_for(value))
        print(f"{out[key][0]}: matched to {target:.4f} image GFLOPs of {DTP_VARIANTS[MATCH_TO][0]}", flush=True)
    return out


def dataset_overrides(name: str, cifar: str) -> tuple[list[str], int]:
    """A dataset's overrides and its training images (for the evaluation spacing), as its task counts
    them (Task.epoch_samples: what the test and validation splits leave to training)."""
    overrides = ["dataset=image_folder", f"dataset.path={cifar}"] if name == "cifar10" else list(DATASETS[name])
    return overrides, build_task(compose_train_config(overrides), torch.device("cpu")).epoch_samples()


def summarize(label: str, results: list[dict | None]) -> dict:
    """The row of one variant: each metric's mean over the seeds that finished, each seed's top-1
    ("-": failed or not finished), and the mean top-1 at each evaluation."""
    done = [r for r in results if r is not None]
    if not done:
        return {"variant": label, "top1_per_seed": per_seed([None] * len(results))}
    keys = [k for k in done[0]["metrics"] if all(k in r["metrics"] for r in done)]
    row = {"variant": label, **{k: statistics.mean(r["metrics"][k] for r in done) for k in keys},
           "wall_s": statistics.mean(r["wall_s"] for r in done)}
    row["top1_per_seed"] = per_seed([None if r is None else r["metrics"]["zeroshot/top1"] for r in results])
    curves = [[e["val/zeroshot_top1"] for e in r["evals"]] for r in done]
    row["top1_curve"] = " / ".join(f"{statistics.mean(c):.3f}" for c in zip(*curves))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datasets", default="cifar10", help="comma-separated of cifar10, digits")
    ap.add_argument("--data", default=str(CIFAR), help="CIFAR-10 test set as class folders")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds; top-1 is their mean")
    ap.add_argument("--evals", type=int, default=3, help="evaluations spread over the run")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once on the device (their times are then shared)")
    ap.add_argument("--workers", type=int, default=8, help="loader workers per run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", default="vanilla,fixed_hilbert,tome,gumbel_r1_hilbert_stride",
                    help=f"variants, in this order, of {', '.join([*VARIANTS, *PEER_KEYS])}")
    ap.add_argument("--tome-r", type=int, default=None, help="ToMe merge rate (default: matched to fixed k=4 Hilbert)")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, e.g. boundary.image_pool=cls")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/gpu_recipe"))
    args = ap.parse_args(argv)
    keys, seeds, datasets = args.only.split(","), [int(s) for s in args.seeds.split(",")], args.datasets.split(",")
    unknown = [k for k in keys if k not in VARIANTS and k not in PEER_KEYS]
    if unknown:
        raise SystemExit(f"--only {args.only!r}: unknown {unknown}; choose from {[*VARIANTS, *PEER_KEYS]}")
    bad = [d for d in datasets if d not in DATASETS]
    if bad:
        raise SystemExit(f"--datasets {args.datasets!r}: unknown {bad}; choose from {list(DATASETS)}")
    # vanilla's and fixed k's counts do not depend on the weights: the columns' reference and the peers' target
    vanilla_gflops = tower_gflops(VARIANTS["vanilla"][1], GEOMETRY + list(args.set))
    target = tower_gflops(DTP_VARIANTS[MATCH_TO][1], GEOMETRY + list(args.set))
    variants = {**VARIANTS, **peer_variants(keys, args.tome_r, target, list(args.set))}
    device = runtime.pick_device(args.device)
    header = (f"{args.steps} steps, seeds {args.seeds}, batch 128, vit_tiny patch 4 (64 patches, 4 blocks), device "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {args.jobs} run(s) at a time")
    plans = {}
    for ds in datasets:
        data, train_images = dataset_overrides(ds, args.data)
        every = max(1, args.steps // max(1, train_images // 128) // args.evals)
        plans[ds] = (every, data + GEOMETRY + [
            *schedule(args.steps, warmup=20), "epochs=100000", f"eval.every_epochs={every}", "trainer.progress=false",
            f"trainer.num_workers={args.workers}", f"device={args.device}"])
    # seed-major: a run cut short by a time limit still leaves every row's first seeds
    jobs = [(ds, key, seed) for seed in seeds for ds in datasets for key in keys]
    results = {job: None for job in jobs}
    args.out.mkdir(parents=True, exist_ok=True)
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_job, plans[ds][1] + variants[key][1] + [f"seed={seed}"] + list(args.set),
                               str(args.out / ds / key / f"seed{seed}"), args.device): (ds, key, seed)
                   for ds, key, seed in jobs}
        for future in cf.as_completed(futures):
            ds, key, seed = job = futures[future]
            try:
                results[job] = r = future.result()
                print(f"== {ds} {variants[key][0]} seed {seed}: top1 {r['metrics']['zeroshot/top1']:.3f} at "
                      f"{[round(e['val/zeroshot_top1'], 3) for e in r['evals']]} (validation), image GFLOPs "
                      f"{r['metrics']['efficiency/image_gflops']:.4f} ({r['wall_s']:.0f} s)", flush=True)
            except Exception:  # a run that raises costs its row's seed (a killed worker breaks the pool)
                print(f"== {ds} {variants[key][0]} seed {seed}: FAILED\n{traceback.format_exc()}", flush=True)
            # rewritten after every run: a time limit leaves the table of the runs that finished
            text = "\n\n".join(section(ds, plans[ds][0], keys, variants, results, seeds, header, vanilla_gflops, target)
                                 for ds in datasets)
            (args.out / "table.md").write_text(text + "\n")
    print(text, flush=True)


def section(ds: str, every: int, keys: list[str], variants: dict, results: dict, seeds: list[int], header: str,
            vanilla_gflops: float, target: float) -> str:
    """One dataset's table (runs not finished count as missing seeds) and its ranking at the target
    image GFLOPs; GFLOPs ratios against vanilla's count, top-1 deltas against the vanilla row if it ran."""
    rows = []
    for key in keys:
        runs = [results[ds, key, s] for s in seeds]
        rows.append({"key": key, **summarize(variants[key][0], runs)})
        if key == "patch_dropout" and "zeroshot/top1_all_patches" in rows[-1]:
            rows[-1]["top1_all_patches_per_seed"] = per_seed(
                [None if r is None else r["metrics"]["zeroshot/top1_all_patches"] for r in runs])
            rows.append({**all_patches_row(rows[-1], vanilla_gflops), "key": "patch_dropout_all_patches"})
    vanilla = next((r for r in rows if r["key"] == "vanilla" and "zeroshot/top1" in r), None)
    for row in rows:
        if "efficiency/image_gflops" in row:
            row["gflops_ratio"] = row["efficiency/image_gflops"] / vanilla_gflops
            if vanilla is not None:
                row["top1_delta"] = 100 * (row["zeroshot/top1"] - vanilla["zeroshot/top1"])
    text = f"### {ds}: {header}, evals every {every} epochs\n\n" + markdown_table(rows, [
        ("variant", "variant", "s"), ("zero-shot top-1", "zeroshot/top1", ".3f"), ("Δ top-1 (pts)", "top1_delta", "+.1f"),
        ("top-1 per seed", "top1_per_seed", "s"), ("validation top-1 at each eval (mean)", "top1_curve", "s"),
        ("top-1, boundaries swapped between images", "zeroshot/top1_shuffled_placement", ".3f"),
        ("image GFLOPs", "efficiency/image_gflops", ".4f"), ("GFLOPs / vanilla", "gflops_ratio", ".2f"),
        ("achieved compression", "efficiency/compression_image", ".2f"),
        ("median step (s)", "time/step_median_s", ".4f"), ("of which data wait (s)", "time/data_median_s", ".4f"),
        ("wall (s)", "wall_s", ".0f")])
    finished = [r for r in rows if "gflops_ratio" in r]
    return text + ("\n\n" + ranking(finished, target) if finished else "")


if __name__ == "__main__":
    main()
