"""Every job of a grid checked before the first one trains (fastclip.train's __main__, multirun only).

Hydra's basic sweeper composes each batch's configs before launching it, but a composed config only
has its values' types checked; the schemas' choices and ranges and the rules joining keys of several
groups (fastclip.checks.check_config) run inside each job. So `-m boundary.image_order=raster,hilbrt`
trained the raster job, then failed the other, and on SLURM a job's typo surfaced hours after the
grid was queued. Here each job's config is composed as the basic sweeper expands the grid (its
`hydra.sweeper.params` first, then the command line) and checked as a run checks it; a grid with a
bad job fails whole, naming every bad job, before anything runs. So does a grid whose MLflow store
cannot be used: Hydra only warns when its sweep-start callback fails, then each job fails alone.
Nothing is written here: the store is made by the sweep-start callback, once Hydra took the command line.

Not checked here: what needs the data (files, sizes; the task checks it before training), a job that
resumes a checkpoint (its config is the checkpoint's: fastclip.resume), and grids another sweeper
draws (Optuna's trials are known only as it runs).
"""
import contextlib
import logging
import sys
import time

from fastclip.schema.errors import ConfigError

log = logging.getLogger("fastclip")
SHOWN = 5  # bad jobs named in the error; the rest are counted
PROGRESS_FROM = 50  # a grid of this many jobs says it is being checked (a 300-job grid takes about a minute)
PRINT_ONLY = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc"}
OTHER_TREE = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn"}  # not conf/train.yaml


def sweep_jobs_overrides(args: list[str]) -> list[list[str]] | None:
    """Each job's overrides as Hydra's basic sweeper would launch them, in its order; None where this
    cannot be known here (another sweeper, a sweep only Hydra's config loader expands: glob())."""
    return _grid(args)[0]


def _grid(args: list[str]) -> tuple[list[list[str]] | None, str]:
    """(sweep_jobs_overrides, the launcher's _target_: "" where the config cannot be read here)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fastclip.config import compose_train_config
    parser = OverridesParser.create()
    try:
        hydra = compose_train_config(_fixed(args), return_hydra_config=True).hydra
    except Exception:  # noqa: BLE001 - Hydra judges what this cannot compose, as it always did
        return None, ""
    launcher = str(hydra.launcher.get("_target_", ""))
    if not str(hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None, launcher
    try:
        params = [f"{k}={v}" for k, v in (hydra.sweeper.get("params") or {}).items()]
        batches = BasicSweeper.split_arguments(parser.parse_overrides([*params, *_given(args)]), None)
    except Exception:  # noqa: BLE001 - as above
        return None, launcher
    return [list(job) for batch in batches for job in batch], launcher


def check_sweep_jobs(args: list[str]) -> None:
    """Raises ConfigError naming each job of the multirun `args` whose config a run would refuse
    (fastclip.checks.check_config, and the job's own overrides as fastclip.train's main checks them:
    override_checks.check_overrides) or Hydra could not compose, with its overrides and the error, and
    TrackingStoreError for an MLflow store the jobs could not use (Hydra only warns when its sweep-start
    callback fails, and each job then fails alone); nothing is created. A no-op for a single run, a
    command that only prints (--cfg, --info, --help) and a config tree of another dir or name (-cd,
    -cn); of a grid that cannot be expanded here (sweep_jobs_overrides), only the store is checked.
    A job whose config reads what only its own process knows (${hydra:job.num}, ${oc.env:SLURM_...})
    is left to check itself. Jobs another launcher places (SLURM) are checked without what depends on
    the host: the loader worker count against this process's CPUs (schema.workers.elsewhere) and
    whether an MLflow server answers from here."""
    from fastclip.override_checks import check_overrides, is_multirun
    if not is_multirun(args) or {a.split("=", 1)[0] for a in args if a.startswith("-")} & (PRINT_ONLY | OTHER_TREE):
        return
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    from fastclip.checks import check_config
    from fastclip.config import compose_train_config
    from fastclip.schema.workers import elsewhere
    from fastclip.store import check_writable, refuse_file_store, resolve_uri
    jobs, launcher = _grid(args)
    here = launcher.endswith(("BasicLauncher", "LocalLauncher"))  # this host: Hydra's, or Submitit's local one
    if jobs and len(jobs) >= PROGRESS_FROM:
        print(f"fastclip: checking the configs of the grid's {len(jobs)} jobs before the first trains "
              f"(about 0.2 s a job)", file=sys.stderr, flush=True)
    start, bad, stores = time.perf_counter(), [], set()
    for num, overrides in enumerate(jobs or [_fixed(args)]):
        try:
            if jobs:
                check_overrides(overrides)
            cfg = compose_train_config(overrides)
            try:
                OmegaConf.to_container(cfg, resolve=True)
            except InterpolationResolutionError:  # known only where the job runs: it checks itself there
                continue
            stores.add(cfg.tracking.uri)
            if jobs and cfg.trainer.resume in (None, "auto"):  # a fresh job (auto: a cluster profile's requeue guard)
                with contextlib.nullcontext() if here else elsewhere():
                    check_config(cfg)
        except ConfigError as exc:
            bad.append((num, overrides, str(exc)))
        except Exception as exc:  # noqa: BLE001 - Hydra's or OmegaConf's own refusal of the job's config
            if jobs:
                bad.append((num, overrides, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    log.debug("checked the configs of %d jobs in %.1f s", len(jobs or ()), time.perf_counter() - start)
    if bad:
        named = "\n".join(f"  job {num} ({_swept(overrides, args)}): {error}" for num, overrides, error in bad[:SHOWN])
        more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise ConfigError(f"{len(bad)} of the multirun's {len(jobs)} jobs would fail before training, so none "
                          f"ran:\n{named}{more}")
    for uri in stores:  # where the sweep's parent run and its jobs' runs go (Hydra's sweep-start callback makes it)
        (check_writable if here else refuse_file_store)(resolve_uri(uri))


def _fixed(args: list[str]) -> list[str]:
    """The command line's overrides that sweep nothing (the config every job shares)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        return [o.input_line for o in OverridesParser.create().parse_overrides(_given(args)) if not o.is_sweep_override()]
    except Exception:  # noqa: BLE001 - check_override_syntax names it
        return []


def _given(args: list[str]) -> list[str]:
    """The command line's overrides (key=value), its flags and their values left out."""
    return [a for a in args if not a.startswith("-") and "=" in a]


def _swept(overrides: list[str], args: list[str]) -> str:
    """A job's values of the keys the command line sweeps, as the sweep's table names them (all of its
    overrides where the grid comes from hydra.sweeper.params)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    swept = {o.get_key_element() for o in OverridesParser.create().parse_overrides(_given(args)) if o.is_sweep_override()}
    mine = [o for o in overrides if o.split("=", 1)[0] in swept]
    return " ".join(mine or overrides) or "no overrides"
