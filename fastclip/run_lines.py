"""The lines a training run prints about itself (fastclip.train): its plan before the first step, and
its final numbers and objective after the last."""
import logging
from pathlib import Path

from omegaconf import DictConfig

from fastclip.compression.base import TWIN_SUFFIXES, twin_label
from fastclip.eval.names import CLASS_COUNT_METRIC, OBJECTIVE_METRICS, chance_level

log = logging.getLogger("fastclip")


def objective(metrics: dict) -> tuple[str, float] | None:
    """(name, value) of the run's objective, what a sweeper optimises: the first of OBJECTIVE_METRICS
    the run logged (val/zeroshot_top1, val/i2t_r1, val/bpc), None when it logged none."""
    key = next((k for k in OBJECTIVE_METRICS if k in metrics), None)
    return None if key is None else (key, metrics[key])


def objective_line(metrics: dict, compression: str = "none") -> str:
    """The run's last console line: `objective val/zeroshot_top1 = 0.9500 (validation split, what a
    sweep optimises; the final numbers above are the test split's)`. After compression the objective
    is still the trained model's (per-epoch evaluation comes before the compression step)."""
    key, value = objective(metrics)
    trained = f"the trained model's, before compression={compression}; " if compression != "none" else ""
    return (f"objective {key} = {value:.4f} ({trained}validation split, what a sweep optimises; the final numbers "
            f"above are the test split's)")


# how the final line names the loop's own twins where the suffix alone would mislead
LOOP_TWINS = {"reduced": "reduced, just before the full-token phase,"}


def final_line(key: str, metrics: dict) -> str:
    """The run's last word on a headline metric, with its twins: `final zeroshot/top1 = 0.4900 (dense
    0.5000; the trained model's: all_patches 0.5200, placement_gain +0.0100; chance 0.10)`, chance being
    what guessing scores on a top-K accuracy (eval.names.chance_level: K / zeroshot/classes). After compression=quant
    (a *_dense twin) the key is the compressed model's, but the loop's own twins (all_patches,
    shuffled_placement, placement_gain) were measured on the model as trained, before the compression
    step, and say so. A oneshot prune's *_before_prune is the model at the step it was pruned (fewer
    steps trained), and says that step: `(before pruning, at step 80: 0.5000)`."""
    twins = {k[len(key) + 1:]: v for k, v in metrics.items() if k.startswith(key + "_") and isinstance(v, float)}
    said = lambda names: ", ".join(f"{n} {twins[n]:+.4f}" if n.endswith("_gain") else  # noqa: E731
                                   f"{LOOP_TWINS.get(n) or twin_label(n, metrics)} {twins[n]:.4f}" for n in names)
    compared = [n for n in twins if n in TWIN_SUFFIXES]
    loop = [n for n in twins if n not in compared]
    parts = ([said(compared)] if compared else []) + (
        [("the trained model's: " if "dense" in twins else "") + said(loop)] if loop else [])
    chance = chance_level(key, metrics.get(CLASS_COUNT_METRIC))
    parts += [f"chance {chance:.2f}"] if chance is not None else []
    return f"final {key} = {metrics[key]:.4f}" + (f" ({'; '.join(parts)})" if parts else "")


def log_plan(task, trainer, cfg: DictConfig, run_dir: Path) -> None:
    """The run's first lines: its data and its plan (steps, batches, schedule, full-token phase)."""
    sizes = task.sizes()
    log.info("data: %s", ", ".join(f"{k} {v}" for k, v in sizes.items()) or "?")
    world = trainer.world.size
    log.info("plan: %d steps (%d per epoch = %d batches of %d%s / accum %d, %d epochs%s; each step's loss over a "
             "global batch of %d), from step %d: %s%s; run dir %s",
             trainer.total_steps, trainer.steps_per_epoch, trainer.batches_per_epoch, cfg.trainer.batch_size,
             f" per process x {world} processes" if world > 1 else "", trainer.accum, cfg.epochs,
             f", max_steps {cfg.trainer.max_steps}" if cfg.trainer.max_steps else "",
             cfg.trainer.batch_size * world * trainer.accum, trainer.state.step,
             trainer.schedule.describe(trainer.state.step), _phase_plan(trainer), run_dir)


def _phase_plan(trainer) -> str:
    """The plan line's word on trainer.full_token_steps: its steps and where it starts, or nothing."""
    phase = trainer.phase
    if not phase.steps:
        return ""
    budget = " (or earlier, once only its planned compute is left of trainer.max_pflops)" if trainer.max_pflops else ""
    return (f"; the last {phase.steps} steps at full tokens (trainer.full_token_steps), from step {phase.start}"
            f"{budget}")
