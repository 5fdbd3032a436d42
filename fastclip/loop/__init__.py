"""The training loop every task shares: AdamW, warm-up + cosine, clipping, accumulation, mixed
precision, the NaN guard, and checkpoints that resume exactly.

    fit.py            fit(): the loop, top to bottom
    trainer.py        Trainer: optimizer, schedule, accumulation, the checkpoint round trip
    state.py          TrainState: where a run is (what a resume needs beyond the weights)
    steplog.py        StepLog (per-step scalars read from the device only when logged), StepTimer
    accounting.py     skipped samples, the trained fraction, data/* metrics, NoTrainingData
    checkpointing.py  when the checkpoint is written and what it records (the format: fastclip/checkpoint.py)
    compute.py        training compute counted: efficiency/train_gflops, train_pflops_total, max_pflops
    signals.py        stop requests (Ctrl-C, SIGTERM, SIGUSR2); loader workers': fastclip/worker_signals.py
    divergence.py     TrainingDiverged: a non-finite loss or weight stops the run
    evaluation.py     the task's evaluations inside a run, timed and logged

What the loop may ask of a task is fastclip.tasks.protocol.Task; its StepOutput is re-exported here."""
from fastclip.loop.accounting import LEFT_OVER, NoTrainingData, check_epoch_data, data_metrics
from fastclip.loop.checkpointing import CheckpointPolicy, save
from fastclip.loop.compute import TrainingCompute, probe_gflops
from fastclip.loop.divergence import TrainingDiverged, diverged
from fastclip.loop.evaluation import evaluate, final_evaluation
from fastclip.loop.fit import fit
from fastclip.loop.signals import RunInterrupted, StopRequests, stopped
from fastclip.loop.state import TrainState
from fastclip.loop.steplog import StepLog, StepTimer
from fastclip.loop.trainer import Accumulation, Trainer
from fastclip.tasks.protocol import StepOutput

__all__ = ["Accumulation", "CheckpointPolicy", "LEFT_OVER", "NoTrainingData", "RunInterrupted", "StepLog",
           "StepOutput", "StepTimer", "StopRequests", "TrainState", "Trainer", "TrainingDiverged",
           "check_epoch_data", "data_metrics", "diverged", "evaluate", "final_evaluation", "fit",
           "probe_gflops", "save", "stopped", "TrainingCompute"]
