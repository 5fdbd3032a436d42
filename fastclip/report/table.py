"""The report's table: one row per run (report.csv) and one row per group of runs that differ only
in their seed (report.md: mean ± std over the seeds, with n)."""
import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from fastclip.report.runs import RunRecord

# what a run is (from its params: the flattened resolved config), in the order the table shows it
DESCRIBE = [("task", "task.name"), ("dataset", "dataset.name"), ("encoder", "encoder.name"),
            ("boundary", "boundary.name"), ("compression", "compression.name"), ("epochs", "epochs"),
            ("max_steps", "trainer.max_steps")]
# what a run measured, where logged: (header, metric, format)
MEASURES = [("compression image", "efficiency/compression_image", ".3g"),
            ("compression text", "efficiency/compression_text", ".3g"),
            ("image GFLOPs", "efficiency/image_gflops", ".4g"), ("text GFLOPs", "efficiency/text_gflops", ".4g"),
            ("params (M)", "params_m", ".3g"), ("model MB", "compression/model_mb", ".4g"),
            ("train samples/s", "throughput/train_samples_per_s", ".4g"),
            ("zero-shot top-1", "zeroshot/top1", ".4f"), ("zero-shot top-5", "zeroshot/top5", ".4f"),
            ("ImageNet top-1", "zeroshot/imagenet_top1", ".4f"), ("ImageNet top-5", "zeroshot/imagenet_top5", ".4f"),
            ("i2t R@1", "retrieval/i2t_r1", ".4f"), ("i2t R@5", "retrieval/i2t_r5", ".4f"),
            ("i2t R@10", "retrieval/i2t_r10", ".4f"), ("t2i R@1", "retrieval/t2i_r1", ".4f"),
            ("t2i R@5", "retrieval/t2i_r5", ".4f"), ("t2i R@10", "retrieval/t2i_r10", ".4f"),
            ("test BPC", "lm/test_bpc", ".4f"), ("data skipped", "data/skipped", ".0f")]
# params that never tell runs apart: bookkeeping, and counts derived from the model
NOT_A_CHOICE = ("seed", "tracking.", "trainer.resume", "trainer.progress", "model.")


def measured(run: RunRecord) -> dict[str, float]:
    """The run's final metrics, plus its parameter count in millions (logged as a param)."""
    values = dict(run.metrics)
    if "model.params_total" in run.params:
        values["params_m"] = int(run.params["model.params_total"]) / 1e6
    return values


def varied_keys(runs: list[RunRecord]) -> list[str]:
    """The config keys whose values differ between the runs (what a grid varied), seed excluded. A
    key of a config group whose option varies (boundary.k where boundary.name does) is left out
    where the option alone decides it: `boundary=fixed` says it, not every key of fixed.yaml."""
    keys = sorted({k for r in runs for k in r.params if not k.startswith(NOT_A_CHOICE)})
    varied = [k for k in keys if len({r.params.get(k) for r in runs}) > 1]

    def decided_by_option(key: str) -> bool:
        option = key.rsplit(".", 1)[0] + ".name"
        if key == option or option not in varied:
            return False
        seen: dict[str | None, str | None] = {}
        return all(seen.setdefault(r.params.get(option), r.params.get(key)) == r.params.get(key) for r in runs)
    return [k for k in varied if not decided_by_option(k)]


def label(run: RunRecord, varied: list[str]) -> str:
    """The run's varied choices, e.g. "boundary=fixed trainer.lr=0.001" (X.name shown as X)."""
    parts = [f"{k.removesuffix('.name')}={run.params.get(k, '')}" for k in varied]
    return " ".join(parts) or "all runs"


@dataclass
class Group:
    """Runs that differ only in their seed."""
    label: str
    runs: list[RunRecord]

    @property
    def seeds(self) -> list[str]:
        return [r.params.get("seed", "") for r in self.runs]

    def stat(self, metric: str) -> tuple[float, float | None, int] | None:
        """(mean, sample std or None for one run, n) of the runs that logged `metric`."""
        values = [measured(r)[metric] for r in self.runs if metric in measured(r)]
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def group_by_seed(runs: list[RunRecord]) -> list[Group]:
    """Runs whose params are equal but for seed (and bookkeeping) form one group; groups keep the
    order of their first run."""
    varied = varied_keys(runs)
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = tuple(run.params.get(k) for k in varied)
        groups.setdefault(key, Group(label(run, varied), [])).runs.append(run)
    return list(groups.values())


def _present(runs: list[RunRecord]) -> list[tuple[str, str, str]]:
    return [m for m in MEASURES if any(m[1] in measured(r) for r in runs)]


def markdown(groups: list[Group]) -> str:
    """One row per group: what the runs are, n and their seeds, each metric as mean ± std."""
    runs = [r for g in groups for r in g.runs]
    measures = _present(runs)
    describe = [(h, k) for h, k in DESCRIBE if any(k in r.params for r in runs)]
    header = ["runs", *(h for h, _ in describe), "n", "seeds", *(h for h, _, _ in measures)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        first = g.runs[0].params
        cells = [g.label, *(first.get(k, "") for _, k in describe), str(len(g.runs)), ",".join(g.seeds)]
        for _, metric, fmt in measures:
            stat = g.stat(metric)
            cells.append("n/a" if stat is None else format(stat[0], fmt) if stat[1] is None
                         else f"{stat[0]:{fmt}} ± {stat[1]:{fmt}}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(groups: list[Group], path: Path) -> None:
    """One row per run: its group, run id and name, what it is, its seed, every measure logged."""
    runs = [r for g in groups for r in g.runs]
    measures = _present(runs)
    varied = varied_keys(runs)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["group", "run_id", "run_name", *(h for h, _ in DESCRIBE), *varied, "seed",
                      *(m for _, m, _ in measures)])
        for g in groups:
            for r in g.runs:
                values = measured(r)
                out.writerow([g.label, r.run_id, r.name, *(r.params.get(k, "") for _, k in DESCRIBE),
                              *(r.params.get(k, "") for k in varied), r.params.get("seed", ""),
                              *(values.get(m, "") for _, m, _ in measures)])
