"""Per-step logging that does not stall the device (StepLog) and the step's time split into data
wait and compute (StepTimer)."""
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from fastclip import distributed
from fastclip.eval.names import step_metric_name, summed_over_ranks
from fastclip.loop.divergence import diverged
from fastclip.loop.state import TrainState

log = logging.getLogger(__name__)
HEARTBEAT_S = 30.0  # without a progress bar (trainer.progress=false, a sweep's jobs), a line this often



class StepLog:
    """Per-step training scalars (loss, lr, the task's metrics, whether the loss was finite) kept
    on the device until drain(): a log step, a checkpoint, the end of an epoch. Then they come to
    the host in one transfer per device (each read of a device tensor makes the host wait for
    the GPU's queue to drain; open_clip_train, likewise, reads its loss at log steps only)."""

    def __init__(self, tracker, every: int, bar, checkpoint_path: Path, heading=lambda: ""):
        """heading: () -> what the heartbeat line starts with, read at each heartbeat (a sweep job's
        "job 2 (3 of 6; 2 done)": parallel jobs end meanwhile)."""
        self.tracker, self.every, self.bar, self.checkpoint_path = tracker, max(1, int(every)), bar, checkpoint_path
        self.heading = heading
        self._rows: list[tuple[int, int, torch.Tensor | bool, dict]] = []
        self._window = (0, time.perf_counter())  # steps since the last drain, and its start
        self._said = time.perf_counter()  # the last heartbeat line

    def add(self, state: TrainState, loss: torch.Tensor, finite: torch.Tensor, lr: float, metrics: dict) -> None:
        """The step just taken: its loss and metrics over all its micro-batches (Accumulation.logged),
        and whether every micro-batch loss of the step was finite (a device tensor: read at the next
        drain, not now)."""
        self._rows.append((state.step - 1, state.epoch, finite,
                           {"train/loss": loss.detach(), "train/lr": lr,
                            **{step_metric_name(k): v for k, v in metrics.items()}}))
        self._window = (self._window[0] + 1, self._window[1])

    def fetch(self) -> list[tuple[int, int, bool, dict[str, float]]]:
        """-> [(step, epoch, finite, {name: float})], oldest first; empties the buffer. Data-parallel:
        each value is the mean over ranks (the contrastive loss is the global batch's on every rank,
        a boundary loss or a compression is each rank's own), a count the sum (summed_over_ranks:
        boundaries dropped on each rank's share of the global batch), finite only where every rank's was."""
        pairs = [(v, name is not None and summed_over_ranks(name)) for _, _, finite, values in self._rows
                 for name, v in ((None, finite), *values.items()) if isinstance(v, torch.Tensor)]
        host = iter(_to_host([t for t, _ in pairs], [summed for _, summed in pairs]))

        def read(v):
            return next(host) if isinstance(v, torch.Tensor) else v
        rows = [(step, epoch, read(finite) >= 1.0, {k: float(read(v)) for k, v in values.items()})
                for step, epoch, finite, values in self._rows]
        self._rows = []
        return rows

    def drain(self) -> None:
        """Logs the buffered steps; stops at the first non-finite loss, naming its step (callers
        drain before every checkpoint, so the last one written is good)."""
        rows = self.fetch()
        bad = next((row for row in rows if not row[2]), None)
        if self.tracker:  # the steps before a non-finite one are still logged
            for index, _, _, values in rows[:rows.index(bad) if bad else len(rows)]:
                self.tracker.log_metrics(values, index + 1, flush=False)  # a step's metrics carry the count after it
            self.tracker.flush()
        if bad:
            step, epoch, _, values = bad
            loss = values["train/loss"]
            diverged(f"train/loss is {loss} at step {step} (epoch {epoch + 1})" if not math.isfinite(loss) else
                     f"a micro-batch loss of step {step} (epoch {epoch + 1}) is not finite", self.checkpoint_path)
        if rows and self.bar is not None:
            steps, t0 = self._window
            rate = steps / max(1e-9, time.perf_counter() - t0)
            self.bar.set_postfix(loss=f"{rows[-1][3]['train/loss']:.4f}", steps_s=f"{rate:.2f}")
            if self.bar.disable and self.tracker and time.perf_counter() - self._said >= HEARTBEAT_S:
                self._said = time.perf_counter()  # no bar to watch: a line, so a sweep's job is never silent long
                where = self.heading()
                log.info("%sstep %d of %d (epoch %d): train/loss %.4f, %.2f steps/s", f"{where}: " if where else "",
                         rows[-1][0] + 1, self.bar.total, rows[-1][1] + 1, rows[-1][3]["train/loss"], rate)
        self._window = (0, time.perf_counter())


def _to_host(tensors: list[torch.Tensor], summed: list[bool]) -> list[float]:
    """0-dim tensors -> Python numbers, one stack and one transfer per device (data-parallel: one
    all-reduce per device, giving the sum over ranks where `summed`, else the mean)."""
    out: list[float] = [0.0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    ranks = distributed.current().size
    for idx in by_device.values():
        values = distributed.total(torch.stack([tensors[i].detach().reshape(()).float() for i in idx])).tolist()
        for i, v in zip(idx, values):
            out[i] = v if summed[i] else v / ranks
    return out


class StepTimer:
    """Per optimizer step: the whole step (data wait included) and its data wait alone, as
    open_clip_train's batch_time / data_time; compute = step - data."""

    def __init__(self):
        self.step_times: list[float] = []
        self.data_times: list[float] = []

    def start(self) -> None:
        self.tick = self.waiting_since = time.perf_counter()
        self.data_wait = 0.0

    def arrived(self) -> None:
        self.data_wait += time.perf_counter() - self.waiting_since

    def waiting(self) -> None:
        self.waiting_since = time.perf_counter()

    def stepped(self) -> float:
        now = time.perf_counter()
        self.step_times.append(now - self.tick)
        self.data_times.append(self.data_wait)
        elapsed, self.tick, self.data_wait = now - self.tick, now, 0.0
        return elapsed

    def summary(self, state: TrainState) -> dict[str, float]:
        out = {"time/train_s": state.train_s,
               "throughput/train_samples_per_s": state.samples_seen / max(state.train_s, 1e-9),
               "efficiency/train_pflops_total": state.train_pflops,  # the run's counted training compute
               "train/steps": float(state.step),  # the optimizer steps it took (a budget's, under max_pflops)
               "train/samples": float(state.samples_seen)}
        if state.train_gflops is not None:
            out["efficiency/train_gflops"] = state.train_gflops
        if state.samples_seen:  # what the run spent a sample, on average: its cost where runs are compared
            out["efficiency/train_gflops_mean"] = state.train_pflops * 1e6 / state.samples_seen
        if self.step_times:
            out["time/step_median_s"] = float(np.median(self.step_times))
            out["time/data_median_s"] = float(np.median(self.data_times))
            out["time/compute_median_s"] = float(np.median(np.subtract(self.step_times, self.data_times)))
        return out
