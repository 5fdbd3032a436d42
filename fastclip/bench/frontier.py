"""make bench-frontier: every row trained on the SAME counted training compute, the budget vanilla's
`--steps` steps cost (efficiency/train_pflops_total of vanilla's run, seed 0), as FLIP and CLIPA compare
methods: vanilla, DTP fixed k=4 Hilbert and learned DTP (gumbel, d->d->1 predictor, Hilbert order,
stride start), each with and without a full-token fine-tune (trainer.full_token_steps), fixed k=4 with
its grid at a random offset each training step (boundary.random_offset) and learned DTP with its
stride start shifted the same way (learned_offset), and the peers
at bench-clip's matched knobs: FLIP patch dropout with and without the fine-tune (evaluated on every
patch), CLIPA low resolution + fine-tune, ToMe, EViT; and a control, patch_mask: FLIP's random
patches blanked but every token run (boundary.mask_only, vanilla's FLOPs; the blank tokens keep their
positional embedding and still take part in attention), its augmentation without its savings. CIFAR-10 (bench-clip's recipe: vit_tiny at patch 4, 64 patches, 4 blocks) and digits.

Per row: zero-shot top-1 (mean and per seed), the whole model's training GFLOPs per sample (the
run's mean: efficiency/train_pflops_total over its samples), the steps the budget bought, wall-clock on this machine,
and the compute the row needed to first reach vanilla's final validation top-1 (from its per-epoch
val/zeroshot_top1 against efficiency/train_pflops_total, read from the bench's MLflow store), as a
share of the budget ("-" where it never did). The table is rewritten after every run, so a time
limit leaves what finished; --only and --seeds build it in parts, --vanilla-from takes vanilla's
runs (budget, final top-1, curve) from earlier frontiers' MLflow stores instead of training them again
(their wall-clock is the MLflow run's, without the process start), and --collect builds one table
from the parts' stores without training (every wall-clock then the MLflow run's); with --train-fit it
also scores each run's checkpoint on its own training images (fastclip.eval.train_fit) and gives the
gap to its held-out top-1: which rows fit their training images better, which generalise better.

    python -m fastclip.bench.frontier [--steps 1000] [--datasets cifar10,digits] [--seeds 0,1,2]
        [--only vanilla,fixed_hilbert,...] [--full-token 0.1] [--vanilla-from outputs/bench/frontier-A,...]
        [--collect outputs/bench/frontier-A,outputs/bench/frontier-B,... [--train-fit]]
"""
import argparse
import statistics
import time
from pathlib import Path

from fastclip import PROJECT_ROOT
from fastclip.bench.clip import CIFAR, DATASETS, DTP_VARIANTS, GEOMETRY, PEERS, matched_knob, per_seed
from fastclip.bench.common import emit, markdown_table, run_isolated, schedule

TOP1, VAL_TOP1, COMPUTE = "zeroshot/top1", "val/zeroshot_top1", "efficiency/train_pflops_total"
TRAIN_TOP1 = "train_fit/zeroshot_top1"  # the table's, not a logged metric: computed from the run's checkpoint
FIXED_HILBERT = DTP_VARIANTS["fixed_hilbert"][1]
LEARNED = [o for o in DTP_VARIANTS["gumbel_r1_hilbert_stride"][1] if o != "eval.placement_control=true"]


