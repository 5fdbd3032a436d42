"""The training loop every task shares: AdamW, warmup + cosine, clipping, accumulation,
mixed precision, NaN guard, checkpoints that resume exactly (lr schedule included).

A task supplies: .model, .train_batches(epoch) (a sized iterable of micro-batches),
.loss(batch) -> (loss, {metric: float or 0-dim tensor}, n_samples), .evaluate() -> {metric: float},
and optionally .final_evaluate() -> {metric: float}. Tensor metrics stay on the device until the
loop reads them (see StepScalars).
"""
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastclip import runtime

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def boundary_decision_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that decide where boundaries go: every BoundaryPredictor's, and the
    stride start's per-position logits (vision tower, `position_logits`)."""
    from fastclip.models.dtp import BoundaryPredictor
    ids = {id(p) for m in model.modules() if isinstance(m, BoundaryPredictor) for p in m.parameters()}
    return ids | {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "position_logits"}


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, predictor_lr_scale: float = 1.0):
    """No decay on gains, biases, embeddings' scale and the logit scale (as open_clip_train).
    The boundary predictors' parameters learn at lr x predictor_lr_scale (their only task signal
    is the straight-through estimate through the pooling, and in CLIP towers they stayed near the
    prior: README)."""
    if predictor_lr_scale <= 0:
        raise ValueError(f"trainer.predictor_lr_scale={predictor_lr_scale}: expected > 0")
    deciding = boundary_decision_parameters(model) if predictor_lr_scale != 1.0 else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        groups.setdefault((id(p) in deciding, skip), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if skip else weight_decay,
             "lr": lr * (predictor_lr_scale if predictor else 1.0)}
            for (predictor, skip), params in sorted(groups.items())]


ADAMW_IMPLS = ("fused", "foreach", "for_loop")


def adamw_impl(name: str) -> dict:
    """torch AdamW's implementation switch. fused: one kernel over all parameters; on 2 CPU cores it
    stepped 5.3M parameters (vit_tiny CLIP, mostly the BPE embedding) in 7 ms vs 48 ms for the
    per-parameter loop (foreach: 22 ms)."""
    if name not in ADAMW_IMPLS:
        raise ValueError(f"trainer.optimizer_impl={name!r}: expected one of {', '.join(ADAMW_IMPLS)}")
    return {"fused": name == "fused", "foreach": name == "foreach"}


class StepScalars:
    """Per-step training scalars (loss, lr, the task's metrics, whether every loss was finite) kept
    on the device until the loop needs them: a log flush, a checkpoint, the end of an epoch. Then
    they come to the host in one transfer per device. Reading each with .item() as it is made
    would sync the host with the GPU several times a step (four of them before backward), and
    each sync drains the GPU's queue (open_clip_train, likewise, reads its loss at log steps only)."""

    def __init__(self):
        self._rows: list[tuple[int, int, torch.Tensor | bool, dict]] = []

    def add(self, step: int, epoch: int, finite, values: dict) -> None:
        self._rows.append((step, epoch, finite, values))

    def fetch(self) -> list[tuple[int, int, bool, dict[str, float]]]:
        """-> [(step, epoch, finite, {name: float})], oldest first; empties the buffer."""
        tensors = [v for _, _, finite, values in self._rows for v in (finite, *values.values())
                   if isinstance(v, torch.Tensor)]
        host = iter(_to_host(tensors))

        def read(v):
            return next(host) if isinstance(v, torch.Tensor) else v
        rows = [(step, epoch, bool(read(finite)), {k: float(read(v)) for k, v in values.items()})
                for step, epoch, finite, values in self._rows]
        self._rows = []
        return rows


