"""Character language modelling with DTP (the setting where DTP was first shown): text8-format
data, an hourglass LM, bits per character on valid during training (val/bpc: the sweep objective)
and on the WHOLE test split at the end (lm/test_bpc)."""
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastclip import distributed, runtime
from fastclip.checks import check_config
from fastclip.data import text8, unigram
from fastclip.errors import InputError
from fastclip.eval.boundary_picture import caption_with_breaks, next_picture
from fastclip.eval.bpc import collapsed, evaluate_bpc
from fastclip.models.boundaries import EntropySpike, Unigram, build_boundary_method
from fastclip.models.charlm import HourglassLM
from fastclip.tasks.protocol import StepOutput, TaskBase

log = logging.getLogger(__name__)


class RandomWindows:
    """One epoch = as many (batch of random windows) as the training split has windows' worth of chars.
    Data-parallel: each global batch of batch_size x world_size windows is drawn the same on every
    rank, and rank r takes the r-th run of batch_size of it."""

    def __init__(self, ids, targets, context, batch_size, seed, epoch, start: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.ids, self.targets = torch.from_numpy(ids.astype(np.int64)), targets
        self.context, self.batch_size, self.rank, self.world_size = context, batch_size, rank, world_size
        self.generator = runtime.epoch_generator(seed, epoch)
        self.n_batches = self.batches_in(len(ids), context, batch_size * world_size)
        self.start = start  # batches drawn and dropped first (a resumed epoch)

    @staticmethod
    def batches_in(n_chars: int, context: int, batch_size: int) -> int:
        return max(1, (n_chars - 1) // (context * batch_size))

    def __len__(self):
        return self.n_batches

    def __iter__(self):
        T = self.context
        for i in range(self.n_batches):
            starts = torch.randint(0, len(self.ids) - T - 1, (self.batch_size * self.world_size,),
                                   generator=self.generator)[self.rank * self.batch_size:][:self.batch_size]
            if i < self.start:
                continue
            x = torch.stack([self.ids[s:s + T] for s in starts])
            y = torch.stack([self.ids[s + 1:s + T + 1] for s in starts])
            if self.targets is None:
                yield x, y
            else:
                yield x, y, torch.stack([self.targets[s:s + T] for s in starts])


def build_lm(enc, boundary, context: int) -> HourglassLM:
    return HourglassLM(vocab_size=len(text8.ALPHABET), width=enc.width, heads=enc.heads, mlp_ratio=enc.mlp_ratio,
                       pre_layers=enc.pre_layers, short_layers=enc.short_layers, post_layers=enc.post_layers,
                       max_len=context, boundary=boundary, dropout=enc.dropout, block_dropout=enc.block_dropout)


class LMTask(TaskBase):
    def __init__(self, cfg, device: torch.device, run_dir: str | Path | None = None):
        check_config(cfg)
        self.cfg, self.device = cfg, device
        self.run_dir = Path(run_dir) if run_dir else None
        text, self.source = text8.load_text(cfg.dataset.path, cfg.dataset.clean)
        splits = text8.split(text, cfg.dataset.split)
        self.ids = dict(zip(("train", "valid", "test"), (text8.encode(s) for s in splits)))
        self.context = cfg.task.context
        if len(self.ids["train"]) <= self.context + 1:
            raise InputError(f"{self.source}: training split has {len(self.ids['train'])} chars, "
                             f"fewer than task.context={self.context}")
        self.method = build_boundary_method(cfg.boundary, space_id=text8.SPACE_ID, causal=True, task="lm")
        self.train_targets = None
        if isinstance(self.method, Unigram):
            cache = cfg.dataset.cache_dir or os.path.join(os.getcwd(), "outputs", "cache")
            sp = unigram.train_or_load(splits[0], self.method.vocab_size, cache)
            self.train_targets = torch.from_numpy(unigram.piece_end_boundaries(sp, splits[0]).astype(np.float32))
        self.model = build_lm(cfg.encoder, self.method, self.context).to(device)

    def train_batches(self, epoch: int, start: int = 0) -> RandomWindows:
        world = distributed.current()
        return RandomWindows(self.ids["train"], self.train_targets, self.context, self.cfg.trainer.batch_size,
                             self.cfg.seed, epoch, start, world.rank, world.size)

    def epoch_samples(self) -> int:
        batch = self.cfg.trainer.batch_size * distributed.current().size
        return RandomWindows.batches_in(len(self.ids["train"]), self.context, batch) * batch

    def sizes(self) -> dict[str, int]:
        return {f"{split} chars": len(ids) for split, ids in self.ids.items()}

    def loss(self, batch, forward=None):
        """forward: what runs the model (the loop's DistributedDataParallel wrapper; else the model)."""
        batch = [t.to(self.device, non_blocking=True) for t in batch]
        x, y = batch[0], batch[1]
        out = (forward if forward is not None else self.model)(x)
        lm = F.cross_entropy(out.logits.float().transpose(1, 2), y)
        # device scalars: the loop reads them in one transfer when it logs (no per-step sync)
        extras = {"bpc": lm.detach() / math.log(2),
                  "compression": x.numel() / out.segments.detach().sum()}
        total = lm
        if self.method is not None:
            extras["boundary_rate"] = out.boundaries.detach().float().mean()
            targets = None
            if isinstance(self.method, EntropySpike):
                targets = self.method.targets(out.logits.detach())
            elif isinstance(self.method, Unigram):
                targets = batch[2]
            aux = self.method.aux_loss(out.boundary_logits, out.boundaries, targets)
            if aux is not None:
                extras["boundary_loss"] = aux.detach()
                total = lm + self.method.loss_weight * aux
        return StepOutput(total, extras, x.shape[0])

    def _bpc(self, split: str) -> dict[str, float]:
        ids = self.ids[split]
        if split == "valid" and self.cfg.task.valid_max_chars:
            ids = ids[:self.cfg.task.valid_max_chars]
        return evaluate_bpc(self.model, ids, self.context, self.cfg.task.eval_stride, self.device,
                            batch_size=self.cfg.eval.lm_batch_size)

    def evaluate(self) -> dict[str, float]:
        """Per epoch, on the valid split (at most task.valid_max_chars of it): val/bpc; with
        eval.boundary_picture, the segmented text (segmented_text)."""
        r = self._bpc("valid")
        # a learned predictor's (fixed k or whitespace give what they give: no predictor to train longer)
        if self.model.predictor is not None and collapsed(r["compression"], self.context) and distributed.current().main:
            log.warning("val/bpc: the boundary predictor left ~%.1f segments per %d-char window at evaluation "
                        "(efficiency/compression_text %.0fx; training's random draw is train/compression): the "
                        "shortened layers are hardly used, so this BPC is not DTP's (an unconfident predictor: "
                        "train longer)", self.context / r["compression"], self.context, r["compression"])
        if (self.cfg.eval.boundary_picture and self.method is not None and self.run_dir is not None
                and distributed.current().main):
            path = next_picture(self.run_dir, "txt")
            path.write_text(self.segmented_text() + "\n")
            self.wrote(path)
        return {"val/bpc": r["bpc"], "efficiency/compression_text": r["compression"]}

    @torch.no_grad()
    def segmented_text(self) -> str:
        """The valid split's first window (task.context chars) as the model segments it in eval mode:
        '|' after each character that closes a segment (the text twin of the CLIP boundary picture)."""
        ids = self.ids["valid"][:self.context]
        was_training = self.model.training
        self.model.eval()
        b = self.model(torch.from_numpy(ids.astype(np.int64))[None].to(self.device)).boundaries[0]
        self.model.train(was_training)
        return caption_with_breaks(text8.decode(ids).encode(), b.tolist())

    def final_evaluate(self) -> dict[str, float]:
        r = self._bpc("test")  # the WHOLE test split, with the model just trained
        return {"lm/test_bpc": r["bpc"], "lm/test_chars": r["chars"], "efficiency/compression_text": r["compression"]}