def rows_for(dataset: str, full_token: float) -> dict[str, tuple[str, list[str]]]:
    """key -> (label, overrides beyond the budget) of every row; the peers' knobs matched to DTP fixed
    k=4 Hilbert's image GFLOPs as bench-clip matches them."""
    from fastclip.bench.clip import tower_gflops
    target = tower_gflops(FIXED_HILBERT)
    fine_tune = [f"trainer.full_token_steps={full_token}"]
    rows = {"vanilla": ("vanilla ViT", ["boundary=none"]),
            "fixed_hilbert": ("DTP fixed k=4 Hilbert", FIXED_HILBERT),
            "fixed_hilbert_ft": (f"DTP fixed k=4 Hilbert + full-token {full_token}", FIXED_HILBERT + fine_tune),
            # the grid shifted by a random offset each step: boundaries that vary as patch dropout's subset does
            "fixed_hilbert_offset": ("DTP fixed k=4 Hilbert, random grid offset in training",
                                     FIXED_HILBERT + ["boundary.random_offset=true"]),
            "learned": ("DTP gumbel d->d->1, Hilbert, stride start", LEARNED),
            # the stride start's position logits shifted the same way: learned boundaries that vary too
            "learned_offset": ("DTP gumbel d->d->1, Hilbert, stride start, random offset in training",
                               LEARNED + ["boundary.random_offset=true"]),
            "learned_ft": (f"DTP gumbel d->d->1, Hilbert, stride start + full-token {full_token}", LEARNED + fine_tune)}
    # patch dropout also without the fine-tune (evaluated on every patch): what the fine-tune adds
    for key, fine in (("patch_dropout", True), ("patch_dropout", False), ("lowres", True), ("tome", False),
                      ("evit", False)):
        label, candidates, overrides_for = PEERS[key]
        value, _ = matched_knob(candidates, overrides_for, target)
        overrides = overrides_for(value)
        if key == "patch_dropout":  # FLIP trains at its keep rate and evaluates on every patch
            overrides = [o for o in overrides if not o.startswith("boundary.eval_keep")]
        rows[key + ("_ft" if fine else "")] = (label.format(value).replace(", eval at keep", "")
                                               + (f" + full-token {full_token}" if fine else ""),
                                               overrides + (fine_tune if fine else []))
    # the control: FLIP's draw as an augmentation alone (the patches blanked, every token run: vanilla's
    # compute), which separates what patch dropout's random masking does from the steps its savings buy
    keep_overrides = rows["patch_dropout"][1]
    keep = next(o.split("=")[1] for o in keep_overrides if o.startswith("boundary.keep="))
    rows["patch_mask"] = (f"patch dropout keep={float(keep):.3f} as masking only (every token run)",
                          keep_overrides + ["boundary.mask_only=true"])
    return rows


def reached_at(store: str, run_id: str, target: float) -> float | None:
    """The counted compute (PFLOPs) at the first evaluation whose val/zeroshot_top1 reached `target`."""
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=store)
    top1 = sorted((m.step, m.value) for m in client.get_metric_history(run_id, VAL_TOP1))
    compute = dict(sorted((m.step, m.value) for m in client.get_metric_history(run_id, COMPUTE)))
    for step, value in top1:
        if value >= target:
            return max((c for s, c in compute.items() if s <= step), default=None)
    return None


def finished_runs(roots: list[str], dataset: str):
    """(row key, seed, metrics with mlflow_run_id, store and wall_s) of every finished run of `dataset`
    in earlier frontiers' stores (ROOT/mlflow.db), the row key read from the run's directory
    (ROOT/<dataset>/<key>/seed<S>), its wall-clock the MLflow run's (without the process start).
    InputError naming a root that has no store."""
    import mlflow
    from fastclip.errors import InputError
    for root in roots:
        db = Path(root) / "mlflow.db"
        if not db.is_file():
            raise InputError(f"{db} does not exist (not a frontier's folder)")
        store = f"sqlite:///{db.resolve()}"
        client = mlflow.MlflowClient(tracking_uri=store)
        experiment = client.get_experiment_by_name(f"frontier-{dataset}")
        if experiment is None:
            continue
        for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                                      order_by=["attributes.start_time ASC"]):
            key = Path(run.data.tags.get("fastclip.run_dir", "")).parent.name
            yield key, int(run.data.params["seed"]), run.data.params, {
                **run.data.metrics, "mlflow_run_id": run.info.run_id, "store": store,
                "wall_s": (run.info.end_time - run.info.start_time) / 1000,
                "run_dir": run.data.tags.get("fastclip.run_dir")}


def vanilla_at(key: str, params: dict, steps: int) -> bool:
    """Whether a finished run (finished_runs) is vanilla's at the bench's `steps` steps: its row's."""
    return key == "vanilla" and params.get("trainer.max_steps") == str(steps)


def logged_vanilla(roots: list[str], dataset: str, seed: int, steps: int) -> dict:
    """Vanilla's newest finished run of `seed` at `steps` steps in earlier frontiers' stores
    (finished_runs), as --collect takes it. InputError naming the roots when there is none."""
    from fastclip.errors import InputError
    found = [metrics for key, run_seed, params, metrics in finished_runs(roots, dataset)
             if run_seed == seed and vanilla_at(key, params, steps)]
    if not found:
        raise InputError(f"--vanilla-from: no finished vanilla run of {dataset} seed {seed} at {steps} steps "
                         f"in {', '.join(roots)}")
    return found[-1]  # newest last


