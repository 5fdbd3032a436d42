"""Zero-shot top-1 on the images a run trained on: set beside the held-out top-1, the generalisation gap
that tells a method that fits its training images better from one that generalises better (the
equal-compute frontier's question of why a row wins: bench-frontier --collect --train-fit).

The images are the run's own training split, rebuilt from its checkpoint's resolved config (the same
path, fractions and split seed), read with the evaluation transform (no random crop) and scored with
the evaluation templates, which training never saw: the number measures how well the images are
fitted, not the captions memorised.
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
    from fastclip.tasks.clip import build_clip_data
    run = load_run(checkpoint, device)
    name = run.config.dataset.name
    if name not in CLASS_CAPTIONED:
        raise InputError(f"{checkpoint}: dataset={name} has no class labels; zero-shot top-1 on the training "
                         f"images needs a class-captioned source ({', '.join(CLASS_CAPTIONED)})")
    data = build_clip_data(run.config, run.preprocess, run.preprocess, run.tokenizer)
    train = data.train
    images = (ImageFiles(train.files, run.preprocess, train.labels) if train.files
              else LabelledImages(train.images, train.labels, run.preprocess))
    return run, ZeroShotSet(images, data.zeroshot.classnames, data.zeroshot.templates)


def training_top1(checkpoint: str | Path, device: str | torch.device = "cpu", batch_size: int = 256) -> float:
    """Zero-shot top-1 (a fraction) of a CLIP checkpoint on its run's training images (training_images),
    the classifier built from the evaluation templates as the held-out zeroshot/top1's is."""
    from fastclip.eval.zeroshot import zero_shot_eval
    run, train = training_images(checkpoint, device)
    return zero_shot_eval(run.model, run.tokenizer, train.images, train.classnames, train.templates,
                          torch.device(device), batch_size)["top1"]
