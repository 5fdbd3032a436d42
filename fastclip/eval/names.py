"""Metric names shared by training and the report, kept free of torch so the report can import them,
and the catalog of every metric a run logs (CATALOG)."""
import functools
import re
from dataclasses import dataclass

# what a run (and a sweep's summary) reports last, in order of preference: the test split's, measured once at the end
HEADLINE_METRICS = ("zeroshot/top1", "zeroshot/imagenet_top1", "retrieval/i2t_r1", "lm/test_bpc")
# what the entrypoint returns, so what Hydra's sweeper optimises, in order of preference: the validation
# split's (per-epoch evaluation), never the test split's, whose best value over a search would be biased up
OBJECTIVE_METRICS = ("val/zeroshot_top1", "val/i2t_r1", "val/bpc")
# what a run cost, shown beside the headline wherever runs are compared (a sweep's end table, the UI's view)
COST_METRICS = ("efficiency/train_gflops_mean", "time/train_s")
# per-epoch (validation) metric names: the test split's name -> the validation split's
VAL_NAMES = {"zeroshot/top1": "val/zeroshot_top1", "zeroshot/top5": "val/zeroshot_top5", "lm/test_bpc": "val/bpc"}


def val_name(test_name: str) -> str:
    """The validation twin of a test metric: zeroshot/top1 -> val/zeroshot_top1, retrieval/i2t_r1 ->
    val/i2t_r1 (retrieval's names under val/ as they are), lm/test_bpc -> val/bpc. A name already
    under val/ is its own twin."""
    if test_name.startswith("val/"):
        return test_name
    return VAL_NAMES.get(test_name) or "val/" + test_name.removeprefix("retrieval/")

# the chance level of a top-K accuracy: K / classes. The class count of the run's own zero-shot sets is
# logged as zeroshot/classes (final evaluation); ImageNet's is fixed.
CLASS_COUNT_METRIC = "zeroshot/classes"
IMAGENET_CLASSES = 1000
TOP_K = {"zeroshot/top1": 1, "zeroshot/top5": 5, "val/zeroshot_top1": 1, "val/zeroshot_top5": 5,
         "zeroshot/imagenet_top1": 1, "zeroshot/imagenet_top5": 5}


def chance_level(metric: str, classes: float | None) -> float | None:
    """What guessing scores on `metric` (a top-K zero-shot accuracy): min(1, K / classes), `classes`
    being the run's zeroshot/classes (ImageNet's metrics: 1000 whatever is given). None for a metric
    without one (retrieval, BPC, losses) or where the class count is unknown (a run from before it was
    logged)."""
    k = TOP_K.get(metric)
    if k is None:
        return None
    classes = IMAGENET_CLASSES if "imagenet" in metric else classes
    return min(1.0, k / classes) if classes else None


# ---- The catalog: every metric a run logs, its unit, which way is better, when it is logged and what
# it means. docs/reference/metrics.md is generated from it (python -m fastclip.docs_reference), the report
# reads which way is better from it, and tests/test_metric_catalog.py fails on a logged name it lacks.

@dataclass(frozen=True)
class Metric:
    """name: the MLflow key; `{k}` stands for 1, 5 or 10 (R@K), `{tower}` for image or text. better:
    "higher", "lower" or "" (a count or a setting, not a score). when: "step" (training steps, every
    tracking.log_every), "eval" (each per-epoch evaluation, on the validation split), "final" (once, at
    the end, on the test split), "end" (once, when training ends)."""
    name: str
    unit: str
    better: str
    when: str
    meaning: str


