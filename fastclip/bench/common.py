"""Shared by the benchmarks: one training run per fresh process (so peak memory is its own),
through the same `run()` the CLI uses, tracked in MLflow like any run."""
import concurrent.futures as cf
import multiprocessing as mp
import resource
import sys
from pathlib import Path


def _child(overrides: list[str], run_dir: str) -> dict:
    from fastclip.config import compose_train_config
    from fastclip.train import run
    cfg = compose_train_config(overrides)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    metrics = run(cfg, run_dir)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    metrics["memory/peak_rss_mb"] = peak / 1024
    metrics["memory/train_growth_mb"] = (peak - before) / 1024  # what building + training added
    return metrics


def in_fresh_process(fn, *args):
    """fn(*args) in a spawned process (fn importable by name, args and result picklable): nothing
    one measurement leaves behind (peak memory, torch.compile's caches) reaches the next."""
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def run_isolated(overrides: list[str], run_dir: Path) -> dict:
    return in_fresh_process(_child, list(overrides), str(run_dir))


def schedule(steps: int, warmup: int) -> list[str]:
    """A bench run's length: `steps` steps under the recipe's warm-up, shortened for a smoke run that
    is shorter than it (a warm-up longer than the run is an error)."""
    return [f"trainer.max_steps={steps}", f"trainer.warmup_steps={min(warmup, max(1, steps // 10))}"]


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            value = row.get(key)
            cells.append("n/a" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def emit(text: str, out: Path | None) -> None:
    print(text)
    sys.stdout.flush()
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
