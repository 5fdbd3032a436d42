"""Zero-shot top-1 on the images a run trained on: set beside the held-out top-1, the generalisation gap
that tells a method that fits its training images better from one that generalises better (the
equal-compute frontier's question of why a row wins: bench-frontier --collect --train-fit).

The images are the run's own training split, rebuilt from its checkpoint's resolved config as the run
built it (the same path, fractions and split seed; evaluation images left out as eval.overlap left them
out), read with the evaluation transform (no random crop) and scored with the evaluation templates,
which training never saw, under the run's training precision as its held-out top-1 was: the number
measures how well the images are fitted, not the captions memorised.
"""
from pathlib import Path

import torch

from fastclip.errors import InputError

CLASS_CAPTIONED = ("digits", "image_folder")  # training images with a class label each


def training_images(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(LoadedRun, ZeroShotSet of the run's training images) from a CLIP checkpoint (a file or run dir).
    InputError when the run's dataset has no class labels (only class-captioned sources:
    digits, image_folder)."""
    from fastclip.data.captioned import LabelledImages, ZeroShotSet
    from fastclip.data.pairs import ImageFiles
    from fastclip.inference import load_run
    from fastclip.data.overlap import settle_eval_overlap
    from fastclip.tasks.clip import build_clip_data
    run = load_run(checkpoint, device)
    name = run.config.dataset.name
    if name not in CLASS_CAPTIONED:
        raise InputError(f"{checkpoint}: dataset={name} has no class labels; zero-shot top-1 on the training "
                         f"images needs a class-captioned source ({', '.join(CLASS_CAPTIONED)})")
    data = build_clip_data(run.config, run.preprocess, run.preprocess, run.tokenizer)
    settle_eval_overlap(data, run.config.eval.overlap)  # the training images the run kept
    train = data.train
    images = (ImageFiles(train.files, run.preprocess, train.labels) if train.files
              else LabelledImages(train.images, train.labels, run.preprocess))
    return run, ZeroShotSet(images, data.zeroshot.classnames, data.zeroshot.templates)


def training_top1(checkpoint: str | Path, device: str | torch.device = "cpu") -> float:
    """Zero-shot top-1 (a fraction) of a CLIP checkpoint on its run's training images (training_images),
    the classifier built from the evaluation templates, at the run's eval.batch_size and under its
    trainer.precision's autocast, as the held-out zeroshot/top1 is."""
    from fastclip import runtime
    from fastclip.eval.zeroshot import zero_shot_eval
    run, train = training_images(checkpoint, device)
    device, cfg = torch.device(device), run.config
    with runtime.autocast(device, runtime.autocast_dtype(cfg.trainer.precision, device)):
        return zero_shot_eval(run.model, run.tokenizer, train.images, train.classnames, train.templates,
                              device, cfg.eval.batch_size)["top1"]
