"""Zero-shot classification: class-name prompts -> text classifier -> top-k on labelled images.

The classifier comes from open_clip's build_zero_shot_classifier; the accuracy loop is ours
(open_clip's accuracy() breaks on numpy 2.4).
"""
import torch
from open_clip import build_zero_shot_classifier

from fastclip.data.pairs import DecodedBatches


@torch.no_grad()
def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == target[:, None]
    return {k: int(hit[:, :k].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def classify(model, batches, classifier: torch.Tensor, device) -> tuple[dict[int, int], int]:
    """Top-1/top-5 hits of (images, target) batches against a [dim, classes] classifier -> (hits, n)."""
    n, correct = 0, {1: 0, 5: 0}
    classifier = classifier.to(device).float()
    for images, target in batches:
        logits = model.encode_image(images.to(device), normalize=True).float() @ classifier
        for k, c in topk_correct(logits, target.to(device)).items():
            correct[k] += c
        n += len(target)
    return correct, n


@torch.no_grad()
def zero_shot_eval(model, tokenizer, images, classnames, templates, device, batch_size=256) -> dict[str, float]:
    """Returns {'top1': ..., 'top5': ...} over every image of `images` ((image, label) pairs; an image
    that fails to decode, None, is left out: an image_folder set decodes as it is read)."""
    was_training = model.training
    model.eval()
    classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates,
                                            num_classes_per_batch=10, device=device)
    correct, n = classify(model, DecodedBatches(images, batch_size), classifier, device)
    model.train(was_training)
    return {"top1": correct[1] / n, "top5": correct[5] / n}
