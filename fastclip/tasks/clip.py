"""Contrastive image-text pretraining: open_clip towers (vanilla, DTP or ToMe), open_clip's
tokenizer, transforms and ClipLoss, plus each DTP tower's boundary loss. Every evaluation
reports zero-shot accuracy and the efficiency the model actually achieved."""
from pathlib import Path

import torch
from open_clip import ClipLoss
from torch.utils.data import DataLoader

from fastclip import runtime
from fastclip.data.digits import build_digits
from fastclip.data.image_folder import build_image_folder, scan
from fastclip.eval.boundary_picture import draw
from fastclip.eval.efficiency import parameter_counts, tower_efficiency
from fastclip.eval.zeroshot import zero_shot_eval
from fastclip.models.clip import boundary_loss, build_clip, build_transforms


def build_clip_data(cfg, preprocess_train, preprocess_eval, tokenizer):
    if cfg.dataset.name == "digits":
        return build_digits(cfg.dataset, preprocess_train, preprocess_eval, tokenizer)
    if cfg.dataset.name == "image_folder":
        return build_image_folder(cfg.dataset, preprocess_train, preprocess_eval, tokenizer)
    raise ValueError(f"dataset={cfg.dataset.name!r} is not an image-text dataset for task=clip")


def training_captions(ds) -> list[str]:
    """The captions training will see: what a unigram text-boundary model learns from."""
    names = list(ds.classnames) if ds.name == "digits" else [c.replace("_", " ") for c in scan(ds.path)[2]]
    return [t.format(c) for c in names for t in ds.train_templates]


def decode_tokens(tokenizer, ids: torch.Tensor) -> str:
    ids = [int(i) for i in ids if int(i) != 0]
    if hasattr(tokenizer, "all_special_ids"):  # open_clip's BPE: drop start/end of text
        ids = [i for i in ids if i not in tokenizer.all_special_ids]
    return tokenizer.decode(ids)


class ClipTask:
    def __init__(self, cfg, device: torch.device, run_dir: str | Path | None = None):
        self.cfg, self.device = cfg, device
        self.run_dir = Path(run_dir) if run_dir else None
        if "pre_layers" in cfg.encoder:
            raise ValueError(f"encoder={cfg.encoder.name} is a char LM geometry; task=clip needs a CLIP encoder")
        preprocess_train, preprocess_eval = build_transforms(cfg.encoder)
        captions = training_captions(cfg.dataset) if cfg.boundary.name == "unigram" else None
        self.model, self.tokenizer = build_clip(cfg.encoder, cfg.boundary, captions, cfg.dataset.get("cache_dir"))
        self.model.to(device)
        self.train_set, self.zeroshot = build_clip_data(cfg, preprocess_train, preprocess_eval, self.tokenizer)
        self.criterion = ClipLoss()
        self.evals, self._artifacts = 0, []

    def train_batches(self, epoch: int) -> DataLoader:
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(self.cfg.seed, epoch)
        generator = runtime.epoch_generator(self.cfg.seed, epoch)
        return DataLoader(self.train_set, batch_size=self.cfg.trainer.batch_size, shuffle=True, drop_last=True,
                          generator=generator, num_workers=self.cfg.trainer.num_workers)

    def loss(self, batch):
        images, texts = (t.to(self.device, non_blocking=True) for t in batch)
        with torch.no_grad():  # as open_clip_train: temperature capped at 100
            self.model.logit_scale.clamp_(0, 4.6052)
        out = self.model(images, texts)
        loss = self.criterion(out["image_features"], out["text_features"], out["logit_scale"])
        extras = {"contrastive_loss": loss.item(), "logit_scale": out["logit_scale"].item()}
        for tower, method in (("image", self.model.image_method), ("text", self.model.text_method)):
            info = out[f"{tower}_info"]
            extras[f"compression_{tower}"] = float(info["tokens"].sum() / info["segments"].sum().clamp_min(1))
            aux = boundary_loss(method, info)
            if aux is not None:
                extras[f"boundary_loss_{tower}"] = aux.item()
                loss = loss + method.loss_weight * aux
        return loss, extras, images.shape[0]

    def eval_batch(self, n: int = 64):
        """A real eval batch: held-out images and their class prompts (unseen templates)."""
        z = self.zeroshot
        images, labels = zip(*(z.images[i] for i in range(min(n, len(z.images)))))
        texts = [z.templates[i % len(z.templates)].format(z.classnames[int(c)]) for i, c in enumerate(labels)]
        return torch.stack(images).to(self.device), self.tokenizer(texts).to(self.device)

    def evaluate(self) -> dict[str, float]:
        z = self.zeroshot
        acc = zero_shot_eval(self.model, self.tokenizer, z.images, z.classnames, z.templates, self.device,
                             batch_size=self.cfg.eval.batch_size)
        images, tokens = self.eval_batch()
        metrics = {"zeroshot/top1": acc["top1"], "zeroshot/top5": acc["top5"],
                   **tower_efficiency(self.model, images, tokens)}
        self.evals += 1
        if self.run_dir is not None and self.cfg.eval.boundary_picture:
            path = self.run_dir / "boundaries" / f"eval_{self.evals:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            draw(self.model, images, tokens, lambda t: decode_tokens(self.tokenizer, t), path)
            self._artifacts.append(path)
        return metrics

    def new_artifacts(self) -> list[Path]:
        out, self._artifacts = self._artifacts, []
        return out

    def params(self) -> dict[str, int]:
        return parameter_counts(self.model)
