"""The embedded default: scikit-learn's 1,797 real 8x8 handwritten digits as an image-text set.

Training pairs a digit with a caption from `train_templates`; zero-shot evaluation classifies
held-out digits with `eval_templates`, which training never saw: `holdout_fraction` of them (the
test split, per class, drawn with split_seed), and for per-epoch validation `val_fraction` of the
rest (carved from the training side, so the test split does not depend on it).
"""
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from fastclip.data.captioned import (CaptionedImages, LabelledImages, ZeroShotSet, caption_table, carve_validation,
                                     check_unseen_templates, split_indices)
from fastclip.data.splits import ClipData, require_disjoint
from fastclip.errors import InputError
from fastclip.schema.data import Digits


def _to_pil(digit: np.ndarray) -> Image.Image:
    # sklearn's digits are 0..16 intensities, ink bright on dark.
    return Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8), mode="L").convert("RGB")


def build_digits(cfg: Digits, preprocess_train, preprocess_eval, tokenizer) -> ClipData:
    """-> ClipData(train, zeroshot=test, val_zeroshot=validation); the three index sets checked disjoint."""
    check_unseen_templates(cfg.train_templates, cfg.eval_templates)
    digits = load_digits()
    images = [_to_pil(d) for d in digits.images]
    labels = digits.target
    train_idx, held_idx = split_indices(labels, cfg.holdout_fraction, cfg.split_seed)
    train_idx, val_idx = carve_validation(train_idx, labels, cfg.val_fraction, cfg.split_seed)
    require_disjoint("dataset=digits", train=train_idx.tolist(), val=val_idx.tolist(), test=held_idx.tolist())
    classnames = list(cfg.classnames)
    if len(classnames) != 10:
        raise InputError(f"dataset.classnames has {len(classnames)} names; digits has 10 classes")
    tokens = caption_table(classnames, cfg.train_templates, tokenizer)
    train = CaptionedImages([images[i] for i in train_idx], labels[train_idx], tokens, preprocess_train)
    templates = list(cfg.eval_templates)
    held = LabelledImages([images[i] for i in held_idx], labels[held_idx], preprocess_eval)
    val = LabelledImages([images[i] for i in val_idx], labels[val_idx], preprocess_eval)
    return ClipData(train, zeroshot=ZeroShotSet(held, classnames, templates),
                    val_zeroshot=ZeroShotSet(val, classnames, templates))
