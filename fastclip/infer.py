"""Unit inference: a trained CLIP checkpoint on your own images.

    python -m fastclip.infer --checkpoint PATH|RUN_DIR|runs:/RUN_ID --image IMG [--image IMG ...]
                             --text "a dog" --text "a cat"
    python -m fastclip.infer --checkpoint ... --image IMG --classes FILE [--templates openai|simple]

With --text: per image, each text's probability (a softmax over the texts at the model's learned
temperature: they sum to 1). With --classes (one class name per line): zero-shot classification
over the class names in the template set's prompts, the top 5 per image. For DTP models, how many
tokens each tower kept (tokens in -> segments). First, what the model was trained on (data set,
input size, normalisation); under an image, what sets it apart from the training images where that
is far (a light background for a dark-ground model, a size far off), rather than a silent guess.
"""
import argparse
import sys
from pathlib import Path

import torch

from fastclip.checkpoint import CheckpointError
from fastclip.errors import InputError, InputNotFound, one_line_errors
from fastclip.data.pairs import UnusableImage, open_rgb
from fastclip.data.textfile import read_names
from fastclip.eval.imagenet import TEMPLATE_SETS
from fastclip.data.profiles import far_from_training
from fastclip.inference import classify, load_run, score


def require_file(flag: str, path: str) -> Path:
    if Path(path).is_dir():
        raise InputError(f"{flag} {path}: a directory, not a file")
    if not Path(path).is_file():
        raise InputNotFound(f"{flag} {path}: no such file")
    return Path(path)


def read_images(paths: list[str], preprocess, far_from_training=None) -> tuple[torch.Tensor, list[list[str]]]:
    """-> ([N, 3, H, W], per image what sets it apart from the training images: far_from_training(PIL
    image) -> notes). An image that cannot be read fails naming it (a user's own file: no skipping)."""
    out, notes = [], []
    for path in paths:
        try:
            image = open_rgb(require_file("--image", path), f"--image {path}", skip=False)
        except UnusableImage as exc:
            raise InputError(str(exc)) from None
        out.append(preprocess(image))
        notes.append(far_from_training(image) if far_from_training else [])
    return torch.stack(out), notes


def trained_on(run) -> str:
    """One line: the data set and input size the model was trained on, its normalisation, and whether
    it runs at full tokens (its run ended in a full-token phase: inference.load_run)."""
    from torchvision.transforms import Normalize
    norm = next((t for t in getattr(run.preprocess, "transforms", []) if isinstance(t, Normalize)), None)
    said = f", normalised with mean {_rounded(norm.mean)} std {_rounded(norm.std)}" if norm is not None else ""
    full = ("; its run ended with a full-token fine-tune (trainer.full_token_steps), so it reads every token"
            if run.model.full_tokens else "")
    return (f"model trained on dataset={run.config.dataset.name} ({run.profile.source}); reads {run.image_side}x"
            f"{run.image_side} px RGB{said}{full}")


def _rounded(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def read_classes(path: str) -> list[str]:
    try:
        names = read_names(require_file("--classes", path), f"--classes {path}")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if len(names) < 2:
        raise InputError(f"--classes {path}: {len(names)} class name(s); one per line, at least 2")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"--classes {path}: {twice} appear more than once")
    return names


def _warn(notes: list[str]) -> None:
    for note in notes:
        print(f"  far from the training images: {note}")


def tokens_line(kind: str, counts: torch.Tensor) -> str:
    n_in, kept = int(counts[0]), int(counts[1])
    shorter = f"{n_in / max(kept, 1):.2f}x shorter" if kept < n_in else "no reduction"
    return f"{kind} tower kept {kept} of {n_in} tokens ({shorter})"


def shortens(model) -> tuple[bool, bool]:
    """Whether the image and the text tower shorten their sequence (DTP or ToMe)."""
    from fastclip.models.text import VanillaTextTower
    from fastclip.models.vision import VanillaImageTower
    return not isinstance(model.visual, VanillaImageTower), not isinstance(model.text, VanillaTextTower)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fastclip.infer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint file, a run dir, or runs:/<MLflow run id>")
    ap.add_argument("--image", action="append", required=True, help="an image file (repeat for several)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", action="append", help="a caption to score (repeat: the probabilities are over them)")
    what.add_argument("--classes", help="a file of class names, one per line: zero-shot top 5")
    ap.add_argument("--templates", choices=sorted(TEMPLATE_SETS), default="openai",
                    help="prompt templates for --classes (open_clip's ImageNet sets)")
    ap.add_argument("--uri", default=None, help="the MLflow store of a runs:/ checkpoint (default as training)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    args = ap.parse_args(argv)
    with one_line_errors():  # a flag's file, device or checkpoint that cannot be used: one line naming it
        infer(args)


def infer(args: argparse.Namespace) -> None:
    if args.text is not None and (len(args.text) < 2 or not all(t.strip() for t in args.text)):
        raise InputError("--text: give at least two non-empty texts (the probabilities are a softmax over them; "
                         "one text would always get 1.0)")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)  # a device this machine lacks fails here, named
    except RuntimeError as exc:
        raise InputError(f"--device {args.device}: {str(exc).splitlines()[0]}") from None
    try:
        run = load_run(args.checkpoint, device, args.uri)
    except (FileNotFoundError, CheckpointError) as exc:  # their messages name the file or run
        raise InputError(f"--checkpoint: {exc}") from None
    model, tokenizer = run.model, run.tokenizer
    print(trained_on(run))
    images, notes = read_images(args.image, run.preprocess,
                                lambda image: far_from_training(image, run.profile, run.image_side))
    images = images.to(device)
    pools_image, pools_text = shortens(model)
    if args.classes:
        classnames = read_classes(args.classes)
        probs, top, kept = classify(model, tokenizer, images, classnames, TEMPLATE_SETS[args.templates])
        for i, path in enumerate(args.image):
            print(path)
            _warn(notes[i])
            for rank, c in enumerate(top[i].tolist(), 1):
                print(f"  {rank}. {probs[i, c]:.4f}  {classnames[c]}")
            if pools_image:
                print("  " + tokens_line("image", kept[i]))
        return
    scores = score(model, images, tokenizer(args.text).to(device))
    for i, path in enumerate(args.image):
        print(path)
        _warn(notes[i])
        for j, text in enumerate(args.text):
            print(f"  {scores.probs[i, j]:.4f}  {text}")
        if pools_image:
            print("  " + tokens_line("image", scores.image_tokens[i]))
    if pools_text:
        for j, text in enumerate(args.text):
            print(f"{text!r}: " + tokens_line("text", scores.text_tokens[j]))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
