"""fastclip's one entrypoint: `python -m fastclip.train [group=option ...] [-m for grids]`.

Composes the config, checks it, opens the MLflow run (params = flattened resolved config,
tags = git commit + Hydra job), builds the task and hands it to the shared loop.
"""
import logging
import os
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from fastclip import CONF_DIR, runtime, tracking
from fastclip.loop import fit
from fastclip.tasks import build_task

log = logging.getLogger("fastclip")
# what a run reports last and a sweeper would optimise, in order of preference
HEADLINE_METRICS = ("zeroshot/top1", "zeroshot/imagenet_top1", "retrieval/i2t_r1", "lm/test_bpc")


def hydra_tags() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    tags = {"hydra.mode": str(hc.mode), "hydra.job.name": hc.job.name,
            "hydra.job.override_dirname": hc.job.override_dirname, "hydra.output_dir": hc.runtime.output_dir}
    if str(hc.mode) == "RunMode.MULTIRUN":
        sweep_dir = Path(hc.sweep.dir)
        tags.update({"hydra.job.num": str(hc.job.num), "hydra.sweep.dir": str(sweep_dir.resolve())})
        parent = sweep_dir / tracking.PARENT_RUN_FILE
        if parent.exists():
            tags["mlflow.parentRunId"] = parent.read_text().strip()
    return tags


def run_name(cfg: DictConfig, tags: dict) -> str:
    """tracking.run_name, else what the command line chose (Hydra's override_dirname), else the
    main groups. Never MLflow's random name: it draws from `random`, which the run seed fixes, so
    every run with the same seed would get the same name."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    chosen = tags.get("hydra.job.override_dirname")
    return chosen or f"{cfg.task.name} {cfg.dataset.name} {cfg.encoder.name} boundary={cfg.boundary.name}"


def run(cfg: DictConfig, run_dir: str | os.PathLike, launch_dir: str | os.PathLike | None = None) -> dict:
    """Train and evaluate one configuration; returns the final metrics."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_uri(cfg.tracking.uri, launch_dir)
    tracking.check_writable(uri)  # fail before any work, naming the path
    device = runtime.pick_device(cfg.device)
    runtime.seed_everything(cfg.seed)
    runtime.set_torch_threads(cfg.trainer.get("torch_threads"), cfg.trainer.num_workers, device)
    torch.set_float32_matmul_precision("high")

    task = build_task(cfg, device, run_dir)

    resume_run_id = None
    if cfg.trainer.resume:
        if not Path(cfg.trainer.resume).is_file():
            raise FileNotFoundError(f"trainer.resume={cfg.trainer.resume!r}: no such checkpoint file")
        resume_run_id = torch.load(cfg.trainer.resume, map_location="cpu", weights_only=False).get("mlflow_run_id")
    commit, dirty = runtime.git_commit()
    tags = {"mlflow.source.git.commit": commit, "fastclip.git_dirty": str(dirty), "fastclip.task": cfg.task.name,
            "fastclip.run_dir": str(run_dir.resolve()), **hydra_tags()}
    tracker = tracking.Tracker(uri, cfg.tracking.experiment, run_name=run_name(cfg, tags), tags=tags,
                               run_id=resume_run_id)
    tracker.log_params(tracking.flatten(cfg))
    counts = task.params() if hasattr(task, "params") else {"model.params_total": sum(
        p.numel() for p in task.model.parameters())}
    tracker.log_params({k: str(v) for k, v in counts.items()})
    resolved = run_dir / "config.yaml"
    resolved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_artifact(resolved)

    try:
        metrics = fit(task, cfg, tracker, run_dir, device)
    except BaseException as exc:
        tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")
    metrics["mlflow_run_id"] = tracker.run_id
    log.info("MLflow store: %s (run %s); view with `make ui`", uri, tracker.run_id)
    for key in HEADLINE_METRICS:
        if key in metrics:
            log.info("final %s = %.4f", key, metrics[key])
    return metrics


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    hc = HydraConfig.get()
    metrics = run(cfg, hc.runtime.output_dir, launch_dir=hc.runtime.cwd)
    # The returned value is what a sweeper would optimise.
    return next((metrics[k] for k in HEADLINE_METRICS if k in metrics), None)


if __name__ == "__main__":
    main()
