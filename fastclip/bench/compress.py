"""make bench-compress: what each compression option buys and costs on top of a vanilla ViT and of
DTP fixed k=4 in Hilbert order, equal training steps, on CIFAR-10 (bench-clip's recipe: vit_tiny at
patch 4, 64 patches, 4 blocks, batch 128, class-template captions, zero-shot on held-out images).

Rows per model: none, quant (int8 dynamic), prune 50% unstructured, prune 30% structured, distill
(teacher: the vanilla model trained 3x longer, trained first). The none row is the quant run's model
before quantization (quantization happens after training, so that run's dense numbers are the
plain run's; it also saves training the same model twice). Columns: zero-shot top-1, model MB,
image GFLOPs, eval latency (ms per batch of 64, median), train step time (median).

Then latency-only rows at ViT-B/32 size (random weights, batch 16 at 224 px): dense vs int8 dynamic
vs 30% structured vs 50% unstructured, where matmuls dominate the forward.

    python -m fastclip.bench.compress [--steps 1000] [--seed 0] [--b32-batch 16] [--skip-training] [--device cuda]
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from fastclip import PROJECT_ROOT
from fastclip.bench.clip import CIFAR, DTP_VARIANTS, GEOMETRY
from fastclip.bench.common import emit, markdown_table, run_isolated, schedule

MODELS = {"vanilla ViT": ["boundary=none"], "DTP fixed k=4, Hilbert": DTP_VARIANTS["fixed_hilbert"][1]}
OPTIONS = {"quant": ["compression=quant", "compression.scheme=dynamic"],
           "prune 50% unstructured": ["compression=prune", "compression.sparsity=0.5",
                                      "compression.structure=unstructured"],
           "prune 30% structured": ["compression=prune", "compression.sparsity=0.3", "compression.structure=structured"],
           "distill": ["compression=distill"]}
COLUMNS = [("model", "model", "s"), ("compression", "option", "s"), ("zero-shot top-1", "top1", ".3f"),
           ("Δ top-1 vs none (pts)", "delta", "+.1f"), ("model MB", "mb", ".2f"), ("image GFLOPs", "gflops", ".4f"),
           ("eval ms / batch", "eval_ms", ".1f"), ("eval / dense", "eval_ratio", ".2f"),
           ("train step (s)", "step_s", ".3f"), ("sparsity", "sparsity", ".2f")]


def row(model: str, option: str, m: dict, dense: bool = False) -> dict:
    """A table row from a run's metrics; dense=True: the model before its compression (the *_dense twins)."""
    def pick(key):
        return m.get(f"{key}_dense", m.get(key)) if dense else m.get(key)
    return {"model": model, "option": option, "top1": pick("zeroshot/top1"), "mb": pick("compression/model_mb"),
            "gflops": pick("efficiency/image_gflops"), "eval_ms": pick("time/eval_batch_ms"),
            "step_s": m.get("time/step_median_s"), "sparsity": None if dense else m.get("compression/sparsity"),
            "extra": m}


def train_rows(steps: int, seed: int, root: Path) -> tuple[list[dict], dict]:
    common = (["dataset=image_folder", f"dataset.path={CIFAR}"] + GEOMETRY
              + ["epochs=100000", "eval.every_epochs=100000", "trainer.progress=false", "eval.boundary_picture=false",
                 "tracking.experiment=bench-compress", f"seed={seed}"])
    print("== teacher: vanilla ViT, 3x the steps", flush=True)
    teacher = run_isolated(common + schedule(3 * steps, warmup=20) + ["boundary=none"], root / "teacher")
    common += schedule(steps, warmup=20)
    teacher_ckpt = root / "teacher" / "checkpoints" / "last.pt"
    rows = []
    for model, model_overrides in MODELS.items():
        for option, overrides in OPTIONS.items():
            print(f"== {model}: {option}", flush=True)
            extra = [f"compression.teacher={teacher_ckpt}"] if option == "distill" else []
            name = f"{model}_{option}".replace(" ", "_").replace(",", "").replace("%", "")
            m = run_isolated(common + model_overrides + overrides + extra, root / name)
            if option == "quant":
                rows.append(row(model, "none", m, dense=True))
            rows.append(row(model, option, m))
    for r in rows:
        none = next(x for x in rows if x["model"] == r["model"] and x["option"] == "none")
        if r["mb"] is None:  # distill: the same architecture as the plain model
            r["mb"] = none["mb"]
        r["delta"] = 100 * (r["top1"] - none["top1"])
        # against the same run's dense twin where it has one (measured back to back in one process), else the
        # plain model's (distill: the same architecture)
        base = r["extra"].get("time/eval_batch_ms_dense") if r["option"] != "none" else None
        r["eval_ratio"] = r["eval_ms"] / (base or none["eval_ms"]) if r["eval_ms"] and none["eval_ms"] else None
    return rows, teacher


