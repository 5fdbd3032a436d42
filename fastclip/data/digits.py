"""The embedded default: scikit-learn's 1,797 real 8x8 handwritten digits as an image-text set.

Training pairs a digit with a caption from `train_templates`; zero-shot evaluation classifies
the held-out digits with `eval_templates`, which training never saw.
"""
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from fastclip.data.captioned import (CaptionedImages, LabelledImages, ZeroShotSet, caption_table,
                                     check_unseen_templates, split_indices)


def _to_pil(digit: np.ndarray) -> Image.Image:
    # sklearn's digits are 0..16 intensities, ink bright on dark.
    return Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8), mode="L").convert("RGB")


def build_digits(cfg, preprocess_train, preprocess_eval, tokenizer) -> tuple[Dataset, ZeroShotSet]:
    check_unseen_templates(cfg.train_templates, cfg.eval_templates)
    digits = load_digits()
    images = [_to_pil(d) for d in digits.images]
    labels = digits.target
    train_idx, held_idx = split_indices(labels, cfg.holdout_fraction, cfg.split_seed)
    classnames = list(cfg.classnames)
    if len(classnames) != 10:
        raise ValueError(f"dataset.classnames has {len(classnames)} names; digits has 10 classes")
    tokens = caption_table(classnames, cfg.train_templates, tokenizer)
    train = CaptionedImages([images[i] for i in train_idx], labels[train_idx], tokens, preprocess_train)
    held = LabelledImages([images[i] for i in held_idx], labels[held_idx], preprocess_eval)
    return train, ZeroShotSet(held, classnames, list(cfg.eval_templates))
