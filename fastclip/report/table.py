"""The report's table: one row per run (report.csv) and one row per group of runs that differ only
in their seed (report.md: mean ± std over the seeds, with n). A run is what was in effect when it
ended (its config after every resume, runs.RunRecord), and runs of different code versions are
different groups unless pooled (group_by_seed)."""
import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from fastclip.bench.common import markdown_table
from fastclip.report.runs import CodeVersion, RunRecord
from fastclip.schema.groups import OPTIONS
from fastclip.schema.model import PLACEMENT_CONDITIONS, placement_unread
from fastclip.schema.resume_rules import RUNTIME_KEYS as RUNTIME
from fastclip.schema.unread import PLACEMENT

# what a run is (from its params: the flattened resolved config), in the order the table shows it
DESCRIBE = [("task", "task.name"), ("dataset", "dataset.name"), ("encoder", "encoder.name"),
            ("boundary", "boundary.name"), ("compression", "compression.name"), ("epochs", "epochs"),
            ("max_steps", "trainer.max_steps"), ("lr", "trainer.lr")]
MEAN_COST, COMPUTE_SO_FAR = "efficiency/train_gflops_mean", "efficiency/train_pflops_total"
# what a run measured, where logged: (header, metric, format)
MEASURES = [("image shortening factor", "efficiency/compression_image", ".3g"),
            ("text shortening factor", "efficiency/compression_text", ".3g"),
            ("image GFLOPs", "efficiency/image_gflops", ".4g"), ("text GFLOPs", "efficiency/text_gflops", ".4g"),
            ("params (M)", "params_m", ".3g"), ("model MB", "compression/model_mb", ".4g"),
            ("train GFLOPs/sample (run mean)", MEAN_COST, ".4g"), ("train PFLOPs", COMPUTE_SO_FAR, ".4g"),
            ("train samples/s", "throughput/train_samples_per_s", ".4g"),
            ("zero-shot top-1", "zeroshot/top1", ".4f"), ("zero-shot top-5", "zeroshot/top5", ".4f"),
            ("ImageNet top-1", "zeroshot/imagenet_top1", ".4f"), ("ImageNet top-5", "zeroshot/imagenet_top5", ".4f"),
            ("i2t R@1", "retrieval/i2t_r1", ".4f"), ("i2t R@5", "retrieval/i2t_r5", ".4f"),
            ("i2t R@10", "retrieval/i2t_r10", ".4f"), ("t2i R@1", "retrieval/t2i_r1", ".4f"),
            ("t2i R@5", "retrieval/t2i_r5", ".4f"), ("t2i R@10", "retrieval/t2i_r10", ".4f"),
            ("test BPC", "lm/test_bpc", ".4f"), ("data skipped", "data/skipped", ".0f")]
# params that never tell runs apart: the seed (grouped over), bookkeeping, counts derived from the
# model, and how a run executed (the schema's runtime keys: workers, threads, device, ...)
NOT_A_CHOICE_PREFIXES = ("tracking.", "model.")


def is_choice(key: str) -> bool:
    return key != "seed" and key not in RUNTIME and not key.startswith(NOT_A_CHOICE_PREFIXES)


def measured(run: RunRecord) -> dict[str, float]:
    """The run's final metrics, plus its parameter count in millions (logged as a param) and, for a run
    from before it was logged, its mean training GFLOPs per sample (compute over samples)."""
    values = dict(run.metrics)
    if MEAN_COST not in values and values.get("train/samples") and COMPUTE_SO_FAR in values:
        values[MEAN_COST] = values[COMPUTE_SO_FAR] * 1e6 / values["train/samples"]
    if "model.params_total" in run.params:
        values["params_m"] = int(run.params["model.params_total"]) / 1e6
    return values


def varied_keys(runs: list[RunRecord]) -> list[str]:
    """The config keys whose values differ between the runs (what a grid varied), seed excluded. A
    key under a config group whose option varies (boundary.k where boundary.name does,
    encoder.vision.width where encoder.name does) is left out where the option alone decides it:
    `boundary=fixed` says it, not every key of fixed.yaml."""
    varied = _all_varied(runs)
    return [k for k in varied if _deciding_option(k, varied, runs) is None]


