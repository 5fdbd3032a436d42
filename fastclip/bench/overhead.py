"""Harness overhead: our training step (fastclip.loop.fit, MLflow logging included) against
open_clip_train's train_one_epoch on the same model, data, optimizer (same AdamW kernel) and schedule,
alternated in one process (ABBA order, so a drifting machine favours neither), after one untimed
run of each. Per repeat the ratio ours / theirs; the overhead is the median ratio - 1, with the
repeats' range next to it (this 2-core machine drifts by several percent between runs).

    python -m fastclip.bench.overhead [--epochs 10] [--repeats 7]

Two readings of ours: `steps` sums fit's own per-step times (data wait included), as
train_one_epoch's wall time counts its steps; `whole fit` is fit's wall time without the task's
evaluations (fit(evaluation=False)), i.e. also the epoch-end metric logging, the per-epoch
checkpoint and the set-up.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from fastclip import runtime
from fastclip.loop import fit
from fastclip.optim import adamw_impl, param_groups, warmup_steps
from fastclip.tasks import build_task
from fastclip.tracking import Tracker


class ThreeKeys(nn.Module):
    """open_clip_train's loss(**model_out) takes exactly these keys."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.logit_scale = model.logit_scale

    def forward(self, images, texts):
        out = self.model(images, texts)
        return {k: out[k] for k in ("image_features", "text_features", "logit_scale")}


class EpochBatches:
    """What open_clip_train's train_one_epoch reads of its loader (data['train'].dataloader): the
    batches, num_batches and num_samples; iteration is the task's loader's own, each batch's uint8
    images normalised as fastclip's step does it (normalize: the task's DeviceNormalize), so both loops
    pay for the same work."""

    def __init__(self, batches, batch_size: int, normalize):
        self.batches, self.num_batches, self.num_samples = batches, len(batches), len(batches) * batch_size
        self.normalize = normalize

    def __iter__(self):
        return ((self.normalize(images), texts) for images, texts in self.batches if images is not None)


def open_clip_train_step_s(cfg, steps: int) -> tuple[float, nn.Module]:
    """(wall time of train_one_epoch per step, the trained model)."""
    from open_clip import ClipLoss
    from open_clip_train.data import DataInfo
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    runtime.seed_everything(cfg.seed)
    task = build_task(cfg, torch.device("cpu"))
    model = ThreeKeys(task.model)
    tc = cfg.trainer
    # open_clip_train's own param groups (no decay on gains, biases, logit scale) are ours
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.lr), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
                                  **adamw_impl(tc.optimizer_impl))
    args = SimpleNamespace(device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False,
                           horovod=False, grad_clip_norm=tc.grad_clip, log_every_n_steps=10 ** 9, world_size=1,
                           batch_size=tc.batch_size, rank=0, local_rank=0, wandb=False, save_logs=False)
    scheduler = cosine_lr(optimizer, tc.lr, warmup_steps(tc.warmup_steps, steps * cfg.epochs), steps * cfg.epochs)
    elapsed = 0.0
    for epoch in range(cfg.epochs):
        loader = EpochBatches(task.train_batches(epoch), tc.batch_size, task.normalize)
        t0 = time.perf_counter()
        train_one_epoch(model, {"train": DataInfo(loader)}, ClipLoss(), epoch, optimizer, None, scheduler, None, args)
        elapsed += time.perf_counter() - t0
    return elapsed / (steps * cfg.epochs), task.model


def fastclip_step_s(cfg, run_dir) -> tuple[float, float, nn.Module]:
    """(steps: fit's summed step times, whole: fit's wall time), each per step, and the trained model."""
    runtime.seed_everything(cfg.seed)
    task = build_task(cfg, torch.device("cpu"))
    steps = len(task.train_batches(0)) * cfg.epochs
    with tempfile.TemporaryDirectory() as store:
        tracker = Tracker(f"sqlite:///{store}/m.db", "overhead")
        t0 = time.perf_counter()
        metrics = fit(task, cfg, tracker, run_dir, torch.device("cpu"), evaluation=False)  # the training, as train_one_epoch
        whole = time.perf_counter() - t0
        tracker.end()
    return metrics["time/train_s"] / steps, whole / steps, task.model


def measure(cfg, run_dir, repeats: int = 7, warmup: bool = True) -> dict:
    steps = len(build_task(cfg, torch.device("cpu")).train_batches(0))
    if warmup:  # first runs in a process pay for thread pools, allocator growth, lazy imports
        open_clip_train_step_s(cfg, steps)
        fastclip_step_s(cfg, run_dir)
    ours, whole, theirs = [], [], []
    for i in range(repeats):
        if i % 4 in (0, 3):
            theirs.append(open_clip_train_step_s(cfg, steps)[0])
            o, w, _ = fastclip_step_s(cfg, run_dir)
        else:
            o, w, _ = fastclip_step_s(cfg, run_dir)
            theirs.append(open_clip_train_step_s(cfg, steps)[0])
        ours.append(o)
        whole.append(w)
    def overhead(mine: list[float]) -> tuple[float, tuple[float, float]]:
        """Per-repeat ratios to theirs -> (median - 1, (min - 1, max - 1))."""
        ratios = [m / t - 1.0 for m, t in zip(mine, theirs)]
        return statistics.median(ratios), (min(ratios), max(ratios))

    (steps_o, steps_range), (whole_o, whole_range) = overhead(ours), overhead(whole)
    return {"fastclip_step_s": statistics.median(ours), "fastclip_whole_s": statistics.median(whole),
            "open_clip_train_step_s": statistics.median(theirs),
            "overhead": steps_o, "overhead_range": steps_range,
            "overhead_whole": whole_o, "overhead_whole_range": whole_range,
            "steps": steps * cfg.epochs, "repeats": repeats}


def markdown(o: dict) -> str:
    pct = lambda x: f"{100 * x:+.1f}%"
    span = lambda r: f"{pct(r[0])} .. {pct(r[1])}"
    return (f"### harness overhead (vit_tiny on digits, vanilla, {o['steps']} steps a run, "
            f"{o['repeats']} ABBA-alternated repeats after an untimed one of each)\n\n"
            f"| loop | median s/step | overhead vs open_clip_train (median of per-repeat ratios) | repeats' range |\n"
            f"|---|---|---|---|\n"
            f"| open_clip_train.train_one_epoch | {o['open_clip_train_step_s']:.4f} | | |\n"
            f"| fastclip.loop.fit, steps (MLflow logging on) | {o['fastclip_step_s']:.4f} | {pct(o['overhead'])} | "
            f"{span(o['overhead_range'])} |\n"
            f"| fastclip.loop.fit, whole fit (+ epoch-end logging, checkpoints, set-up) | {o['fastclip_whole_s']:.4f} | "
            f"{pct(o['overhead_whole'])} | {span(o['overhead_whole_range'])} |")


def main(argv=None):
    from fastclip import PROJECT_ROOT
    from fastclip.bench.common import emit
    from fastclip.config import compose_train_config
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10, help="digits epochs per timed run (10 steps each)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench" / "overhead.md"))
    args = ap.parse_args(argv)
    cfg = compose_train_config([f"epochs={args.epochs}", "trainer.progress=false"])
    with tempfile.TemporaryDirectory() as run_dir:
        emit(markdown(measure(cfg, Path(run_dir), args.repeats)), Path(args.out))


if __name__ == "__main__":
    main()
