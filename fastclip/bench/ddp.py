"""make bench-ddp: what data-parallel training buys on this machine. The same training at the same
global batch, alternated over rounds: one process on the whole batch against `--procs` processes
(torchrun, gloo on CPU, nccl on CUDA) on their parts. Throughput is the run's own
`throughput/train_samples_per_s` (training samples over data + step time, evaluation excluded),
read from its MLflow run; the table gives the median over rounds and the ratio to one process.

    python -m fastclip.bench.ddp [--procs 2] [--batch 256] [--steps 30] [--rounds 3] [override ...]

On 2 CPU cores two processes cannot run 2x: each gets one core (torchrun sets OMP_NUM_THREADS=1)
where one process used both for its intra-op threads.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fastclip import PROJECT_ROOT
from fastclip.bench.common import emit, markdown_table

METRIC = "throughput/train_samples_per_s"


def timed_run(command: list[str], store: str, name: str, cwd: Path) -> float:
    """Runs one training command; -> its samples/s as the MLflow run logged it."""
    from mlflow.tracking import MlflowClient
    subprocess.run([*command, f"tracking.uri={store}", f"tracking.run_name={name}", "trainer.progress=false"],
                   check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs(
        [e.experiment_id], f"attributes.run_name = '{name}'")]
    return runs[0].data.metrics[METRIC]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="the global batch")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "outputs" / "bench" / "ddp.md")
    args, overrides = parser.parse_known_args(argv)
    if args.batch % args.procs:
        parser.error(f"--batch {args.batch} does not split into {args.procs} processes")
    common = [f"trainer.max_steps={args.steps}", "eval.boundary_picture=false", *overrides]
    one = [sys.executable, "-m", "fastclip.train", f"trainer.batch_size={args.batch}", *common]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.procs}",
            "-m", "fastclip.train", f"trainer.batch_size={args.batch // args.procs}", *common]
    rates: dict[str, list[float]] = {"1": [], str(args.procs): []}
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for r in range(args.rounds):  # alternated, so a slow spell of the machine hits both
            rates["1"].append(timed_run(one, store, f"one-{r}", Path(tmp)))
            rates[str(args.procs)].append(timed_run(many, store, f"many-{r}", Path(tmp)))
    base = statistics.median(rates["1"])
    rows = [{"processes": p, "per_process": args.batch // int(p), "rate": statistics.median(v),
             "runs": " / ".join(f"{x:.1f}" for x in v), "ratio": statistics.median(v) / base}
            for p, v in rates.items()]
    table = markdown_table(rows, [("processes", "processes", "s"), ("batch per process", "per_process", "d"),
                                  ("samples/s (median)", "rate", ".1f"), ("each round", "runs", "s"),
                                  ("vs 1 process", "ratio", ".2f")])
    emit(f"global batch {args.batch}, {args.steps} steps, {args.rounds} rounds; overrides: "
         f"{' '.join(overrides) or 'none'}\n\n{table}", args.out)


if __name__ == "__main__":
    main()