@torch.no_grad()
def b32_latency(batch: int, repeats: int = 5, device: str = "cpu") -> list[dict]:
    """ViT-B/32 CLIP (random weights): eval latency of the dense model, its int8 dynamic copy (token
    embedding int8, as compression=quant's default, and left float), a 30%
    structured copy (heads and channels removed) and a 50% unstructured one (zeros in dense matrices).
    Each variant's median over `repeats` rounds, the rounds interleaved so drift hits all alike."""
    from fastclip.compression.measure import eval_batch_ms, model_bytes
    from fastclip.compression.prune import Pruner
    from fastclip.compression.prune_masks import shrunk_copy
    from fastclip.compression.quant import quantized_copy
    from fastclip.config import compose_train_config
    from fastclip.models.clip import build_clip
    torch.manual_seed(0)
    cfg = compose_train_config(["encoder=vit_b32"])
    dense, tokenizer = build_clip(cfg.encoder, cfg.boundary)
    dense.to(device).eval()
    images = torch.randn(batch, 3, 224, 224, device=device)
    tokens = tokenizer([f"a photo of a thing number {i}" for i in range(batch)]).to(device)

    def pruned(sparsity, structure):
        """compression=prune as a run configures it, pruned at once (oneshot at step 1 of 1, no fine-tuning)."""
        import copy
        model = copy.deepcopy(dense)
        cc = compose_train_config(["compression=prune", f"compression.sparsity={sparsity}",
                                   f"compression.structure={structure}", "compression.schedule=oneshot",
                                   "compression.finetune_steps=0"]).compression
        Pruner(model, cc, total_steps=1, warmup_steps=0).after_step(1)
        return shrunk_copy(model).eval() if structure == "structured" else model
    variants = {"dense": dense, "int8 dynamic": quantized_copy(dense, "dynamic"),
                "int8 dynamic, token embedding float": quantized_copy(dense, "dynamic", embedding="float"),
                "prune 30% structured": pruned(0.3, "structured"), "prune 50% unstructured": pruned(0.5, "unstructured")}
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, model in variants.items():
            times[name].append(eval_batch_ms(model, images, tokens, repeats=3))
    base = statistics.median(times["dense"])
    return [{"variant": name, "ms": statistics.median(t), "ratio": statistics.median(t) / base,
             "mb": model_bytes(variants[name]) / 1e6} for name, t in times.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--b32-batch", type=int, default=16)
    ap.add_argument("--skip-training", action="store_true", help="the ViT-B/32 latency rows only")
    ap.add_argument("--device", default="cpu", help="where the ViT-B/32 latency rows run (cpu, cuda)")
    ap.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench" / "compress.md"))
    args = ap.parse_args(argv)
    sections = []
    if not args.skip_training:
        if not CIFAR.is_dir():
            raise SystemExit(f"bench-compress trains on CIFAR-10: {CIFAR} is absent")
        root = PROJECT_ROOT / "outputs" / "bench" / f"compress-{time.strftime('%Y%m%d-%H%M%S')}"
        rows, teacher = train_rows(args.steps, args.seed, root)
        sections.append(f"### CIFAR-10, {args.steps} steps, seed {args.seed} (bench-clip's recipe); teacher: vanilla "
                        f"ViT at {3 * args.steps} steps, zero-shot top-1 {teacher['zeroshot/top1']:.3f}\n\n"
                        + markdown_table(rows, COLUMNS))
    print("== ViT-B/32 latency (random weights)", flush=True)
    b32 = b32_latency(args.b32_batch, device=args.device)
    from fastclip.runtime import math_mode
    sections.append(f"### ViT-B/32 CLIP on {args.device} ({math_mode(torch.device(args.device))}), random weights, batch "
                    f"{args.b32_batch} at 224 px: eval latency (median of 5 interleaved rounds)\n\n" + markdown_table(b32, [
                        ("variant", "variant", "s"), ("ms / batch", "ms", ".0f"), ("/ dense", "ratio", ".2f"),
                        ("model MB", "mb", ".0f")]))
    emit("\n\n".join(sections), Path(args.out))


if __name__ == "__main__":
    main()
