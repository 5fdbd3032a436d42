"""Contrastive image-text pretraining with open_clip's model, tokenizer, transforms and ClipLoss."""
import torch
from open_clip import ClipLoss
from torch.utils.data import DataLoader

from fastclip.data.digits import build_digits
from fastclip.eval.zeroshot import zero_shot_eval
from fastclip.models.clip import build_tokenizer, build_transforms, build_vanilla_clip


def build_clip_data(cfg, preprocess_train, preprocess_eval, tokenizer):
    if cfg.dataset.name == "digits":
        return build_digits(cfg.dataset, preprocess_train, preprocess_eval, tokenizer)
    raise ValueError(f"dataset={cfg.dataset.name!r} is not an image-text dataset for task=clip")


class ClipTask:
    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        if cfg.boundary.name != "none":
            raise ValueError(f"boundary={cfg.boundary.name} with task=clip: DTP towers are not built yet; "
                             f"use boundary=none")
        if "pre_layers" in cfg.encoder:
            raise ValueError(f"encoder={cfg.encoder.name} is a char LM geometry; task=clip needs a CLIP encoder")
        self.model = build_vanilla_clip(cfg.encoder).to(device)
        self.tokenizer = build_tokenizer(cfg.encoder)
        preprocess_train, preprocess_eval = build_transforms(cfg.encoder)
        self.train_set, self.zeroshot = build_clip_data(cfg, preprocess_train, preprocess_eval, self.tokenizer)
        self.criterion = ClipLoss()

    def train_batches(self, epoch: int) -> DataLoader:
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(self.cfg.seed, epoch)
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return DataLoader(self.train_set, batch_size=self.cfg.trainer.batch_size, shuffle=True, drop_last=True,
                          generator=generator, num_workers=self.cfg.trainer.num_workers)

    def loss(self, batch):
        images, texts = (t.to(self.device, non_blocking=True) for t in batch)
        out = self.model(images, texts)
        loss = self.criterion(out["image_features"], out["text_features"], out["logit_scale"])
        return loss, {"logit_scale": out["logit_scale"].item()}, images.shape[0]

    def evaluate(self) -> dict[str, float]:
        z = self.zeroshot
        acc = zero_shot_eval(self.model, self.tokenizer, z.images, z.classnames, z.templates, self.device,
                             batch_size=self.cfg.eval.batch_size)
        return {"zeroshot/top1": acc["top1"], "zeroshot/top5": acc["top5"]}