def set_by_options(runs: list[RunRecord]) -> list[str]:
    """What the labels leave unsaid: a boundary placement key (conf/_shared/boundary_placement.yaml:
    where and how every option pools) that an option sets apart from the others', among the runs whose
    option reads it (schema.model.placement_unread), e.g. "boundary.text_tokens: bpe (boundary=fixed,
    gumbel), bytes (boundary=unigram)": unigram's row runs the byte tower, which `boundary=unigram`
    alone does not say. An option's own keys (boundary.k, an encoder's geometry) are what its name
    says. One line per key, values in first-seen order."""
    varied = _all_varied(runs)
    lines = []
    for key in (f"boundary.{field}" for field in sorted(PLACEMENT)):
        if key not in varied or _deciding_option(key, varied, runs) != "boundary.name":
            continue
        under: dict[str, list[str]] = {}
        for r in runs:
            option = r.params.get("boundary.name")
            if option is None or key not in r.params or not _reads(r, key):  # boundary=none's apply_to=[]
                continue
            names = under.setdefault(r.params[key], [])
            if option not in names:
                names.append(option)
        if len(under) > 1:
            lines.append(f"{key}: " + ", ".join(f"{value} (boundary={', '.join(names)})"
                                                for value, names in under.items()))
    return lines


def _reads(run: RunRecord, key: str) -> bool:
    """Whether the run's boundary option reads the placement key `key` (schema.model.placement_unread;
    an option this fastclip does not know is taken as reading)."""
    field, option = key.removeprefix("boundary."), run.params.get("boundary.name")
    if option not in OPTIONS["boundary"]:
        return True
    placement = {k: _literal(run.params.get(f"boundary.{k}")) for k in PLACEMENT_CONDITIONS}
    return placement_unread(option, OPTIONS["boundary"][option], field, run.params.get("task.name", "clip"),
                            placement) is None


def _literal(param: str | None):
    """A logged param as the value it was ("['text']" -> ['text'], "None" -> None; a word stays a word)."""
    import ast
    try:
        return ast.literal_eval(param) if param is not None else None
    except (ValueError, SyntaxError):
        return param


def _all_varied(runs: list[RunRecord]) -> list[str]:
    keys = sorted({k for r in runs for k in r.params if is_choice(k)})
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def _deciding_option(key: str, varied: list[str], runs: list[RunRecord]) -> str | None:
    """The varied group option (`boundary.name`) that alone decides `key`'s value (one value of the key
    per option value), or None."""
    parts = key.split(".")
    for option in [".".join(parts[:i]) + ".name" for i in range(len(parts) - 1, 0, -1)]:
        if option != key and option in varied and len({(r.params.get(option), r.params.get(key)) for r in runs}) \
                == len({r.params.get(option) for r in runs}):
            return option
    return None


def resumed_changes(run: RunRecord) -> tuple[tuple[int, tuple[tuple[str, str, str], ...]], ...]:
    """What the run's resumes changed of what it is (is_choice keys: not workers, devices, ...), each
    as (from step, ((key, value before, value after), ...)); () for a run never resumed with such a
    change. A run extended from 15 to 20 epochs is not a 20-epoch run: its schedule was 15 epochs'
    up to the resume."""
    now, out = dict(run.first_params if run.first_params is not None else run.params), []
    for part in run.resumes:
        changed = tuple((k, now.get(k, ""), v) for k, v in part.set if is_choice(k) and now.get(k, "") != v)
        now.update(part.set)
        if changed:
            out.append((part.from_step, changed))
    return tuple(out)


def label(run: RunRecord, varied: list[str], code: bool = False, others_resumed: bool = False) -> str:
    """The run's varied choices, e.g. "boundary=fixed trainer.lr=0.001" (X.name shown as X), its code
    version where asked ("code=1a2b3c4"), and what its resumes changed ("(resumed at step 2:
    trainer.max_steps 2 -> 4)"). Nothing of these: "all runs", or "not resumed" where others_resumed
    (other runs of the report differ from it only in their resumes)."""
    parts = [f"{k.removesuffix('.name')}={run.params.get(k, '')}" for k in varied]
    if code:
        parts.append(f"code={run.code.label}")
    resumed = "; ".join(f"at step {step}: " + ", ".join(f"{k} {a} -> {b}" for k, a, b in changed)
                        for step, changed in resumed_changes(run))
    if resumed:
        parts.append(f"(resumed {resumed})")
    return " ".join(parts) or ("not resumed" if others_resumed else "all runs")


