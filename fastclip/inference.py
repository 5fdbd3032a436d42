"""Using a trained CLIP checkpoint: `fastclip.load` in open_clip's style, and what `python -m
fastclip.infer` prints (text probabilities per image, zero-shot top-5 over class names).

    model, preprocess, tokenizer = fastclip.load("outputs/runs/.../checkpoints/last.pt")
    image = preprocess(PIL.Image.open("dog.jpg")).unsqueeze(0)
    probs = (model.logit_scale.exp() * model.encode_image(image, normalize=True)
             @ model.encode_text(tokenizer(["a dog", "a cat"]), normalize=True).T).softmax(-1)

A checkpoint carries its resolved config, so nothing else is needed to rebuild its model (read
with torch.load(weights_only=True)). Probabilities use the model's own learned temperature
(logit_scale, capped at 100 in training as open_clip's), not a fixed 100.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from fastclip.checkpoint import CheckpointError
from fastclip.checkpoint_paths import checkpoint_path
from fastclip.data.profiles import InputProfile, profile_of
from fastclip.models.outputs import TowerOutput

def load(checkpoint: str | Path, device: str | torch.device = "cpu", uri: str | None = None):
    """A trained CLIP from a fastclip checkpoint -> (model, preprocess, tokenizer): `load_run`'s first three."""
    found = load_run(checkpoint, device, uri)
    return found.model, found.preprocess, found.tokenizer


@dataclass
class LoadedRun:
    """A trained CLIP with what it was trained on: config (the run's resolved config, legacy keys
    filled), image_side (its input side in pixels), profile (its training data: data.profiles)."""
    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    config: object
    image_side: int
    profile: InputProfile


def load_run(checkpoint: str | Path, device: str | torch.device = "cpu", uri: str | None = None) -> LoadedRun:
    """A trained CLIP from a fastclip checkpoint -> LoadedRun: (model, preprocess, tokenizer), as
    open_clip's create_model_and_transforms, with what the model was trained on.
    model.encode_image(images [B, 3, H, W]) / model.encode_text(tokens [B, L]) give [B, embed_dim] embeddings (normalize=True for unit length); preprocess is the eval
    transform (PIL image -> [3, H, W] tensor; the image first turned as its EXIF orientation says, as a
    viewer shows it: `PIL.Image.open` alone reads a phone's portrait photo sideways); tokenizer(list
    of str) -> [B, L] token ids (open_clip's BPE, or bytes for a DTP text tower). The model is in eval
    mode on `device`, its token reduction off where its run ended in a trainer.full_token_steps phase
    (as that run's final zeroshot/top1 was measured; `model.set_full_tokens(False)` gives the reduced
    model back).

    checkpoint: a path, a run dir, or runs:/<MLflow run id> (see checkpoint_path). Raises FileNotFoundError
    (no such file), CheckpointError (not a fastclip checkpoint, or a task=lm one), naming the file."""
    from omegaconf import OmegaConf
    from fastclip import checkpoint as ckpt
    from fastclip.models.clip import build_clip, build_transforms
    path = checkpoint_path(checkpoint, uri)
    from fastclip.schema.resume_rules import with_legacy
    state = ckpt.load(path)
    cfg = OmegaConf.create(with_legacy(state["config"]))  # a key added since: the value its run had (legacy)
    task = OmegaConf.select(cfg, "task.name")
    if task != "clip":
        what = " (a character language model)" if task == "lm" else ""
        raise CheckpointError(f"{path}: a task={task} checkpoint{what}, not a CLIP model: fastclip.load and "
                              f"fastclip.infer read task=clip checkpoints")
    from fastclip.resume import describe_unknown, unknown_keys
    unknown = [k for k in unknown_keys(state) if k.startswith(("encoder.", "boundary."))]  # what builds the model
    if unknown:
        raise CheckpointError(f"{path}: {describe_unknown(state, unknown)}; load it with that version")
    model, tokenizer = build_clip(cfg.encoder, cfg.boundary, inference=True)
    from fastclip.compression import PROJECTION
    # a distilled student's projection to its teacher's width served the training only
    model.load_state_dict({k: v for k, v in state["model"].items() if not k.startswith(PROJECTION + ".")})
    if ended_at_full_tokens(state):  # as its run's final evaluation measured it, and as its last steps trained
        model.set_full_tokens(True)
    model.to(device).eval()
    from fastclip.models.clip import clip_geometry
    side = int(clip_geometry(cfg.encoder)["vision_cfg"].get("image_size", 224))
    return LoadedRun(model, upright_first(build_transforms(cfg.encoder)[1]), tokenizer, cfg, side,
                     profile_of(str(OmegaConf.select(cfg, "dataset.name"))))


def ended_at_full_tokens(state: dict) -> bool:
    """Whether a checkpoint's run was inside its trainer.full_token_steps phase (the phase measured the
    reduced model as it began: train_state.reduced), so its weights were last trained, and its
    zeroshot/top1 measured, with every tower's token reduction off."""
    return state.get("train_state", {}).get("reduced") is not None


class Upright:
    """A transform step: a PIL image as a viewer shows it (data.pairs.upright: its EXIF orientation
    applied, on a copy; data.pairs.on_white: transparent pixels over white), as RGB; anything else
    passes as it is."""

    def __call__(self, image):
        from PIL import Image
        from fastclip.data.pairs import on_white, upright
        return on_white(upright(image)) if isinstance(image, Image.Image) else image

    def __repr__(self) -> str:
        return "Upright()"


def upright_first(transform):
    """A torchvision Compose with Upright() as its first step (its other steps, and so its
    CenterCrop's size, as they were)."""
    from torchvision.transforms import Compose
    return Compose([Upright(), *transform.transforms])


@dataclass
class Scores:
    """Image-text scores of one batch: probs [images, texts] (each row a softmax over the texts,
    at the model's learned temperature), and the tokens each tower kept per input (sequence length
    in, segments out; equal for a tower that does not pool)."""
    probs: torch.Tensor
    image_tokens: torch.Tensor    # [images, 2]: tokens in, segments kept
    text_tokens: torch.Tensor     # [texts, 2]


def kept_tokens(tower: TowerOutput) -> torch.Tensor:
    """[B, 2]: each input's tokens in and segments kept, from a tower's output."""
    return torch.stack([tower.tokens, tower.segments], 1).round().long().cpu()


@torch.no_grad()
def score(model, images: torch.Tensor, tokens: torch.Tensor) -> Scores:
    """images [B, 3, H, W] (preprocessed), tokens [T, L] -> Scores (the model's own forward)."""
    out = model(images, tokens)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    return Scores(logits.softmax(-1).cpu(), kept_tokens(out["image_output"]), kept_tokens(out["text_output"]))


@torch.no_grad()
def classify(model, tokenizer, images: torch.Tensor, classnames: list[str], templates, k: int = 5):
    """Zero-shot: each class's prompts ("a photo of a {c}.", ...) averaged into one text embedding
    (open_clip's build_zero_shot_classifier) -> (probs [images, classes], top-k indices [images, k],
    the image tower's kept tokens [images, 2])."""
    from open_clip import build_zero_shot_classifier
    classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=10,
                                            device=images.device)
    image = model.visual(images)
    logits = model.logit_scale.exp() * torch.nn.functional.normalize(image.embedding, dim=-1) @ classifier
    probs = logits.softmax(-1).cpu()
    return probs, probs.topk(min(k, len(classnames)), dim=-1).indices, kept_tokens(image)
