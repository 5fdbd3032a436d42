"""Metric names shared by training and the report, kept free of torch so the report can import them."""

# what a run (and a sweep's summary) reports last, in order of preference: the test split's, measured once at the end
HEADLINE_METRICS = ("zeroshot/top1", "zeroshot/imagenet_top1", "retrieval/i2t_r1", "lm/test_bpc")
# what the entrypoint returns, so what Hydra's sweeper optimises, in order of preference: the validation
# split's (per-epoch evaluation), never the test split's, whose best value over a search would be biased up
OBJECTIVE_METRICS = ("val/zeroshot_top1", "val/i2t_r1", "val/bpc")
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
