"""Zero-shot classification: class-name prompts -> text classifier -> top-k on labelled images.

The classifier comes from open_clip's build_zero_shot_classifier; the accuracy loop is ours
(open_clip's accuracy() breaks on numpy 2.4). In a data-parallel evaluation (eval/sharded.py) each
rank builds the classifier's columns of every W-th run of CLASSES_PER_BATCH classes (the batches one
process encodes, so the columns are that process's) and classifies its share of the images; the
columns are gathered and the hit counts summed over ranks.
"""
import torch
from open_clip import build_zero_shot_classifier

from fastclip.data.pairs import DecodedBatches
from fastclip.eval import sharded


CLASSES_PER_BATCH = 10  # build_zero_shot_classifier's num_classes_per_batch: the prompts of 10 classes a text batch


@torch.no_grad()
def shared_classifier(model, tokenizer, classnames, templates, device) -> torch.Tensor:
    """open_clip's zero-shot classifier [embed_dim, classes] (each class: its prompts' normalised mean
    embedding). Inside sharded.together() each rank encodes every W-th batch of CLASSES_PER_BATCH
    classes and every rank gets the whole classifier, equal to one process's (its batches)."""
    def build(names):
        return build_zero_shot_classifier(model, tokenizer, names, templates,
                                          num_classes_per_batch=CLASSES_PER_BATCH, device=device)
    if sharded.world().size == 1:
        return build(classnames)
    mine = [(b, build([classnames[i] for i in items]).cpu())
            for b, items in sharded.batch_ranges(len(classnames), CLASSES_PER_BATCH)]
    columns = sorted((piece for part in sharded.gather(mine) for piece in part), key=lambda piece: piece[0])
    return torch.cat([c for _, c in columns], dim=1).to(device)


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
def classify_shared(model, images, classifier: torch.Tensor, device, batch_size: int,
                    num_workers: int = 0, timeout_s: float = 0) -> tuple[dict[int, int], int, int]:
    """classify() over this rank's share of `images` ((image, label) items; None: failed to decode),
    summed over the ranks evaluating together -> (top-k hits, images classified, images skipped)."""
    batches = DecodedBatches(sharded.shard(images, batch_size), batch_size, num_workers, timeout_s)
    correct, n = classify(model, batches, classifier, device)
    counts = sharded.gather((correct, n, batches.skipped))
    return ({k: sum(c[k] for c, _, _ in counts) for k in correct}, sum(n for _, n, _ in counts),
            sum(s for _, _, s in counts))


@torch.no_grad()
def zero_shot_eval(model, tokenizer, images, classnames, templates, device, batch_size=256,
                   num_workers=0, timeout_s: float = 0) -> dict[str, float]:
    """Returns {'top1': ..., 'top5': ...} over every image of `images` ((image, label) pairs; an image
    that fails to decode, None, is left out: an image_folder set decodes as it is read). Inside
    sharded.together(), each rank encodes its share; every rank gets the whole set's numbers."""
    was_training = model.training
    model.eval()
    classifier = shared_classifier(model, tokenizer, classnames, templates, device)
    correct, n, _ = classify_shared(model, images, classifier, device, batch_size, num_workers, timeout_s)
    model.train(was_training)
    return {"top1": correct[1] / n, "top5": correct[5] / n}
