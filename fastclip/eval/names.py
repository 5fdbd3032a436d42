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
