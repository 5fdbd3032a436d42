"""The one way to build a CLIP: encoder geometry (ours or open_clip's) + boundary config ->
FastCLIP with one image tower and one text tower, each vanilla (open_clip's own) or DTP (the text
tower over BPE tokens or bytes: boundary.text_tokens)."""
import copy
import math

import open_clip
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from open_clip.model import _build_text_tower, _build_vision_tower
from torch import nn

from fastclip.errors import InputError
from fastclip.models.boundaries import build_boundary_method
from fastclip.models.bpe_text import BPEDTPTextTower, word_end_ids
from fastclip.models.meaning import check_tokenizer, dtp_towers
from fastclip.models.outputs import TowerOutput
from fastclip.models.text import CharTokenizer, DTPTextTower, VanillaTextTower
from fastclip.models.evit import EViTImageTower
from fastclip.models.lowres import LowResImageTower
from fastclip.models.patch_dropout import PatchDropoutImageTower
from fastclip.models.tome import ToMeImageTower
from fastclip.models.vision import DTPImageTower, VanillaImageTower
from fastclip.schema import OPTIONS
from fastclip.schema.model import PLACEMENT_CONDITIONS, PLACEMENT_OFF, placement_unread


def clip_geometry(enc) -> dict:
    """Model geometry as data: open_clip's shipped JSON when `open_clip_name` is set, with our overrides."""
    enc = OmegaConf.to_container(enc, resolve=True)
    if enc.get("open_clip_name"):
        base = open_clip.get_model_config(enc["open_clip_name"])
        if base is None:
            raise InputError(f"encoder.open_clip_name={enc['open_clip_name']!r} is not an open_clip model config")
        base = copy.deepcopy(base)
    else:
        base = {"embed_dim": enc["embed_dim"], "vision_cfg": {}, "text_cfg": {}}
    if enc.get("embed_dim"):
        base["embed_dim"] = enc["embed_dim"]
    base["vision_cfg"].update(enc.get("vision") or {})
    base["text_cfg"].update(enc.get("text") or {})
    return base


class FastCLIP(nn.Module):
    def __init__(self, visual: nn.Module, text: nn.Module, image_method=None, text_method=None):
        super().__init__()
        self.visual, self.text = visual, text
        self.image_method, self.text_method = image_method, text_method
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def full_tokens(self) -> bool:
        """Whether the towers run with their token reduction off (trainer.full_token_steps' phase)."""
        return self.visual.full_tokens or self.text.full_tokens

    def set_full_tokens(self, on: bool) -> None:
        """Turns every tower's token reduction off (on=True) or back on: DTP towers make every token
        its own segment, patch dropout keeps every patch, ToMe merges none, EViT fuses none. A
        vanilla tower has nothing to turn off."""
        self.visual.full_tokens = self.text.full_tokens = on

    def encode_image(self, images, normalize: bool = False):
        emb = self.visual(images).embedding
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens, normalize: bool = False):
        emb = self.text(tokens).embedding
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, images, tokens) -> dict:
        """-> open_clip's output dict (image_features, text_features: unit [B, D]; logit_scale: the
        exponentiated scale) with each tower's TowerOutput under image_output and text_output."""
        # Text first: a data-dependent DTP image tower syncs the host once to size its pooled
        # sequence, and everything queued before that sync (here the whole text tower) runs on
        # the GPU while the host waits instead of being launched afterwards behind an idle GPU.
        text = self.text(tokens)
        image = self.visual(images)
        return {"image_features": F.normalize(image.embedding, dim=-1),
                "text_features": F.normalize(text.embedding, dim=-1),
                "logit_scale": self.logit_scale.exp(), "image_output": image, "text_output": text}


def boundary_loss(method, tower: TowerOutput) -> torch.Tensor | None:
    """A tower's auxiliary objective: the method's loss (prior or BCE on logits) plus any
    auxiliary predictor it trains (next-char head, next-patch head)."""
    if method is None:
        return None
    loss = method.aux_loss(tower.boundary_logits, tower.boundaries, tower.boundary_targets, tower.token_mask)
    if tower.auxiliary_loss is not None:
        loss = tower.auxiliary_loss if loss is None else loss + tower.auxiliary_loss
    return loss


# what decides and learns the boundaries: idle while the reduction is off (trainer.full_token_steps)
IDLE_IN_PHASE = {"predictor", "next_patch", "next_char", "next_token", "position_logits"}


