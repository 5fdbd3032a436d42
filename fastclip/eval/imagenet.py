"""Zero-shot ImageNet on a standard val layout (<dir>/<wnid>/<image>, 1000 WNID folders whose
sorted order is the class index), with open_clip's IMAGENET_CLASSNAMES and its template sets.

The class-text classifier (1000 classes x 80 templates = 80K prompts) is cached per
(checkpoint, templates): the key hashes the text tower's weights and the template set, so a
re-evaluation of the same checkpoint reuses it and any weight change misses.
"""
import hashlib
import logging
from pathlib import Path

import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from fastclip.data.image_folder import scan
from fastclip.data.pairs import ImageFiles
from fastclip.errors import InputError
from fastclip.eval import sharded
from fastclip.eval.zeroshot import classify_shared, shared_classifier

log = logging.getLogger(__name__)
TEMPLATE_SETS = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}


def imagenet_files(root: str | Path, classnames=IMAGENET_CLASSNAMES):
    """(files, labels) of a val folder; fails naming the path when the layout is not 1000 classes."""
    files, labels, wnids = scan(root, "eval.imagenet_val")
    if len(wnids) != len(classnames):
        raise InputError(f"eval.imagenet_val={str(root)!r} has {len(wnids)} class folders; the val layout has "
                         f"{len(classnames)} (one per WNID, sorted = class index)")
    return files, labels


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_classifier(model, tokenizer, classnames, templates_name: str, device, cache_dir: Path | None):
    if templates_name not in TEMPLATE_SETS:
        raise InputError(f"eval.imagenet_templates={templates_name!r}: expected one of {', '.join(TEMPLATE_SETS)}")
    path = None
    if cache_dir is not None:
        key = f"{weights_digest(model.text)}-{templates_name}-{len(classnames)}"
        path = Path(cache_dir) / f"imagenet_classifier_{key}.pt"
        # ranks evaluating together build the classifier together: the cache counts where every rank sees it
        # (a node-local cache dir, a network file system's lag), or one would wait in a build the others skip
        if all(sharded.gather(path.is_file())):
            return torch.load(path, map_location=device), True
    classifier = shared_classifier(model, tokenizer, classnames, TEMPLATE_SETS[templates_name], device)
    if path is not None and sharded.world().main:  # ranks evaluating together: one writer
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(classifier.cpu(), tmp)
        tmp.replace(path)
    return classifier, False


@torch.no_grad()
def imagenet_eval(model, tokenizer, root, preprocess, device, templates: str = "openai", batch_size: int = 256,
                  num_workers: int = 0, cache_dir: Path | None = None, classnames=IMAGENET_CLASSNAMES,
                  timeout_s: float = 0) -> dict:
    files, labels = imagenet_files(root, classnames)
    was_training = model.training
    model.eval()
    classifier, hit = cached_classifier(model, tokenizer, classnames, templates, device, cache_dir)
    # inside sharded.together(): each rank its share of the images, the counts summed
    correct, n, skipped = classify_shared(model, ImageFiles(files, preprocess, labels), classifier, device, batch_size,
                                          num_workers, timeout_s)
    model.train(was_training)
    if n == 0:
        raise InputError(f"eval.imagenet_val={str(root)!r}: no image could be decoded")
    return {"zeroshot/imagenet_top1": correct[1] / n, "zeroshot/imagenet_top5": correct[5] / n,
            "zeroshot/imagenet_images": float(n), "zeroshot/imagenet_skipped": float(skipped),
            "zeroshot/imagenet_classifier_cached": float(hit)}
