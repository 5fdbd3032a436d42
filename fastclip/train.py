"""fastclip's one entrypoint: `python -m fastclip.train [group=option ...] [-m for grids]`.

Composes the config and checks it (before torch and MLflow load), resolves a resume against its
checkpoint, builds the task, opens the MLflow run (params = flattened resolved config, tags = git
commit + Hydra job) and hands both to the shared loop.
"""
import contextlib
import logging
import os
import sys
from contextlib import ExitStack
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fastclip import CONF_DIR, run_lock, store, tracking
from fastclip.checks import ConfigError, check_config
from fastclip.override_checks import check_overrides
from fastclip.errors import InputError, show_traceback
from fastclip.eval.names import HEADLINE_METRICS
from fastclip.run_lines import final_line, log_plan, objective, objective_line
from fastclip.schema.unread import unread_keys
from fastclip.config import APPENDED_GROUPS, NAMED_GROUPS

log = logging.getLogger("fastclip")


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
        parent = tracking.sweep_parent(sweep_dir)
        if parent:
            tags["mlflow.parentRunId"] = parent
    return tags


def run_name(cfg: DictConfig, tags: dict) -> str:
    """tracking.run_name, else what the command line chose (Hydra's override_dirname), else the
    main groups. Never MLflow's random name: it draws from `random`, which the run seed fixes, so
    every run with the same seed would get the same name."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    chosen = tags.get("hydra.job.override_dirname")
    return chosen or f"{cfg.task.name} {cfg.dataset.name} {cfg.encoder.name} boundary={cfg.boundary.name}"


def run(cfg: DictConfig, run_dir: str | os.PathLike, launch_dir: str | os.PathLike | None = None,
        overrides: list[str] | None = None, choices: dict | None = None) -> dict:
    """Train and evaluate one configuration; returns the final metrics.

    overrides: the command line's overrides (Hydra's); with trainer.resume they alone apply on
    top of the checkpoint's config (None: `cfg` is the whole intended config). choices: the config
    group options cfg was composed with (recorded in checkpoints).

    Data-parallel (torchrun, or a SLURM job's tasks): every process calls this; the ranks join one
    process group first and take rank 0's run dir; only rank 0 writes (MLflow, checkpoints, the run
    dir's files), the ranks share the evaluation, and every rank returns the metrics."""
    world = device = None
    if _launched_data_parallel():
        from fastclip import distributed
        world, device = distributed.init(cfg.device)
        run_dir = distributed.broadcast(str(Path(run_dir).resolve()))
        if not world.main:
            _leave_the_run_dir_to_rank_0(run_dir)
        log.info("process %d of %d (local rank %d) on %s", world.rank, world.size, world.local_rank, device)
    try:
        with ExitStack() as held:  # what the run holds until it ends: its run dir's lock, the loader's workers
            return _run(cfg, run_dir, launch_dir, overrides, choices, device, held)
    finally:
        if world is not None:
            distributed.shutdown()


def _launched_data_parallel() -> bool:
    """torchrun's variables, a job Submitit runs (on SLURM or locally; it may have several tasks), or a
    SLURM task (srun alone): then fastclip.distributed decides (cheap to ask, without importing torch
    for a plain run)."""
    return "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local") \
        or "SLURM_PROCID" in os.environ


def _leave_the_run_dir_to_rank_0(rank_0_dir: str) -> None:
    """A rank other than 0 logs to its console only (torchrun and SLURM keep each task's output): the
    log file in the job dir is rank 0's. Under torchrun each process composed its own Hydra job dir;
    where this one's differs from rank 0's (named after a later second) and holds nothing but
    Hydra's record of the job, it goes."""
    _discard_own_job_dir(keep=Path(rank_0_dir))


def _discard_own_job_dir(keep: Path | None = None) -> None:
    """Closes this process's log file and removes its Hydra job dir where that holds nothing but
    Hydra's record of the job, that log and a released run lock (a run that failed before it opened
    its MLflow run, which writes config.yaml first; a rank's own dir):
    the newest run dir is then always a run's. Single runs only: a grid's job dirs are the sweep's."""
    import shutil
    from hydra.core.hydra_config import HydraConfig
    logged = set()  # the files this process logged to (device, inode): its own, not a namesake's
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, logging.FileHandler):
            if handler.stream is not None:
                stat = os.fstat(handler.stream.fileno())
                logged.add((stat.st_dev, stat.st_ino))
            logging.getLogger().removeHandler(handler)
            handler.close()
    if not HydraConfig.initialized() or str(HydraConfig.get().mode) != "RunMode.RUN":
        return
    own = Path(HydraConfig.get().runtime.output_dir).resolve()
    log_file = own / f"{HydraConfig.get().job.name}.log"
    if own == keep or not log_file.is_file():
        return
    stat = log_file.stat()
    if (stat.st_dev, stat.st_ino) in logged and {p.name for p in own.iterdir()} <= {".hydra", log_file.name, run_lock.LOCK_NAME}:
        shutil.rmtree(own)
        with contextlib.suppress(OSError):  # the day's dir (outputs/runs/<date>) when it was this run's alone
            own.parent.rmdir()