def _to_host(tensors: list[torch.Tensor]) -> list[float]:
    """0-dim tensors -> Python numbers, one stack and one transfer per device."""
    out: list[float] = [0.0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        values = torch.stack([tensors[i].detach().reshape(()).float() for i in idx]).tolist()
        for i, v in zip(idx, values):
            out[i] = v
    return out


def plan_steps(steps_per_epoch: int, epochs: int, max_steps) -> int:
    total = steps_per_epoch * epochs
    return min(total, max_steps) if max_steps else total


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash while writing never leaves a half-written last.pt behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def fit(task, cfg, tracker, run_dir: Path, device: torch.device) -> dict[str, float]:
    tc = cfg.trainer
    model = task.model
    accum = int(tc.accum_steps)
    if accum < 1:
        raise ValueError(f"trainer.accum_steps={accum}: expected >= 1")
    steps_per_epoch = len(task.train_batches(0)) // accum
    if steps_per_epoch == 0:
        raise ValueError(f"trainer.batch_size={tc.batch_size} x accum_steps={accum} leaves no full step per epoch")
    total_steps = plan_steps(steps_per_epoch, cfg.epochs, tc.max_steps)

    if tc.compile:
        runtime.compile_blocks(model)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.lr, tc.predictor_lr_scale), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
                                  **adamw_impl(tc.optimizer_impl))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(tc.warmup_steps, total_steps))
    amp_dtype = runtime.autocast_dtype(tc.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ckpt_path = Path(run_dir) / "checkpoints" / "last.pt"

    step, epoch, skip_batches, train_s, samples_seen = 0, 0, 0, 0.0, 0
    if tc.resume:
        state = torch.load(tc.resume, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, skip_batches = state["step"], state["epoch"], state["batch_in_epoch"]
        train_s, samples_seen = state["train_s"], state["samples_seen"]
        runtime.set_rng_state(state["rng"])
        if hasattr(task, "load_state_dict"):
            task.load_state_dict(state.get("task", {}))
        log.info("resumed from %s at step %d (epoch %d, batch %d), lr %.3g", tc.resume, step, epoch,
                 skip_batches, scheduler.get_last_lr()[0])

    def checkpoint(batch_in_epoch: int, epoch_now: int):
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "epoch": epoch_now, "batch_in_epoch": batch_in_epoch,
            "train_s": train_s, "samples_seen": samples_seen, "rng": runtime.rng_state(),
            "mlflow_run_id": tracker.run_id if tracker else None, "config": cfg_container(cfg),
            "task": task.state_dict() if hasattr(task, "state_dict") else {}})

    scalars = StepScalars()
    log_every = max(1, int(cfg.tracking.get("log_every", 10)))

    def drain():
        """Reads the buffered step scalars: stops at the first non-finite loss, naming its step
        (callers drain before any checkpoint, so the last one written is good), else logs them."""
        rows = scalars.fetch()
        bad = next((row for row in rows if not row[2]), None)
        if tracker:  # the steps before a non-finite one are still logged
            for index, _, _, values in rows[:rows.index(bad) if bad else len(rows)]:
                tracker.log_metrics(values, index + 1, flush=False)  # a step's metrics carry the count after it
            tracker.flush()
        if bad:
            bad_step, bad_epoch, _, values = bad
            kept = f"last good checkpoint kept at {ckpt_path}" if ckpt_path.exists() else "no checkpoint written yet"
            raise TrainingDiverged(f"train/loss is {values['train/loss']} at step {bad_step} (epoch {bad_epoch}); "
                                   f"stopping; {kept}")
        if rows:
            rate = window_samples / max(1e-9, time.perf_counter() - window_t0)
            bar.set_postfix(loss=f"{rows[-1][3]['train/loss']:.4f}", samples_s=f"{rate:.0f}")

    metrics: dict[str, float] = {}
    # Per optimizer step: the whole step (data wait included) and its data wait alone, as
    # open_clip_train's batch_time / data_time; compute = step - data.
    step_times: list[float] = []
    data_times: list[float] = []
    bar = tqdm(total=total_steps, initial=step, disable=not tc.progress, desc="train", dynamic_ncols=True)
    model.train()
    while step < total_steps and epoch < cfg.epochs:
        batches = task.train_batches(epoch)
        micro, window_samples, window_t0 = 0, 0, time.perf_counter()
        finite = True  # every micro-batch loss of the current step finite (a device tensor once set)
        tick = time.perf_counter()  # train_s counts data loading and steps, not evaluation
        fetched_at, data_wait = tick, 0.0
        for i, batch in enumerate(batches):
            if i < skip_batches * accum:
                tick = fetched_at = time.perf_counter()
                continue
            arrived = time.perf_counter()
            data_wait += arrived - fetched_at
            with runtime.autocast(device, amp_dtype):
                result = task.loss(batch)
            if result is None:  # a batch whose every sample was bad (the task counted them)
                fetched_at = time.perf_counter()
                continue
            loss, extras, n = result
            finite = torch.isfinite(loss.detach()) & finite  # read at the next drain(), not here (no sync)
            scaler.scale(loss / accum).backward()
            micro += 1
            samples_seen += n
            window_samples += n
            if micro % accum == 0:
                if tc.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                scalars.add(step, epoch, finite, {"train/loss": loss.detach(), "train/lr": scheduler.get_last_lr()[0],
                                                  **{f"train/{k}": v for k, v in extras.items()}})
                finite = True
                step += 1
                now = time.perf_counter()
                train_s += now - tick
                step_times.append(now - tick)
                data_times.append(data_wait)
                tick, data_wait = now, 0.0
                bar.update(1)
                checkpoint_now = bool(tc.ckpt_every_steps) and step % tc.ckpt_every_steps == 0
                if step % log_every == 0 or checkpoint_now:  # the last step: the epoch-end drain below
                    drain()
                if checkpoint_now:
                    checkpoint((i + 1) // accum, epoch)
                if step >= total_steps:
                    break
            fetched_at = time.perf_counter()
        drain()  # before this epoch's evaluation and checkpoint
        skip_batches = 0
        epoch += 1
        end_of_run = step >= total_steps or epoch >= cfg.epochs
        if end_of_run or epoch % cfg.eval.every_epochs == 0:
            metrics = evaluate(task, tracker, step, epoch)
        checkpoint(0, epoch)
    bar.close()
    if not metrics:  # resumed from a finished run: still report its numbers
        metrics = evaluate(task, tracker, step, epoch)
    if hasattr(task, "final_evaluate"):
        final = task.final_evaluate()
        metrics.update(final)
        if tracker:
            tracker.log_metrics(final, step)
    summary = {"time/train_s": train_s,
               "throughput/train_samples_per_s": samples_seen / max(train_s, 1e-9)}
    if step_times:
        summary["time/step_median_s"] = float(np.median(step_times))
        summary["time/data_median_s"] = float(np.median(data_times))
        summary["time/compute_median_s"] = float(np.median(np.subtract(step_times, data_times)))
    metrics.update(summary)
    if tracker:
        tracker.log_metrics(summary, step)
    return metrics


def evaluate(task, tracker, step: int, epoch: int) -> dict[str, float]:
    t0 = time.perf_counter()
    metrics = task.evaluate()
    metrics["time/eval_s"] = time.perf_counter() - t0
    log.info("epoch %d step %d: %s", epoch, step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if tracker:
        tracker.log_metrics({**metrics, "epoch": epoch}, step)
        for path in task.new_artifacts() if hasattr(task, "new_artifacts") else []:
            tracker.log_artifact(path, "boundaries")
    return metrics


def cfg_container(cfg):
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True)