CATALOG = (
    # training, per step
    Metric("train/loss", "nats", "lower", "step", "the loss the optimizer minimises: the objective plus every auxiliary term (boundary losses, distillation); with trainer.accum_steps, the mean over the step's micro-batches (per-step metrics: their mean, counts and times their sum)"),
    Metric("train/contrastive_loss", "nats", "lower", "step", "CLIP's symmetric InfoNCE over the step's global batch (the objective of task=clip)"),
    Metric("train/bpc", "bits/char", "lower", "step", "the char LM's training loss in bits per character (the objective of task=lm)"),
    Metric("train/boundary_loss", "nats", "lower", "step", "task=lm: the DTP boundary predictor's auxiliary loss (prior or entropy-spike target)"),
    Metric("train/boundary_loss_{tower}", "nats", "lower", "step", "a DTP tower's boundary-predictor auxiliary loss"),
    Metric("train/boundary_rate", "share", "", "step", "task=lm: the share of positions that end a segment (1 / shortening factor)"),
    Metric("train/compression", "x", "", "step", "task=lm: tokens per segment on the step's batch (the shortening factor)"),
    Metric("train/compression_{tower}", "x", "", "step", "a DTP or ToMe tower's shortening factor on the step's batch: tokens / segments"),
    Metric("boundaries/dropped_{tower}", "boundaries", "lower", "step", "boundaries beyond boundary.image_token_budget, dropped on the step's global batch (summed over its micro-batches and ranks)"),
    Metric("train/logit_scale", "", "", "step", "CLIP's learned inverse temperature: the factor on the cosine similarities, exp of the parameter (capped at 100)"),
    Metric("train/lr", "", "", "step", "the learning rate the step's update used"),
    Metric("efficiency/train_pflops_total", "PFLOPs", "lower", "step", "counted training compute so far (forward + backward of the whole model, a full-token phase and a teacher included): the x axis of --x compute"),
    Metric("distill/kl", "nats", "lower", "step", "compression=distill: KL divergence from the teacher's image-text similarity distribution (both directions averaged), times temperature^2 (Hinton et al. 2015: gradients keep their size across temperatures)"),
    Metric("distill/feature_mse", "", "lower", "step", "compression=distill: squared distance between the student's and the teacher's unit embeddings, summed over the width and averaged over the batch and the two towers (0 to 4; not divided by the width)"),
    Metric("time/teacher_ms", "ms", "lower", "step", "compression=distill: the teacher's forward time on the step's batch"),
    # evaluation (per epoch, validation split) and final (test split)
    Metric("epoch", "epochs", "", "eval", "the run's epoch counter at the evaluation: epochs completed (0 in a run shorter than one epoch)"),
    Metric("val/zeroshot_top1", "share", "higher", "eval", "zero-shot top-1 on the validation split: a sweep's objective"),
    Metric("val/zeroshot_top5", "share", "higher", "eval", "zero-shot top-5 on the validation split"),
    Metric("val/i2t_r{k}", "share", "higher", "eval", "image-to-text recall@K on the validation split (val/i2t_r1: the objective without a zero-shot set)"),
    Metric("val/t2i_r{k}", "share", "higher", "eval", "text-to-image recall@K on the validation split"),
    Metric("val/images", "images", "", "eval", "images in the validation retrieval set"),
    Metric("val/skipped", "images", "lower", "eval", "validation retrieval images that did not decode"),
    Metric("val/skipped_rows", "rows", "lower", "eval", "caption rows or samples left out while reading the validation retrieval set"),
    Metric("val/bpc", "bits/char", "lower", "eval", "task=lm: bits per character on the validation text: the LM's objective"),
    Metric("zeroshot/top1", "share", "higher", "final", "zero-shot top-1 on the test split, measured once at the end: the headline"),
    Metric("zeroshot/top5", "share", "higher", "final", "zero-shot top-5 on the test split"),
    Metric("zeroshot/classes", "classes", "", "final", "the test set's class count (chance top-K = K / classes)"),
    Metric("zeroshot/imagenet_top1", "share", "higher", "final", "ImageNet-1k zero-shot top-1 (eval.imagenet_val), open_clip's templates"),
    Metric("zeroshot/imagenet_top5", "share", "higher", "final", "ImageNet-1k zero-shot top-5"),
    Metric("zeroshot/imagenet_images", "images", "", "final", "ImageNet validation images evaluated"),
    Metric("zeroshot/imagenet_skipped", "images", "lower", "final", "ImageNet validation images that could not be read"),
    Metric("zeroshot/imagenet_classifier_cached", "0/1", "", "final", "1 where the ImageNet zero-shot classifier was read from cache"),
    Metric("zeroshot/top1_all_patches", "share", "higher", "final", "patch dropout / reduced runs: zero-shot top-1 with every patch kept"),
    Metric("zeroshot/top1_shuffled_placement", "share", "", "final", "eval.placement_control: zero-shot top-1 with each image's boundaries swapped with another image's"),
    Metric("zeroshot/top1_placement_gain", "share", "higher", "final", "eval.placement_control: zero-shot top-1 as learned minus with swapped boundaries"),
    Metric("retrieval/i2t_r{k}", "share", "higher", "final", "image-to-text recall@K on the test split's captions"),
    Metric("retrieval/t2i_r{k}", "share", "higher", "final", "text-to-image recall@K on the test split's captions"),
    Metric("retrieval/images", "images", "", "final", "images in the retrieval set"),
    Metric("retrieval/skipped", "images", "lower", "final", "retrieval images that did not decode"),
    Metric("retrieval/skipped_rows", "rows", "lower", "final", "caption rows or samples left out while reading the retrieval set"),
    Metric("lm/test_bpc", "bits/char", "lower", "final", "task=lm: bits per character over the whole test split: the LM's headline"),
    Metric("lm/test_chars", "chars", "", "final", "task=lm: characters the test BPC was computed over"),
    Metric("efficiency/image_gflops", "GFLOPs", "lower", "eval", "the image tower's forward per image on the eval batch, from the boundaries it produced (torch FlopCounterMode)"),
    Metric("efficiency/text_gflops", "GFLOPs", "lower", "eval", "the text tower's forward per caption on the eval batch"),
    Metric("efficiency/{tower}_gflops_unpadded", "GFLOPs", "lower", "eval", "the tower's forward per sample, each of the eval batch's samples alone (no padding to the batch's longest; the same 64 samples as _gflops, so the two differ by the padding alone, and under boundary.eval_rule=sample by its draw, which alone is not the batch's)"),
    Metric("efficiency/compression_{tower}", "x", "", "eval", "the tower's achieved shortening factor on the eval batch: tokens / segments (task=lm: _text, on the evaluated text)"),
    Metric("efficiency/train_gflops", "GFLOPs", "lower", "step", "counted training compute per sample of the whole model (both towers, predictors, loss; forward + backward; a distillation teacher's forward; the matmuls, convolutions and attention torch's FlopCounterMode counts, not elementwise ops or the optimizer), at counted steps (trainer.count_flops_every) and, the last count, at the end: one batch's, not the run's (that is _mean)"),
    Metric("boundary/image_on_stride", "share", "", "eval", "DTP image towers: the share of boundaries where fixed k = round(shortening factor) puts one"),
    Metric("boundary/image_on_start_stride", "share", "", "eval", "DTP image towers with boundary.image_start=stride: the share of boundaries on the grid they started on (every k-th patch, k = round(1/prior))"),
    Metric("data/skipped", "samples", "lower", "eval", "bad samples skipped so far (running total, kept across resumes)"),
    Metric("data/eval_duplicates", "images", "", "eval", "evaluation images merged as copies of another"),
    Metric("data/eval_overlap", "samples", "", "eval", "training samples left out because they are in an evaluation set"),
    Metric("data/trained_fraction", "share", "higher", "eval", "the share of the samples the training source declares per epoch that were trained"),
    Metric("time/eval_s", "s", "lower", "eval", "the evaluation's wall time"),
    # once, when training ends
    Metric("time/train_s", "s", "lower", "end", "training wall time (evaluations excluded)"),
    Metric("efficiency/train_gflops_mean", "GFLOPs", "lower", "end", "what training cost a sample over the whole run: train_pflops_total / train/samples (a full-token phase, a learned predictor's drift included); a run's cost where runs are compared (the sweep's table, the UI, report --cost)"),
    Metric("time/step_median_s", "s", "lower", "end", "median step time, data wait included"),
    Metric("time/data_median_s", "s", "lower", "end", "median time a step waited for its batch (open_clip_train's data_time)"),
    Metric("time/compute_median_s", "s", "lower", "end", "median step time without the data wait (open_clip_train's batch_time)"),
    Metric("train/steps", "steps", "", "end", "optimizer steps taken (under trainer.max_pflops: what the budget bought)"),
    Metric("train/samples", "samples", "", "end", "training samples seen (global batch x steps)"),
    Metric("throughput/train_samples_per_s", "samples/s", "higher", "end", "training samples per second of training wall time"),
    # compression (final)
    Metric("compression/sparsity", "share", "", "final", "compression=prune: the share of prunable weights that are zero"),
    Metric("compression/params_nonzero", "params", "lower", "final", "compression=prune: nonzero parameters of the deployed model"),
    Metric("compression/pruned_at_end", "0/1", "", "final", "compression=prune: 1 where pruning happened at the run's end (no fine-tune after it)"),
    Metric("compression/before_prune_step", "steps", "", "final", "compression=prune: the step the *_before_prune twins were measured at"),
    Metric("compression/model_mb", "MB", "lower", "final", "compression=quant|prune: the compressed model's serialized size"),
    Metric("compression/int8_weight_fraction", "share", "", "final", "compression=quant: the share of weights stored as int8"),
    Metric("time/eval_batch_ms", "ms", "lower", "final", "compression: the compressed model's latency on one eval batch"),
)
# a quality or cost metric measured on a twin of the model, named with a suffix
TWINS = {"_dense": "the same, on the uncompressed model (compression=quant) or the pruned model in its dense layout, "
                   "zeros included (compression=prune)",
         "_teacher": "the same, on the distillation teacher (compression=distill)",
         "_before_prune": "the same, before pruning (compression=prune)",
         "_reduced": "the same, of the reduced model just before the full-token phase (trainer.full_token_steps; "
                     "zeroshot/top1_reduced)"}
