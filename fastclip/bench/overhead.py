"""Harness overhead: our training step (fastclip.loop.fit, MLflow logging included) against
open_clip_train's train_one_epoch on the same model, data, optimizer (same AdamW kernel) and schedule, alternated
in one process; mean seconds per step, median over repeats."""
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
from torch import nn

from fastclip import runtime
from fastclip.loop import adamw_impl, fit
from fastclip.tasks.clip import ClipTask
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


def open_clip_train_step_s(cfg, steps: int) -> float:
    from open_clip import ClipLoss
    from open_clip_train.data import DataInfo
    from open_clip_train.scheduler import cosine_lr
    from open_clip_train.train import train_one_epoch

    runtime.seed_everything(cfg.seed)
    task = ClipTask(cfg, torch.device("cpu"))
    model = ThreeKeys(task.model)
    tc = cfg.trainer
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
                                  weight_decay=tc.weight_decay, **adamw_impl(tc.optimizer_impl))
    args = SimpleNamespace(device="cpu", precision="fp32", distill=False, accum_freq=1, skip_scheduler=False,
                           horovod=False, grad_clip_norm=tc.grad_clip, log_every_n_steps=10 ** 9, world_size=1,
                           batch_size=tc.batch_size, rank=0, local_rank=0, wandb=False, save_logs=False)
    scheduler = cosine_lr(optimizer, tc.lr, tc.warmup_steps, steps * cfg.epochs)
    elapsed = 0.0
    for epoch in range(cfg.epochs):
        loader = task.train_batches(epoch)
        loader.num_batches, loader.num_samples = len(loader), len(loader) * tc.batch_size
        t0 = time.perf_counter()
        train_one_epoch(model, {"train": DataInfo(loader)}, ClipLoss(), epoch, optimizer, None, scheduler, None, args)
        elapsed += time.perf_counter() - t0
    return elapsed / (steps * cfg.epochs)


def fastclip_step_s(cfg, run_dir) -> float:
    runtime.seed_everything(cfg.seed)
    task = ClipTask(cfg, torch.device("cpu"))
    task.evaluate = lambda: {}  # time the training steps only, as train_one_epoch does
    with tempfile.TemporaryDirectory() as store:
        tracker = Tracker(f"sqlite:///{store}/m.db", "overhead")
        metrics = fit(task, cfg, tracker, run_dir, torch.device("cpu"))
        tracker.end()
    return metrics["time/train_s"] / (len(task.train_batches(0)) * cfg.epochs)


def measure(cfg, run_dir, repeats: int = 3) -> dict[str, float]:
    ours, theirs = [], []
    steps = len(ClipTask(cfg, torch.device("cpu")).train_batches(0))
    for _ in range(repeats):
        theirs.append(open_clip_train_step_s(cfg, steps))
        ours.append(fastclip_step_s(cfg, run_dir))
    o, t = statistics.median(ours), statistics.median(theirs)
    return {"fastclip_step_s": o, "open_clip_train_step_s": t, "overhead": o / t - 1.0,
            "steps": steps, "repeats": repeats, "all_ours": ours, "all_theirs": theirs}
