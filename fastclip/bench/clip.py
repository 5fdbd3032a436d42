"""make bench-clip: vanilla ViT vs DTP-ViT (gumbel prior 0.25 with the paper's d->4d->1 boundary
predictor, and with a d->d->1 one and row breaks, started at the prior's rate or at fixed k's grid;
fixed k=4; fixed k=4 and the stride-started d->d->1 row again with the patches read along a Hilbert
curve, where k=4 pools 2x2 squares) vs ToMe at the learned rows' GFLOPs, and the peer baselines (ToMe,
FLIP patch dropout, EViT, a coarser patch grid) each at the fixed-Hilbert row's GFLOPs with a ranking
by zero-shot top-1 among the rows at matched GFLOPs, equal steps, on digits and on CIFAR-10
(class-template captions; zero-shot on held-out images with unseen templates). Per run: zero-shot
top-1 (learned rows: also with each image pooled at another image's boundaries, eval.placement_control:
what the placement's tie to its image is worth), image GFLOPs from the real eval boundaries, achieved compression, the
share of the boundaries on fixed k's grid (1.0: a learned tower that settled on fixed's segmentation), median
step time (data wait included, and compute alone) and peak memory; then our training step vs
open_clip_train's train_one_epoch (harness overhead).

    python -m fastclip.bench.clip [--steps 300] [--datasets digits,cifar10] [--seeds 0,1,2]
        [--peers tome,patch_dropout,evit,coarser_grid] [--only-matched]

With several seeds every variant runs once per seed (the seed config key: weights, data order,
boundary noise); the table gives the mean and each seed's top-1, so a gap can be read against
the seed-to-seed spread.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from fastclip import PROJECT_ROOT
from fastclip.bench.common import emit, markdown_table, run_isolated, schedule

CIFAR = PROJECT_ROOT.parent / "shared" / "data" / "cifar10-test"
# 64 patches (32 px, patch 4), 4 blocks: DTP runs 1 block on all patches and 3 on segments.
GEOMETRY = ["encoder.vision.patch_size=4", "encoder.vision.layers=4"]  # DTP: boundary.image_pre_layers=1 (default)
# DTP variants' overrides, shared with bench-gpu-recipe
GUMBEL = ["boundary=gumbel", "boundary.prior=0.25", "boundary.apply_to=[image]"]
FIXED = ["boundary=fixed", "boundary.k=4", "boundary.apply_to=[image]"]
# the predictor's hidden width cut to d (at this 4-block toy its d->4d->1 MLP over all 64 patches
# costs ~7% of the vanilla tower, at ViT-B/16 ~1%), and segments never wrap from one patch row to
# the next (fixed k=4 is row-aligned here)
SMALL_PREDICTOR_ROW_BREAKS = ["boundary.predictor_ratio=1", "boundary.image_row_breaks=true"]
STRIDE_START = ["boundary.image_start=stride"]  # boundaries started at fixed k=4's
HILBERT = ["boundary.image_order=hilbert"]  # patches read along a Hilbert curve: fixed k=4 pools 2x2 squares
PLACEMENT_CONTROL = ["eval.placement_control=true"]  # + zero-shot top-1 with boundaries swapped between images
LEARNED = GUMBEL + PLACEMENT_CONTROL  # learned rows also report top-1 with each image at another image's boundaries
# The DTP rows both CIFAR benches run, one definition: key -> (table label, overrides)
DTP_VARIANTS = {
    "gumbel": ("DTP-ViT gumbel 0.25", LEARNED + ["boundary.predictor_ratio=4"]),  # the paper's predictor
    "fixed": ("DTP-ViT fixed k=4", FIXED),
    "gumbel_r1": ("DTP-ViT gumbel 0.25, predictor d->d->1", LEARNED + ["boundary.predictor_ratio=1"]),
    "gumbel_r1_rb": ("DTP-ViT gumbel 0.25, predictor d->d->1, row breaks", LEARNED + SMALL_PREDICTOR_ROW_BREAKS),
    "gumbel_r1_rb_stride": ("DTP-ViT gumbel 0.25, predictor d->d->1, row breaks, stride start",
                            LEARNED + SMALL_PREDICTOR_ROW_BREAKS + STRIDE_START),
    "fixed_hilbert": ("DTP-ViT fixed k=4, Hilbert order (2x2 squares)", FIXED + HILBERT),
    "gumbel_r1_hilbert_stride": ("DTP-ViT gumbel 0.25, predictor d->d->1, Hilbert order, stride start",
                                 LEARNED + ["boundary.predictor_ratio=1"] + HILBERT + STRIDE_START),
}
# bench-clip's rows after vanilla, in order, each with whether ToMe is matched to its GFLOPs
BENCH_CLIP_ROWS = [("gumbel", True), ("fixed", False), ("gumbel_r1_rb", True), ("gumbel_r1_rb_stride", False),
                   ("fixed_hilbert", False), ("gumbel_r1_hilbert_stride", False)]
DATASETS = {"digits": ["dataset=digits"],
            "cifar10": ["dataset=image_folder", f"dataset.path={CIFAR}"]}


def closest_monotone(values: list, cost, target: float):
    """The value whose cost(value) is closest to target, for a cost that only rises or only falls
    along `values` (plateaus allowed), by bisection: O(log n) calls of cost -> (value, its cost)."""
    counted = {}

    def at(i: int) -> float:
        if i not in counted:
            counted[i] = cost(values[i])
        return counted[i]

    lo, hi = 0, len(values) - 1
    rising = at(hi) >= at(lo)
    while hi - lo > 1:  # keep the target between at(lo) and at(hi)
        mid = (lo + hi) // 2
        if (at(mid) < target) == rising:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda i: abs(at(i) - target))
    return values[best], at(best)


def tower_gflops(overrides: list[str], geometry: list[str] = GEOMETRY, image_size: int = 32,
                 device: torch.device = torch.device("cpu")) -> float:
    """Image GFLOPs per image of an untrained tower in eval mode: the count of every row whose reduction
    does not depend on the weights (vanilla, fixed k, the peers' knobs)."""
    from fastclip.config import compose_train_config
    from fastclip.eval.efficiency import count_gflops
    from fastclip.models.clip import build_clip
    cfg = compose_train_config(geometry + overrides)
    model, _ = build_clip(cfg.encoder, cfg.boundary)
    model.to(device).eval()
    with torch.no_grad():
        return count_gflops(model.visual, torch.randn(2, 3, image_size, image_size, device=device))[0]


def matched_knob(candidates, overrides_for, gflops_target: float, geometry: list[str] = GEOMETRY,
                 image_size: int = 32, device: torch.device = torch.device("cpu")):
    """The knob value among `candidates` whose image tower's GFLOPs (tower_gflops) come closest to the
    target -> (value, its GFLOPs). overrides_for(value): the config overrides that set it. Every knob
    here moves the GFLOPs one way (ToMe's r, a keep rate, a patch size), so a bisection finds it in
    O(log n) model builds (a ViT-B/16 build takes seconds)."""
    return closest_monotone(list(candidates), lambda v: tower_gflops(overrides_for(v), geometry, image_size, device),
                            gflops_target)


def tome_r_for(gflops_target: float, geometry: list[str] = GEOMETRY, image_size: int = 32,
               device: torch.device = torch.device("cpu")) -> int:
    """The ToMe merge rate whose image GFLOPs come closest to the target."""
    return matched_knob(range(1, 49), lambda r: ["boundary=tome", f"boundary.r={r}"], gflops_target, geometry,
                        image_size, device)[0]


# The peer baselines bench-clip matches to the DTP fixed-Hilbert row's image GFLOPs: key -> (label with
# {} for the knob, the knob's candidates, its overrides). Patch dropout evaluates at its keep rate
# (eval_keep) so that its logged GFLOPs are the matched ones; its runs also score every patch at the end.
PEERS = {
    "tome": ("ToMe r={}", range(1, 49), lambda r: ["boundary=tome", f"boundary.r={r}"]),
    "patch_dropout": ("patch dropout keep={:.3f}, eval at keep", [k / 64 for k in range(4, 64)],
                      lambda keep: ["boundary=patch_dropout", f"boundary.keep={keep}", "boundary.eval_keep=true"]),
    # at block 0, where DTP pools (after block 0): matched, it keeps 0.35 (at block 1 it would keep 0.10)
    "evit": ("EViT keep={:.2f} at block 0", [k / 100 for k in range(5, 100, 5)],
             lambda keep: ["boundary=evit", f"boundary.keep={keep}", "boundary.layers=[0]"]),
    # CLIPA: the image read at scale x its side; on the 8 x 8 patch grid, whole patches: k/8
    "lowres": ("CLIPA low resolution scale={:.3f}", [k / 8 for k in range(2, 8)],
               lambda scale: ["boundary=lowres", f"boundary.scale={scale}"]),
    "coarser_grid": ("vanilla ViT, patch {} (coarser grid)", range(5, 9),
                     lambda p: ["boundary=none", f"encoder.vision.patch_size={p}"]),
}
MATCH_BAND = 0.10  # rows within 10% of the target GFLOPs count as matched in the ranking


def ranking(rows: list[dict], target: float) -> str:
    """The rows within MATCH_BAND of the target image GFLOPs, best zero-shot top-1 first; then the rows
    cheaper than the band (a coarser grid lands there), which a matched row must also beat to win."""
    def line(r):
        return f"{r['variant']}: top-1 {r['zeroshot/top1']:.3f}, GFLOPs / vanilla {r['gflops_ratio']:.2f}"
    matched = sorted((r for r in rows if abs(r["efficiency/image_gflops"] / target - 1) <= MATCH_BAND),
                     key=lambda r: -r["zeroshot/top1"])
    cheaper = sorted((r for r in rows if r["efficiency/image_gflops"] / target - 1 < -MATCH_BAND),
                     key=lambda r: -r["zeroshot/top1"])
    text = (f"Ranking at matched image GFLOPs ({target:.4f} +- {MATCH_BAND:.0%}):\n\n"
            + "\n".join(f"{i + 1}. {line(r)}" for i, r in enumerate(matched)))
    if cheaper:
        text += "\n\nCheaper than the band (fewer GFLOPs):\n\n" + "\n".join(f"- {line(r)}" for r in cheaper)
    return text


def over_seeds(name: str, overrides: list[str], run_dir: Path, seeds: list[int]) -> dict:
    """One isolated run per seed -> the row: each metric's mean over the seeds, and the seeds' top-1s."""
    runs = [run_isolated(overrides + [f"seed={s}"], run_dir / f"seed{s}") for s in seeds]
    row = {k: statistics.mean(r[k] for r in runs) for k, v in runs[0].items()
           if isinstance(v, (int, float)) and all(k in r for r in runs)}
    row = {"variant": name, **row, "top1_per_seed": per_seed([r["zeroshot/top1"] for r in runs])}
    if all("zeroshot/top1_all_patches" in r for r in runs):
        row["top1_all_patches_per_seed"] = per_seed([r["zeroshot/top1_all_patches"] for r in runs])
    return row


def per_seed(values: list[float | None]) -> str:
    """Each seed's value for a table cell, "-" for a seed that failed or has not finished."""
    return " / ".join("-" if v is None else f"{v:.3f}" for v in values)


def all_patches_row(row: dict, vanilla_gflops: float) -> dict:
    """Patch dropout's eval-on-every-patch row, read from the same runs (their final
    `zeroshot/top1_all_patches`): the training columns are theirs, the eval's cost is vanilla's."""
    return {**row, "variant": row["variant"].replace("eval at keep", "eval on all patches (same runs)"),
            "zeroshot/top1": row["zeroshot/top1_all_patches"], "efficiency/image_gflops": vanilla_gflops,
            "efficiency/compression_image": 1.0, "top1_per_seed": row.get("top1_all_patches_per_seed", ""),
            "top1_curve": None}  # the keep-rate run's evaluations were at the keep rate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--datasets", default="digits,cifar10")
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds (seed=...); top-1 is their mean")
    ap.add_argument("--overhead-epochs", type=int, default=10, help="0 skips the harness-overhead measurement")
    ap.add_argument("--peers", default=",".join(PEERS), help="peer baselines matched to DTP fixed k=4 Hilbert's "
                    f"GFLOPs (comma-separated of {', '.join(PEERS)}; empty: none)")
    ap.add_argument("--only-matched", action="store_true", help="vanilla, DTP fixed k=4 Hilbert and the peers only")
    ap.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench" / "clip.md"))
    args = ap.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = PROJECT_ROOT / "outputs" / "bench" / f"clip-{stamp}"
    sections = []
    for ds in args.datasets.split(","):
        if ds == "cifar10" and not CIFAR.is_dir():
            print(f"skipping cifar10: {CIFAR} is absent")
            continue
        common = DATASETS[ds] + GEOMETRY + schedule(args.steps, warmup=20) + ["epochs=100000",
                                            "eval.every_epochs=100000", "trainer.progress=false",
                                            "tracking.experiment=bench-clip"]
        # (name, overrides, ToMe matched to its GFLOPs)
        variants = [("vanilla ViT", ["boundary=none"], False)] + [
            (*DTP_VARIANTS[key], match) for key, match in BENCH_CLIP_ROWS
            if not args.only_matched or key == "fixed_hilbert"]
        rows = []
        for name, overrides, _ in variants:
            print(f"== {ds}: {name}", flush=True)
            rows.append(over_seeds(name, common + overrides, root / ds / name.replace(" ", "_").replace(">", ""), seeds))
        tome_runs = {}
        for row, (_, _, match) in zip(rows, variants):  # ToMe at each such row's GFLOPs (as computed)
            if not match:
                continue
            r = tome_r_for(row["efficiency/image_gflops"])
            if r not in tome_runs:
                print(f"== {ds}: ToMe r={r}", flush=True)
                tome_runs[r] = over_seeds(f"ToMe r={r} (GFLOPs of {row['variant']})",
                                          common + ["boundary=tome", f"boundary.r={r}"], root / ds / f"tome_r{r}", seeds)
        rows.extend(tome_runs.values())
        target = next(r for r in rows if r["variant"] == DTP_VARIANTS["fixed_hilbert"][0])["efficiency/image_gflops"]
        for key in args.peers.split(",") if args.peers else []:
            label, candidates, overrides_for = PEERS[key]
            value, _ = matched_knob(candidates, overrides_for, target)
            name = label.format(value)
            print(f"== {ds}: {name}", flush=True)
            rows.append(over_seeds(name, common + overrides_for(value), root / ds / f"{key}_{value}", seeds))
            if key == "patch_dropout":  # the same runs, evaluated on every patch at the end
                rows.append(all_patches_row(rows[-1], rows[0]["efficiency/image_gflops"]))
        base = rows[0]
        for row in rows:
            row["gflops_ratio"] = row["efficiency/image_gflops"] / base["efficiency/image_gflops"]
            row["step_ratio"] = row["time/step_median_s"] / base["time/step_median_s"]
            row["compute_ratio"] = row["time/compute_median_s"] / base["time/compute_median_s"]
            if "efficiency/image_gflops_unpadded" in row:  # each image alone: no padding to the batch's longest
                row["unpadded_ratio"] = row["efficiency/image_gflops_unpadded"] / base["efficiency/image_gflops"]
            row["top1_delta"] = 100 * (row["zeroshot/top1"] - base["zeroshot/top1"])
        sections.append(f"### {ds} ({args.steps} steps, seeds {args.seeds}, batch 128, vit_tiny at patch 4: 64 patches, 4 blocks)\n\n"
                        + markdown_table(rows, [
                            ("variant", "variant", "s"), ("zero-shot top-1", "zeroshot/top1", ".3f"),
                            *([("top-1 per seed", "top1_per_seed", "s")] if len(seeds) > 1 else []),
                            ("top-1, boundaries swapped between images", "zeroshot/top1_shuffled_placement", ".3f"),
                            ("Δ top-1 (pts)", "top1_delta", "+.1f"),
                            ("image GFLOPs", "efficiency/image_gflops", ".4f"), ("GFLOPs / vanilla", "gflops_ratio", ".2f"),
                            ("unpadded GFLOPs / vanilla", "unpadded_ratio", ".2f"),
                            ("achieved image compression", "efficiency/compression_image", ".2f"),
                            ("boundaries on fixed k's grid", "boundary/image_on_stride", ".2f"),
                            ("median step (s)", "time/step_median_s", ".3f"), ("step / vanilla", "step_ratio", ".2f"),
                            ("of which data wait (s)", "time/data_median_s", ".3f"),
                            ("compute / vanilla", "compute_ratio", ".2f"),
                            ("peak RSS (MB)", "memory/peak_rss_mb", ".0f")])
                        + "\n\n" + ranking(rows, target))
    if args.overhead_epochs <= 0:
        emit("\n\n".join(sections), Path(args.out))
        return
    print("== harness overhead", flush=True)
    from fastclip.bench.overhead import markdown, measure
    from fastclip.config import compose_train_config
    cfg = compose_train_config([f"epochs={args.overhead_epochs}", "trainer.progress=false"])
    sections.append(markdown(measure(cfg, root / "overhead")))
    emit("\n\n".join(sections), Path(args.out))


if __name__ == "__main__":
    main()