_PLACEHOLDERS = {"{k}": "(?:1|5|10)", "{tower}": "(?:image|text)"}


def _pattern(name: str) -> "re.Pattern":
    text = re.escape(name)
    for hole, alternatives in _PLACEHOLDERS.items():
        text = text.replace(re.escape(hole), alternatives)
    return re.compile(text + "$")


_COMPILED = tuple((_pattern(m.name), m) for m in CATALOG)


@functools.cache  # a constant table, asked per logged value at every drain and accumulated step
def catalog_entry(name: str) -> tuple[Metric, str] | None:
    """(the catalog's entry, the twin suffix or "") for a logged metric name; None where the catalog
    has no entry."""
    for pattern, metric in _COMPILED:
        if pattern.match(name):
            return metric, ""
    for suffix in TWINS:
        if name.endswith(suffix):
            found = catalog_entry(name[: -len(suffix)])
            if found and not found[1]:
                return found[0], suffix
    return None


# units of a per-step metric that add up over the step's micro-batches (trainer.accum_steps); the rest average
SUMMED_UNITS = ("boundaries", "ms")


def step_metric_name(key: str) -> str:
    """The name a task's per-step metric is logged under: `compression_image` -> train/compression_image;
    a key with its own namespace (distill/kl, boundaries/dropped_image) as it is."""
    return key if "/" in key else f"train/{key}"


def summed_over_micro_batches(name: str) -> bool:
    """Whether a step's value of a logged per-step metric is its micro-batches' sum (a count, a time)
    rather than their mean (a loss, a ratio), from the catalog's unit."""
    found = catalog_entry(name)
    return bool(found) and found[0].unit in SUMMED_UNITS


def summed_over_ranks(name: str) -> bool:
    """Whether a data-parallel step's value of a per-step metric is the ranks' sum: a count on each
    rank's share of the global batch (boundaries dropped) adds up to the global batch's; anything
    else (a loss, a ratio, a time the ranks spend side by side) is their mean."""
    found = catalog_entry(name)
    return bool(found) and found[0].unit == "boundaries"


def lower_is_better(name: str) -> bool:
    """Whether a smaller value of the metric wins (BPC, losses, GFLOPs, times), from the catalog; a name
    it lacks counts as higher-is-better."""
    found = catalog_entry(name)
    return bool(found) and found[0].better == "lower"