def clip_objective(model, criterion, out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training objective: contrastive loss plus each DTP tower's boundary objective times its
    loss_weight. -> (loss, its unweighted parts: contrastive_loss, boundary_loss_<tower>)."""
    loss = criterion(out["image_features"], out["text_features"], out["logit_scale"])
    parts = {"contrastive_loss": loss}
    if model.full_tokens:  # the reduction is off: its boundaries are forced, nothing to learn from them
        # the predictors and their heads stay in the graph with a zero gradient: data-parallel, DDP
        # expects a gradient for every parameter it was built with (find_unused_parameters=false)
        idle = [p for name, p in model.named_parameters() if p.requires_grad and set(name.split(".")) & IDLE_IN_PHASE]
        return (loss + 0.0 * sum(p.sum() for p in idle) if idle else loss), parts
    for tower, method in (("image", model.image_method), ("text", model.text_method)):
        aux = boundary_loss(method, out[f"{tower}_output"])
        if aux is not None:
            parts[f"boundary_loss_{tower}"] = aux
            loss = loss + method.loss_weight * aux
    return loss, parts


def build_clip(enc, boundary, caption_corpus=None, cache_dir=None, inference: bool = False):
    """-> (model, tokenizer). caption_corpus: training captions (unigram text boundaries; not needed
    with inference=True, a model to load trained weights into and run, never train)."""
    geometry = clip_geometry(enc)
    towers = dtp_towers(boundary)
    embed_dim, quick_gelu = geometry["embed_dim"], geometry.get("quick_gelu", False)
    visual = _build_vision_tower(embed_dim, geometry["vision_cfg"], quick_gelu)
    image_method = text_method = None
    if boundary.name == "tome" and "image" in towers:
        image = ToMeImageTower(visual, boundary.r)
    elif boundary.name == "patch_dropout" and "image" in towers:
        image = PatchDropoutImageTower(visual, boundary.keep, boundary.eval_keep, boundary.mask_only)
    elif boundary.name == "evit" and "image" in towers:
        image = EViTImageTower(visual, boundary.keep, boundary.layers)
    elif boundary.name == "lowres" and "image" in towers:
        image = LowResImageTower(visual, boundary.scale)
    elif "image" in towers:
        image_method = build_boundary_method(boundary)
        vc = geometry["vision_cfg"]
        # a key the option does not read runs off (a multirun across options sets it for every job)
        schema, placement = OPTIONS["boundary"][boundary.name], {k: getattr(boundary, k) for k in PLACEMENT_CONDITIONS}
        read = {key: off if placement_unread(boundary.name, schema, key, "clip", placement) else getattr(boundary, key)
                for key, off in PLACEMENT_OFF.items()}
        image = DTPImageTower(visual, image_method, boundary.image_pre_layers, boundary.image_pool,
                              next_patch_dim=3 * vc["patch_size"] ** 2 if vc.get("patch_size") else None,
                              buckets=read["image_buckets"], layout=boundary.image_layout,
                              row_breaks=read["image_row_breaks"], start=read["image_start"],
                              order=boundary.image_order, token_budget=read["image_token_budget"],
                              shift_start=boundary.name == "gumbel" and boundary.get("random_offset", False)
                              and read["image_start"] == "stride")  # Gumbel.READ_WHEN
    else:
        image = VanillaImageTower(visual)
    check_tokenizer(enc.tokenizer, boundary, towers)
    if "text" in towers and boundary.text_tokens == "bpe":  # the BPE tower cut at its pre-layers
        tokenizer = open_clip.SimpleTokenizer(context_length=geometry["text_cfg"].get("context_length", 77))
        text_method = build_boundary_method(boundary, word_ends=word_end_ids(tokenizer))
        text = BPEDTPTextTower(_build_text_tower(embed_dim, geometry["text_cfg"], quick_gelu), text_method,
                               boundary.text_pre_layers, tokenizer, layout=boundary.text_layout)
    elif "text" in towers:  # boundary.text_tokens=bytes: the tokenizer-free tower
        text_method = build_boundary_method(boundary, space_id=CharTokenizer.space_id)
        tc = geometry["text_cfg"]
        sp = None
        if boundary.name == "unigram" and not inference:
            from fastclip.data.unigram import train_on_captions
            sp = train_on_captions(caption_corpus, boundary.vocab_size, cache_dir)
        text = DTPTextTower(text_method, embed_dim, enc.char_context_length, tc.get("width", 512), tc.get("heads", 8),
                            tc.get("layers", 12), boundary.text_pre_layers, tc.get("mlp_ratio", 4.0), unigram_model=sp,
                            layout=boundary.text_layout, inference=inference)
        tokenizer = text.tokenizer
    else:
        text = VanillaTextTower(_build_text_tower(embed_dim, geometry["text_cfg"], quick_gelu))
        tokenizer = open_clip.SimpleTokenizer(context_length=geometry["text_cfg"].get("context_length", 77))
    return FastCLIP(image, text, image_method, text_method), tokenizer


def decode_tokens(tokenizer, ids: torch.Tensor) -> str:
    """One row of token ids [L] back to its text, padding (0) and BPE's start/end tokens dropped."""
    ids = [int(i) for i in ids if int(i) != 0]
    if hasattr(tokenizer, "all_special_ids"):  # open_clip's BPE: drop start/end of text
        ids = [i for i in ids if i not in tokenizer.all_special_ids]
    return tokenizer.decode(ids)


def build_transforms(enc):
    """(train, eval): open_clip's light RandomResizedCrop(0.9..1) for training, resize + centre crop for
    evaluation; both end in float32 images normalised with open_clip's mean and std."""
    size = clip_geometry(enc)["vision_cfg"].get("image_size", 224)
    return open_clip.image_transform(size, is_train=True), open_clip.image_transform(size, is_train=False)