def summary_row(label: str, runs: list[dict], budget: float, vanilla_val: float) -> dict:
    """One table row from a row's runs (one per seed): means, and per seed where they differ."""
    reached = [reached_at(r["store"], r["mlflow_run_id"], vanilla_val) for r in runs]
    return {"variant": label, "top1": statistics.mean(r[TOP1] for r in runs),
            "per_seed": per_seed([r[TOP1] for r in runs]),
            # the run's mean: a fine-tuned row's last count is its full-token phase's
            "gflops": statistics.mean(r[COMPUTE] * 1e6 / r["train/samples"] for r in runs),
            "steps": statistics.mean(r["train/steps"] for r in runs),
            "compute": statistics.mean(r[COMPUTE] for r in runs) / budget,
            "wall": statistics.mean(r["wall_s"] for r in runs),
            "to_vanilla": "-" if None in reached else f"{statistics.mean(reached) / budget:.2f}",
            "to_vanilla_seeds": " / ".join("-" if c is None else f"{c / budget:.2f}" for c in reached)} | (
        {"train_top1": statistics.mean(r[TRAIN_TOP1] for r in runs),
         "gap": statistics.mean(r[TRAIN_TOP1] - r[TOP1] for r in runs)} if all(TRAIN_TOP1 in r for r in runs) else {})


def training_top1_of(run: dict) -> float:
    """A finished run's (finished_runs) zero-shot top-1 on its training images, from its checkpoint.
    InputError naming the run when its directory or checkpoint is gone."""
    from fastclip.errors import InputError
    from fastclip.eval.train_fit import training_top1
    checkpoint = Path(run["run_dir"] or "") / "checkpoints" / "last.pt"
    if not run["run_dir"] or not checkpoint.is_file():
        raise InputError(f"--train-fit: run {run['mlflow_run_id']} in {run['store']} has no checkpoint "
                         f"({checkpoint}): its run directory was moved or deleted")
    return training_top1(checkpoint)


def section(ds: str, steps: int, budget: float, seeds: list[int], table: list[dict]) -> str:
    fit = [("top-1 on its training images", "train_top1", ".3f"), ("gap (training - held-out)", "gap", "+.3f")] \
        if table and all("train_top1" in row for row in table) else []
    return (f"### {ds}: every row at vanilla's {steps}-step training compute ({budget:.4g} PFLOPs), "
            f"seeds {','.join(map(str, seeds))}\n\n" + markdown_table(table, [
                ("variant", "variant", ""), ("zero-shot top-1", "top1", ".3f"),
                ("per seed", "per_seed", ""), *fit, ("mean train GFLOPs/sample", "gflops", ".4g"),
                ("steps bought", "steps", ".0f"), ("compute used / budget", "compute", ".3f"),
                ("wall-clock s", "wall", ".0f"),
                ("compute to vanilla's final val top-1 / budget", "to_vanilla", ""),
                ("per seed", "to_vanilla_seeds", "")]))