def _run(cfg: DictConfig, run_dir, launch_dir, overrides, choices, device, held: ExitStack) -> dict:
    resume = None
    auto = cfg.trainer.resume == "auto"
    if auto:  # a requeued job: its own run dir's checkpoint, if it got that far
        from fastclip.resume import resolve_auto
        cfg = resolve_auto(cfg, run_dir)
    if cfg.trainer.resume:  # the run it came from: its config, run dir and MLflow run
        from fastclip.resume import prepare, refuse_changes_under_auto
        resume = prepare(cfg, overrides)
        if auto:
            refuse_changes_under_auto(resume)
        cfg, run_dir, choices = resume.config, resume.run_dir, resume.choices
    cfg = check_config(cfg)  # merged onto its schema: a resumed run's values typed as a composed one's
    uri = _store_uri(cfg, resume, launch_dir)
    store.check_writable(uri)  # fail before any work, naming the path

    from fastclip import distributed, runtime
    from fastclip.loop import Trainer, fit
    from fastclip.tasks import build_task
    from fastclip.schema.workers import loader_workers
    world = distributed.current()
    run_dir = Path(run_dir)
    if world.main:  # (the others wait for rank 0's build below, which comes after this)
        run_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(run_lock.hold(run_dir))  # before the MLflow run or a checkpoint is touched
    device = device or runtime.pick_device(cfg.device)
    runtime.seed_everything(cfg.seed)
    runtime.set_torch_threads(cfg.trainer.torch_threads, loader_workers(cfg), device)
    runtime.use_tf32_matmuls(device)  # CUDA only: its float32 matmuls are TF32, runtime.math_mode says so

    if not world.main:  # rank 0 builds first: what it caches (a unigram model, a zero-shot classifier) the others read
        distributed.barrier()
    task = build_task(cfg, device, run_dir)
    held.callback(task.close)  # the loader's workers end with the run, however it ends
    if world.main:
        distributed.barrier()
    trainer = Trainer(task, cfg, device)
    if resume:
        trainer.load_state_dict(resume.checkpoint, str(resume.checkpoint_path))
    opened = distributed.on_main(lambda: _open_run(cfg, task, resume, uri, run_dir), "opening the MLflow run",
                                 share=lambda run: run[0].run_id)
    if not world.main:  # the others train and evaluate their share; rank 0 tracks and writes
        return {**fit(task, cfg, None, run_dir, device, trainer), "mlflow_run_id": opened}
    tracker, commit, dirty = opened
    opened_at = trainer.state.step
    run_log = _log_to_run_dir(run_dir) if resume else None
    try:
        if resume:
            _record_resume(resume, tracker, run_dir, trainer.state.step, commit, dirty)
        log_plan(task, trainer, cfg, run_dir)
        metrics = fit(task, cfg, tracker, run_dir, device, trainer, provenance={"choices": choices or _choices(cfg)})
        if cfg.compression.name != "none":
            metrics.update(_compressed(task, cfg, tracker, metrics, trainer, run_dir))
    except BaseException as exc:
        # KeyboardInterrupt: Ctrl-C or a signal's stop; SystemExit: Submitit's handler requeued the job
        tracker.end_failed(exc, trained=trainer.state.step > opened_at)
        raise
    finally:
        if run_log is not None:
            logging.getLogger().removeHandler(run_log)
            run_log.close()
    tracker.end("FINISHED")
    metrics["mlflow_run_id"] = tracker.run_id
    for key in HEADLINE_METRICS:
        if key in metrics:
            log.info(final_line(key, metrics))
    log.info("run dir %s; checkpoint %s; MLflow run %s in %s; %s", run_dir.resolve(),
             (run_dir / "checkpoints" / "last.pt").resolve(), tracker.run_id, uri, tracking.ui_hint(uri, tracker))
    if objective(metrics) is not None:
        log.info(objective_line(metrics, cfg.compression.name))
    return metrics