@dataclass
class Group:
    """Runs that differ only in their seed."""
    label: str
    runs: list[RunRecord]

    @property
    def seeds(self) -> list[str]:
        return [r.params.get("seed", "") for r in self.runs]

    @property
    def versions(self) -> list[CodeVersion]:
        """The code versions its runs ran, in order of first appearance (several only where pooled)."""
        return list(dict.fromkeys(r.code for r in self.runs))

    @property
    def code(self) -> str:
        """Its code version, or "pooled N versions: a; b" (group_by_seed(pool_versions=True))."""
        versions = self.versions
        if len(versions) == 1:
            return versions[0].label
        return f"pooled {len(versions)} versions: " + "; ".join(v.label for v in versions)

    def stat(self, metric: str) -> tuple[float, float | None, int] | None:
        """(mean, sample std or None for one run, n) of the runs that logged `metric`."""
        values = [v for v in (measured(r).get(metric) for r in self.runs) if v is not None and not math.isnan(v)]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def group_by_seed(runs: list[RunRecord], pool_versions: bool = False) -> list[Group]:
    """Runs whose params in effect are equal but for seed (and bookkeeping), whose resumes changed
    the same (resumed_changes) and that ran the same code version (git commit and dirty flag, part by
    part; unless pool_versions) form one group; groups keep the order of their first run. Where the
    runs ran several code versions, the labels name each group's (code=...)."""
    varied = varied_keys(runs)
    split_code = not pool_versions and len({r.code for r in runs}) > 1
    any_resumed = any(resumed_changes(r) for r in runs)
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = (tuple(run.params.get(k) for k in varied), resumed_changes(run), run.code if split_code else None)
        groups.setdefault(key, Group(label(run, varied, split_code, any_resumed), [])).runs.append(run)
    return list(groups.values())


def _present(runs: list[RunRecord]) -> list[tuple[str, str, str]]:
    return [m for m in MEASURES if any(m[1] in measured(r) for r in runs)]


def cell(stat: tuple[float, float | None, int] | None, fmt: str, runs: int) -> str:
    """mean ± std; the count where fewer runs than the group's logged the metric (or it was NaN)."""
    if stat is None:
        return "n/a"
    mean, std, n = stat
    text = format(mean, fmt) if std is None else f"{mean:{fmt}} ± {std:{fmt}}"
    return text if n == runs else f"{text} (n={n})"


# columns every table keeps: which group, and how many runs its statistics are over
ALWAYS_SHOWN = ("runs", "n")


def markdown(groups: list[Group]) -> str:
    """One row per group: what the runs are, n and their seeds, each metric as mean ± std. A column
    of what the runs are with one value in every row (the data set of a boundary sweep, its code
    version, the seeds) is stated once, in a line above the table, rather than repeated down it; the
    metrics stay columns."""
    runs = [r for g in groups for r in g.runs]
    measures = _present(runs)
    varied = set(varied_keys(runs))  # the runs column's label names them already
    describe = [(h, k) for h, k in DESCRIBE if any(k in r.params for r in runs) and k not in varied]
    rows = [{"runs": g.label, **{k: g.runs[0].params.get(k, "") for _, k in describe}, "n": str(len(g.runs)),
             "seeds": ",".join(g.seeds), "code": g.code,
             **{m: cell(g.stat(m), fmt, len(g.runs)) for _, m, fmt in measures}}
            for g in groups]
    columns = [("runs", "runs", "s"), *((h, k, "s") for h, k in describe), ("n", "n", "s"), ("seeds", "seeds", "s"),
               ("code", "code", "s"), *((h, m, "s") for h, m, _ in measures)]
    if len(rows) < 2:
        return markdown_table(rows, columns)
    measured_keys = {m for _, m, _ in measures}  # what is compared stays in the table, equal or not
    same = [(h, k) for h, k, _ in columns
            if k not in ALWAYS_SHOWN and k not in measured_keys and len({row[k] for row in rows}) == 1]
    shown = [c for c in columns if (c[0], c[1]) not in same]
    stated = "Same in every group: " + "; ".join(f"{h} {rows[0][k] or '(unset)'}" for h, k in same) + ".\n\n"
    beyond = set_by_options(runs)
    below = ("\n\nSet by an option beyond its label: " + "; ".join(beyond) + ".") if beyond else ""
    return (stated if same else "") + markdown_table(rows, shown) + below


def write_csv(groups: list[Group], path: Path) -> None:
    """One row per run: its group, run id and name, what it is (in effect when it ended), its seed,
    its code (label, the full commits, whether any part ran on a dirty checkout), every measure logged."""
    runs = [r for g in groups for r in g.runs]
    measures = _present(runs)
    described = {k for _, k in DESCRIBE}
    varied = [k for k in varied_keys(runs) if k not in described]  # each column once
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["group", "run_id", "run_name", *(h for h, _ in DESCRIBE), *varied, "seed",
                      "code", "git_commit", "git_dirty", *(m for _, m, _ in measures)])
        for g in groups:
            for r in g.runs:
                values = measured(r)
                parts = r.code.parts
                dirty = "" if any(p.dirty is None for p in parts) else str(any(p.dirty for p in parts))
                out.writerow([g.label, r.run_id, r.name, *(r.params.get(k, "") for _, k in DESCRIBE),
                              *(r.params.get(k, "") for k in varied), r.params.get("seed", ""),
                              r.code.label, " -> ".join(p.commit for p in parts), dirty,
                              *(values.get(m, "") for _, m, _ in measures)])
