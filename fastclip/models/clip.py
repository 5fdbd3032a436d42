"""The one way to build a CLIP: encoder geometry (ours or open_clip's) -> open_clip.CLIP."""
import copy

import open_clip
from omegaconf import OmegaConf


def clip_geometry(enc) -> dict:
    """Model geometry as data: open_clip's shipped JSON when `open_clip_name` is set, with our overrides."""
    enc = OmegaConf.to_container(enc, resolve=True)
    if enc.get("open_clip_name"):
        base = open_clip.get_model_config(enc["open_clip_name"])
        if base is None:
            raise ValueError(f"encoder.open_clip_name={enc['open_clip_name']!r} is not an open_clip model config")
        base = copy.deepcopy(base)
    else:
        base = {"embed_dim": enc["embed_dim"], "vision_cfg": {}, "text_cfg": {}}
    if enc.get("embed_dim"):
        base["embed_dim"] = enc["embed_dim"]
    base["vision_cfg"].update(enc.get("vision") or {})
    base["text_cfg"].update(enc.get("text") or {})
    return base


def build_vanilla_clip(enc) -> open_clip.CLIP:
    geometry = clip_geometry(enc)
    return open_clip.CLIP(embed_dim=geometry["embed_dim"], vision_cfg=geometry["vision_cfg"],
                          text_cfg=geometry["text_cfg"], quick_gelu=geometry.get("quick_gelu", False),
                          output_dict=True)


def build_tokenizer(enc):
    context_length = clip_geometry(enc)["text_cfg"].get("context_length", 77)
    return open_clip.SimpleTokenizer(context_length=context_length)


def build_transforms(enc):
    size = clip_geometry(enc)["vision_cfg"].get("image_size", 224)
    # (train, eval): open_clip's light RandomResizedCrop(0.9..1) for training, resize+crop for eval
    return open_clip.image_transform(size, is_train=True), open_clip.image_transform(size, is_train=False)