def _compressed(task, cfg: DictConfig, tracker, dense: dict, trainer, run_dir: Path) -> dict:
    """The trained model compressed and measured beside the dense one (fastclip.compression), logged
    at the final step: zeroshot/top1 and the other quality numbers become the compressed model's
    (MLflow's latest value), the dense ones stay as <name>_dense (a oneshot prune's model at its
    pruning step: <name>_before_prune). Latencies, the compressed model's and its twin's, are measured
    under the run's autocast; the tag fastclip.latency_math names their arithmetic (runtime.math_mode:
    fp32, tf32, bf16 autocast ...). A failure here does not fail the
    training it follows: the run ends FINISHED with the error in the tag fastclip.compression_error."""
    from fastclip import runtime
    try:
        compressed = task.compression.finish(task, dense, trainer.state.step)
    except Exception as exc:
        log.exception("compression=%s failed; the trained model is in %s", cfg.compression.name,
                      run_dir / "checkpoints" / "last.pt")
        tracker.set_tags({"fastclip.compression_error": f"{type(exc).__name__}: {exc}"[:5000]})
        return {}
    if compressed.get("compression/pruned_at_end"):  # finish() pruned after the last save: the file gets it
        from fastclip.loop.checkpointing import replace_weights
        replace_weights(trainer, run_dir / "checkpoints" / "last.pt")
    tracker.log_metrics(compressed, trainer.state.step)
    math = runtime.math_mode(trainer.device, trainer.amp_dtype)  # the latencies' arithmetic, both models'
    tracker.set_tags({"fastclip.latency_math": math})
    log.info("%s; latencies in %s. The final numbers below are the compressed model's (its twin's beside them)",
             task.compression.summary(compressed), math)
    return compressed


def _open_run(cfg: DictConfig, task, resume, uri: str, run_dir: Path):
    """The MLflow run (new, or the resumed one) with its params, tags and resolved config
    -> (tracker, git commit, whether the checkout had uncommitted changes)."""
    from fastclip import distributed, runtime
    if resume:
        tracking.require_run(uri, resume.checkpoint.get("mlflow_run_id"), resume.checkpoint_path)
    commit, dirty = runtime.git_commit()
    tags = {"mlflow.source.git.commit": commit, "fastclip.git_dirty": str(dirty), "fastclip.task": cfg.task.name,
            "fastclip.run_dir": str(run_dir.resolve()), **hydra_tags(), **task.tags}
    # a multirun's shared key this job's option or task ignores; a resume's were tagged when its run began
    # (and a key it was given as its legacy value, which no one set, is not one)
    unread = unread_keys(cfg) if not resume else {}
    if unread:
        said = "; ".join(f"{key} ({why})" for key, why in unread.items())
        log.warning("this run does not read %s: it runs without them, and its MLflow run says so "
                    "(tag fastclip.unread_keys)", said)
        tags["fastclip.unread_keys"] = said[:5000]
    # written before the run is (re)opened, so that a run dir that refuses it leaves the run as it was, and
    # renamed into place once it is: a reopening that fails leaves the config of the run as it was, too
    resolved, pending = run_dir / "config.yaml", run_dir / "config.yaml.tmp"
    pending.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        tracker = tracking.Tracker(uri, cfg.tracking.experiment, run_name=run_name(cfg, tags), tags=tags,
                                   run_id=resume.checkpoint.get("mlflow_run_id") if resume else None)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    try:
        os.replace(pending, resolved)
        tracker.log_params(tracking.flatten(cfg))
        tracker.log_params({k: str(v) for k, v in task.params().items()})
        world = distributed.current().size
        if world > 1:
            tracker.log_params({"distributed.world_size": str(world)})
        if world > 1 or cfg.trainer.accum_steps > 1:  # the batch each step's loss is over (tasks/accumulation.py)
            tracker.log_params({"trainer.global_batch_size": str(cfg.trainer.batch_size * world
                                                                 * cfg.trainer.accum_steps)})
        tracker.log_artifact(resolved)
    except BaseException as exc:
        tracker.end_failed(exc, trained=False)
        raise
    return tracker, commit, dirty


def _store_uri(cfg: DictConfig, resume, launch_dir) -> str:
    """tracking.uri, else (resuming) the store the run was created in, else the default."""
    recorded = resume.checkpoint.get("mlflow_uri") if resume else None
    if resume and not cfg.tracking.uri and recorded:
        return recorded
    return store.resolve_uri(cfg.tracking.uri, launch_dir)


