"""Metric names shared by training and the report, kept free of torch so the report can import them."""

# per-epoch (validation) metric names: the test split's name -> the validation split's
VAL_NAMES = {"zeroshot/top1": "val/zeroshot_top1", "zeroshot/top5": "val/zeroshot_top5", "lm/test_bpc": "val/bpc"}


def val_name(test_name: str) -> str:
    """The validation twin of a test metric: zeroshot/top1 -> val/zeroshot_top1, retrieval/i2t_r1 ->
    val/i2t_r1 (retrieval's names under val/ as they are), lm/test_bpc -> val/bpc. A name already
    under val/ is its own twin."""
    if test_name.startswith("val/"):
        return test_name
    return VAL_NAMES.get(test_name) or "val/" + test_name.removeprefix("retrieval/")