def collect(roots: list[str], ds: str, steps: int, full_token: float, train_fit: bool = False) -> str:
    """The table of every row run in earlier frontiers (--collect), built in parts: each row's newest
    finished run per seed; the budget is vanilla's first seed's compute, the accuracy to reach the mean
    of vanilla's final validation top-1 over its seeds. train_fit: each run's checkpoint also scored on
    its training images (fastclip.eval.train_fit), with the gap to its held-out top-1. InputError where
    vanilla has no run (or, with train_fit, a run has no checkpoint)."""
    from fastclip.errors import InputError
    found: dict[str, dict[int, dict]] = {}
    for key, seed, params, metrics in finished_runs(roots, ds):
        if key != "vanilla" or vanilla_at(key, params, steps):
            found.setdefault(key, {})[seed] = metrics  # newest last
    if "vanilla" not in found:
        raise InputError(f"--collect: no finished vanilla run of {ds} at {steps} steps in {', '.join(roots)}")
    rows = rows_for(ds, full_token)
    if train_fit:
        for key in (k for k in rows if k in found):
            for r in found[key].values():
                r[TRAIN_TOP1] = training_top1_of(r)
    vanilla = found["vanilla"]
    budget = vanilla[min(vanilla)][COMPUTE]
    vanilla_val = statistics.mean(r[VAL_TOP1] for r in vanilla.values())
    table = [summary_row(label, [found[key][s] for s in sorted(found[key])], budget, vanilla_val)
             | {"variant": f"{label} (seeds {','.join(map(str, sorted(found[key])))})"}
             for key, (label, _) in rows.items() if key in found]
    return section(ds, steps, budget, sorted(vanilla), table)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="vanilla's steps: their counted compute is every row's budget")
    ap.add_argument("--datasets", default="cifar10,digits", help="comma-separated: cifar10, digits")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated; digits runs seed 0 only")
    ap.add_argument("--only", default="", help="comma-separated row keys (vanilla always runs: it sets the budget)")
    ap.add_argument("--full-token", type=float, default=0.1, help="trainer.full_token_steps of the fine-tuned rows")
    ap.add_argument("--vanilla-from", default="",
                    help="comma-separated earlier frontier folders whose vanilla runs are reused, matched by seed")
    ap.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench" / "frontier.md"),
                    help="the Markdown table's file (also printed)")
    ap.add_argument("--collect", default="",
                    help="comma-separated earlier frontier folders: build the table from every finished run in "
                         "them, train nothing (--seeds, --only and --vanilla-from do not apply)")
    ap.add_argument("--train-fit", action="store_true",
                    help="with --collect: also score each run's checkpoint on its own training images (zero-shot "
                         "top-1, evaluation templates) and give the gap to its held-out top-1")
    args = ap.parse_args(argv)
    if args.train_fit and not args.collect:
        ap.error("--train-fit applies with --collect (it scores the collected runs' checkpoints)")
    if args.collect:
        sections = {ds: collect(args.collect.split(","), ds, args.steps, args.full_token, args.train_fit)
                    for ds in args.datasets.split(",")}
        emit("\n\n".join(sections.values()), Path(args.out))
        return sections
    root = PROJECT_ROOT / "outputs" / "bench" / f"frontier-{time.strftime('%Y%m%d-%H%M%S')}"
    store = f"sqlite:///{root / 'mlflow.db'}"
    sections = {}
    for ds in args.datasets.split(","):
        if ds == "cifar10" and not CIFAR.is_dir():
            print(f"skipping cifar10: {CIFAR} is absent")
            continue
        seeds = [int(s) for s in args.seeds.split(",")] if ds == "cifar10" else [0]
        common = DATASETS[ds] + GEOMETRY + ["epochs=100000", "trainer.progress=false", "eval.boundary_picture=false",
                                            f"tracking.uri={store}", f"tracking.experiment=frontier-{ds}"]
        rows = rows_for(ds, args.full_token)
        keys = ["vanilla"] + [k for k in rows if k != "vanilla" and (not args.only or k in args.only.split(","))]
        table, budget, vanilla_val = [], None, None
        for key in keys:
            label, overrides = rows[key]
            runs = []
            for seed in seeds:
                if key == "vanilla" and args.vanilla_from:
                    runs.append(logged_vanilla(args.vanilla_from.split(","), ds, seed, args.steps))
                    budget = runs[0][COMPUTE]
                    continue
                length = schedule(args.steps, warmup=20) if key == "vanilla" else \
                    [f"trainer.max_pflops={budget!r}", f"trainer.warmup_steps={min(20, max(1, args.steps // 10))}"]
                t0 = time.perf_counter()
                m = run_isolated(common + overrides + length + [f"seed={seed}"], root / ds / key / f"seed{seed}")
                m["wall_s"], m["store"] = time.perf_counter() - t0, store
                runs.append(m)
                if key == "vanilla" and budget is None:
                    budget = m[COMPUTE]
            if key == "vanilla":
                vanilla_val = statistics.mean(r[VAL_TOP1] for r in runs)
            table.append(summary_row(label, runs, budget, vanilla_val))
            sections[ds] = section(ds, args.steps, budget, seeds, table)
            emit("\n\n".join(sections.values()), Path(args.out))  # rewritten after every row
    return sections


if __name__ == "__main__":
    from fastclip.errors import one_line_errors
    with one_line_errors():  # a folder or run that is not there: one line naming it
        main()