def _choices(cfg: DictConfig) -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig
    if HydraConfig.initialized():  # top-level groups only (not hydra/*, nor nested defaults like _shared/...)
        return {k: v for k, v in HydraConfig.get().runtime.choices.items()
                if v is not None and (CONF_DIR / k).is_dir() and not k.startswith(("_", "hydra"))
                and k not in APPENDED_GROUPS}
    return {g: cfg[g].name for g in NAMED_GROUPS if "name" in cfg[g]}


def _log_to_run_dir(run_dir: Path) -> logging.Handler:
    """A resumed run logs into the run dir it continues, beside its first part's log (the caller
    removes the handler when the run ends)."""
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _record_resume(resume, tracker, run_dir: Path, step: int, commit: str, dirty: bool) -> None:
    """Each resume: a log line, an entry in resumes.yaml, and MLflow tags of its own (changes, each
    changed key's new value as fastclip.resume.<n>.set.<key>, from which step, with which code), since
    the run's params cannot change (the values in effect: tracking.EFFECTIVE_TAG)."""
    from fastclip.resume import record
    changed = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in resume.changes.items()) or "nothing changed"
    log.info("resuming %s at step %d into %s (%s)", resume.checkpoint_path, step, run_dir, changed)
    path, n = record(resume, run_dir, step, os.getcwd(), commit, dirty)
    tracker.log_artifact(path)
    tracker.set_tags({f"fastclip.resume.{n}.changes": changed[:5000], f"fastclip.resume.{n}.from_step": step,
                      f"fastclip.resume.{n}.git_commit": commit, f"fastclip.resume.{n}.git_dirty": dirty,
                      **{f"fastclip.resume.{n}.set.{k}": str(b)[:6000] for k, (_, b) in resume.changes.items()},
                      "fastclip.resumes": n})
    if "tracking.run_name" in resume.changes:
        tracker.client.update_run(tracker.run_id, name=resume.config.tracking.run_name)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from fastclip.checkpoint import CheckpointWriteError
    hc = HydraConfig.get()
    from fastclip.distributed import RankFailed
    from fastclip.loop import NoTrainingData, RunInterrupted, TrainingDiverged
    try:
        check_overrides(hc.overrides.task)
        if "TORCHELASTIC_RUN_ID" in os.environ and str(hc.mode) == "RunMode.MULTIRUN":
            raise ConfigError("torchrun with -m: every process would launch the whole grid. Data-parallel jobs "
                              "of a grid: hydra/launcher=slurm with hydra.launcher.tasks_per_node=N (docs/guide/"
                              "scale-out.md), or one torchrun per configuration")
        metrics = run(cfg, hc.runtime.output_dir, launch_dir=hc.runtime.cwd, overrides=list(hc.overrides.task),
                      choices=_choices(cfg))
    except (InputError, CheckpointWriteError, run_lock.RunDirInUse, run_lock.RunDirNotWritable, NoTrainingData,
            TrainingDiverged, RankFailed) as exc:
        _discard_own_job_dir()  # failed before training: nothing of a run in it (a trained run's dir stays)
        if show_traceback():
            raise
        if str(hc.mode) == "RunMode.MULTIRUN":  # the sweep goes on and counts it (SystemExit would end it)
            from fastclip.sweep_jobs import JobFailed
            raise JobFailed(f"error: {exc}") from None
        raise SystemExit(f"error: {exc}") from None  # what to do is in the message: no stack trace
    except RunInterrupted as exc:
        print(f"fastclip: {exc}", file=sys.stderr)
        raise SystemExit(130) from None
    except BaseException:
        _discard_own_job_dir()
        raise
    _discard_own_job_dir()  # a resume's: the run went on in its own dir, this one holds only Hydra's record
    # The returned value is what a sweeper optimises: a validation metric, never a test one.
    found = objective(metrics)
    return None if found is None else found[1]


if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]):  # the groups a user chooses, not Hydra's dump of every group
        from fastclip.cli_help import help_text
        print(help_text())
        raise SystemExit(0)
    try:  # before Hydra parses them: its errors do not name the argument, nor the key meant
        from fastclip.override_checks import check_override_keys, check_override_syntax
        check_override_syntax(sys.argv[1:])
        check_override_keys(sys.argv[1:])
        from fastclip.sweep_preflight import check_sweep_jobs
        check_sweep_jobs(sys.argv[1:])  # a grid's every job, and its store, before the first trains
    except InputError as exc:
        if show_traceback():
            raise
        raise SystemExit(f"error: {exc}") from None
    main()
