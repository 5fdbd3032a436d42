"""A task builds model + data from the config and says what a loss and an evaluation are."""
from fastclip.errors import InputError


def build_task(cfg, device, run_dir=None):
    if cfg.task.name == "clip":
        from fastclip.tasks.clip import ClipTask
        return ClipTask(cfg, device, run_dir)
    if cfg.task.name == "lm":
        from fastclip.tasks.lm import LMTask
        return LMTask(cfg, device, run_dir)
    raise InputError(f"task.name={cfg.task.name!r}: expected clip or lm")
