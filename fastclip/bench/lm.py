"""make bench-lm: vanilla vs DTP gumbel (prior 0.25) vs whitespace on one text8-format file,
equal steps and width (the paper's 2 + 8 + 2 geometry at width 128): test BPC over the whole
test split, achieved shortening, median step time and peak memory, side by side.

    python -m fastclip.bench.lm [--steps 1000] [--path ../shared/data/text/wikitext2-valid.text8]

Without --path: WikiText-2 valid from ../shared when it is there, else the built-in English text
(dataset.path=null). A DTP row whose evaluation pools nearly every window into one segment (a
gumbel predictor still unconfident after a short run thresholds to no boundary) is flagged as
collapsed, its BPC not shown as a result.
"""
import argparse
import time
from pathlib import Path

from fastclip import PROJECT_ROOT
from fastclip.bench.common import emit, markdown_table, run_isolated, schedule
from fastclip.eval.bpc import collapsed

DEFAULT_PATH = PROJECT_ROOT.parent / "shared" / "data" / "text" / "wikitext2-valid.text8"
VARIANTS = [("vanilla (12 full-length layers)", ["boundary=none"]),
            ("DTP gumbel prior 0.25", ["boundary=gumbel", "boundary.prior=0.25"]),
            ("DTP whitespace", ["boundary=whitespace"])]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1000)  # 300 left gumbel short of vanilla; 1000 takes ~12 min
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--path", default=None, help="text8-format file (default: WikiText-2 valid from ../shared, "
                                                 "else the built-in text)")
    ap.add_argument("--encoder", default="char_lm_bench")
    ap.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench" / "lm.md"))
    args = ap.parse_args(argv)
    if args.path is None:
        args.path = str(DEFAULT_PATH) if DEFAULT_PATH.is_file() else None
    elif not Path(args.path).is_file():
        raise SystemExit(f"--path {args.path}: no such file")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = ["task=lm", f"dataset.path={args.path or 'null'}", f"encoder={args.encoder}", "epochs=1",
              *schedule(args.steps, warmup=30), f"trainer.batch_size={args.batch_size}",
              f"task.context={args.context}", f"task.eval_stride={args.context // 2}", "task.valid_max_chars=20000",
              "trainer.progress=false", "tracking.experiment=bench-lm"]
    rows = []
    for name, overrides in VARIANTS:
        print(f"== {name}", flush=True)
        m = run_isolated(common + overrides, PROJECT_ROOT / "outputs" / "bench" / f"lm-{stamp}" / overrides[0])
        m["variant"] = name
        rows.append(m)
    flag_collapsed(rows, args.context)
    base = rows[0]
    for r in rows:
        r["step_ratio"] = r["time/step_median_s"] / base["time/step_median_s"]
        if r["lm/test_bpc"] is not None:
            r["bpc_delta"] = r["lm/test_bpc"] - base["lm/test_bpc"]
    table = markdown_table(rows, [
        ("variant", "variant", "s"), ("test BPC", "lm/test_bpc", ".4f"), ("Δ BPC vs vanilla", "bpc_delta", "+.4f"),
        ("note", "note", "s"),
        ("achieved shortening", "efficiency/compression_text", ".2f"),
        ("median step (s)", "time/step_median_s", ".3f"), ("step time / vanilla", "step_ratio", ".2f"),
        ("peak RSS (MB)", "memory/peak_rss_mb", ".0f"), ("RSS growth in run (MB)", "memory/train_growth_mb", ".0f")])
    header = (f"bench-lm: {args.path or 'built-in text (pydoc topics)'}, {args.steps} steps x batch {args.batch_size} x {args.context} chars, "
              f"encoder={args.encoder}; test BPC over the whole test split ({int(rows[0]['lm/test_chars'])} chars)\n")
    emit(header + "\n" + table, Path(args.out))


def flag_collapsed(rows: list[dict], context: int) -> None:
    """A DTP row whose evaluation left at most 2 segments per window (shortening >= context / 2) has
    collapsed: its BPC measures a model that hardly uses its shortened layers, not DTP. Its BPC cell
    is left empty and a note says why."""
    for r in rows:
        r.setdefault("note", "")
        shortening = r.get("efficiency/compression_text")
        if shortening and collapsed(shortening, context) and not r["variant"].startswith("vanilla"):
            r["note"] = (f"collapsed: {shortening:.0f}x, ~{context / shortening:.1f} segments per {context}-char "
                         f"window at evaluation (unconfident predictor: train longer); test BPC "
                         f"{r['lm/test_bpc']:.4f} not a result")
            r["lm/test_bpc"] = None


if __name__ == "__main__":
    main()
