"""make report: compare the runs of one MLflow experiment side by side.

    python -m fastclip.report [--experiment fastclip] [--uri sqlite:///outputs/mlflow.db]
                              [--metrics zeroshot/top1,efficiency/image_gflops] [--out outputs/reports/x.md]

One row per FINISHED run (sweep parents left out), newest first: the config keys that differ
between the runs (what the grid varied), then the chosen metrics' last values.
"""
import argparse
from pathlib import Path

import mlflow

from fastclip.bench.common import emit, markdown_table
from fastclip.tracking import resolve_uri

DEFAULT_METRICS = ["zeroshot/top1", "zeroshot/imagenet_top1", "retrieval/i2t_r1", "retrieval/t2i_r1", "lm/test_bpc",
                   "efficiency/compression_image", "efficiency/compression_text", "efficiency/image_gflops",
                   "efficiency/text_gflops", "throughput/train_samples_per_s", "time/train_s", "data/skipped"]
IGNORED_PARAMS = {"tracking.run_name", "trainer.resume"}


def compare(uri: str, experiment: str, metrics: list[str]) -> str:
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"--experiment {experiment!r}: no such experiment in {uri}")
    runs = [r for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
            if r.info.status == "FINISHED" and r.data.tags.get("fastclip.role") != "sweep"]
    if not runs:
        return f"experiment {experiment!r}: no finished run"
    keys = sorted({k for r in runs for k in r.data.params} - IGNORED_PARAMS)
    varied = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    present = [m for m in metrics if any(m in r.data.metrics for r in runs)]
    rows = [{"run": r.info.run_name or r.info.run_id[:8], "commit": r.data.tags.get("mlflow.source.git.commit", "")[:8],
             **{k: r.data.params.get(k, "") for k in varied}, **{m: r.data.metrics.get(m) for m in present}}
            for r in runs]
    columns = ([("run", "run", "s"), ("commit", "commit", "s")] + [(k, k, "s") for k in varied]
               + [(m, m, ".4g") for m in present])
    return f"### {experiment}: {len(runs)} finished runs ({uri})\n\n" + markdown_table(rows, columns)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="fastclip")
    ap.add_argument("--uri", default=None, help="default: $MLFLOW_TRACKING_URI, else ./outputs/mlflow.db (as training)")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    ap.add_argument("--out", default=None, help="default: outputs/reports/<experiment>.md")
    args = ap.parse_args(argv)
    uri = resolve_uri(args.uri)  # the store training writes from this directory
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise SystemExit(f"no MLflow store at {uri} (runs launched from this directory write there; --uri names another)")
    text = compare(uri, args.experiment, args.metrics.split(","))
    emit(text, Path(args.out) if args.out else Path("outputs") / "reports" / f"{args.experiment}.md")
    return text


if __name__ == "__main__":
    main()
