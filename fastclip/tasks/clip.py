"""Contrastive image-text pretraining: open_clip towers (vanilla, DTP or ToMe), open_clip's
tokenizer, transforms and ClipLoss, plus each DTP tower's boundary loss. Every evaluation
reports zero-shot accuracy and the efficiency the model actually achieved: per epoch on the
validation split (metrics under val/, what a sweep optimises), at the end of the run on the test
split under the reported names (zeroshot/top1, retrieval/*, zeroshot/imagenet_*)."""
from dataclasses import replace
from pathlib import Path

import torch
from open_clip import ClipLoss
from torch.utils.data import DataLoader, IterableDataset

from fastclip import distributed, runtime
from fastclip.checks import check_config
from fastclip.compression.options import build_compression
from fastclip.data.coco import build_coco
from fastclip.data.coco import training_captions as coco_training_captions
from fastclip.data.csv_pairs import build_csv, training_pairs
from fastclip.data.device_copies import DeviceCopies
from fastclip.data.digits import build_digits
from fastclip.data.epoch_order import EpochOrder, Latest, ReadPast, Sized, batch_rows, trim_batch
from fastclip.data.image_folder import build_image_folder, folder_classnames
from fastclip.data.overlap import EVAL_OVERLAP, settle_eval_overlap
from fastclip.data.pairs import ImageFiles, collate_skipping, require_usable
from fastclip.data.shard_split import LeftOut
from fastclip.data.shards import ShardStream, build_shards, shard_captions
from fastclip.data.splits import ClipData
from fastclip.errors import InputError
from fastclip.eval.boundary_picture import draw, next_picture
from fastclip.eval.efficiency import parameter_counts
from fastclip.eval.imagenet import IMAGENET_CLASSNAMES, imagenet_eval, imagenet_files
from fastclip.eval import sharded
from fastclip.eval.names import CLASS_COUNT_METRIC, val_name
from fastclip.eval.retrieval import retrieval_eval
from fastclip.eval.zeroshot import zero_shot_eval
from fastclip.data.uint8_images import split_normalisation
from fastclip.models.clip import build_clip, build_transforms, clip_objective, decode_tokens
from fastclip.models.patch_dropout import PatchDropoutImageTower
from fastclip.models.placement import placement_control
from fastclip.tasks.accumulation import accumulate_contrastive
from fastclip.schema import typed_group
from fastclip.schema.workers import loader_workers
from fastclip.tasks.protocol import StepOutput, TaskBase
from fastclip.worker_signals import ignore_stop_signals


# The sources' builders: each yields a training set, a validation and a test split (data/splits.py).
BUILDERS = {"digits": build_digits, "image_folder": build_image_folder, "csv": build_csv, "coco2014": build_coco,
            "webdataset": build_shards}


def build_clip_data(cfg, preprocess_train, preprocess_eval, tokenizer) -> ClipData:
    name = cfg.dataset.name
    if name in BUILDERS:
        # the dataset group as its schema's dataclass (fastclip.schema.data): the sources take typed objects
        return BUILDERS[name](typed_group(cfg, "dataset"), preprocess_train, preprocess_eval, tokenizer)
    raise InputError(f"dataset={name!r} is not an image-text dataset for task=clip "
                     f"(digits, image_folder, csv, coco2014, webdataset)")


def training_captions(ds) -> list[str]:
    """The captions training will see, the training split's alone (never a validation or test
    caption): what a unigram text-boundary model learns from."""
    if ds.name == "digits":
        return [t.format(c) for c in ds.classnames for t in ds.train_templates]
    if ds.name == "image_folder":
        return [t.format(c) for c in folder_classnames(ds) for t in ds.train_templates]
    if ds.name == "csv":
        return [c for _, c in training_pairs(ds) if c]
    if ds.name == "coco2014":
        return coco_training_captions(ds)
    if ds.name == "webdataset":
        return shard_captions(ds, limit=100_000)
    raise InputError(f"dataset={ds.name!r}: no caption corpus for boundary=unigram")


def has_boundary_picture(model) -> bool:
    """Whether an evaluation draws the boundary picture: DTP towers (their segments), and the peers
    where it has a meaning (patch dropout at eval_keep and EViT: the kept patches; ToMe: its merges)."""
    if model.full_tokens:  # trainer.full_token_steps' phase: nothing pooled, merged or dropped to draw
        return False
    return (model.image_method is not None or model.text_method is not None
            or getattr(model.visual, "drops_at_eval", False) or hasattr(model.visual, "merged_groups"))


def spread(n: int, length: int) -> list[int]:
    """min(n, length) indices evenly spaced over range(length), the first 0 (all of it where n >= length)."""
    if n >= length:
        return list(range(length))
    return [i * length // n for i in range(n)]


class ClipTask(TaskBase):
    shards_evaluation = True  # data-parallel: each rank encodes its share of every evaluation set

    def __init__(self, cfg, device: torch.device, run_dir: str | Path | None = None):
        check_config(cfg)
        self.cfg, self.device = cfg, device
        self.run_dir = Path(run_dir) if run_dir else None
        preprocess_train, preprocess_eval = build_transforms(cfg.encoder)
        # training batches stay uint8 until they reach the device (data/uint8_images.py)
        preprocess_train, self.normalize = split_normalisation(preprocess_train)
        captions = training_captions(typed_group(cfg, "dataset")) if cfg.boundary.name == "unigram" else None
        self.model, self.tokenizer = build_clip(cfg.encoder, cfg.boundary, captions, cfg.dataset.cache_dir)
        self.model.to(device)
        self.compression = build_compression(cfg)
        self.compression.prepare(self.model, self.tokenizer)  # before the optimizer sees the model, and the data
        self.data = build_clip_data(cfg, preprocess_train, preprocess_eval, self.tokenizer)
        self.preprocess_eval = preprocess_eval
        world = distributed.current()
        if isinstance(self.data.train, ShardStream):  # equal steps on every rank, or an error now
            self.data.train.check_split(cfg.trainer.batch_size, world.size, loader_workers(cfg))
        # over the GLOBAL batch: every rank's features gathered with their gradients, each rank's loss over
        # its own rows against every column (local_loss: B x G logits, not G x G; the same gradients once
        # DDP averages them); with one process it is the plain loss
        self.criterion = ClipLoss(local_loss=True, gather_with_grad=world.distributed, cache_labels=True,
                                  rank=world.rank, world_size=world.size)
        self._persistent_loader = None  # the training DataLoader, once built with workers (_train_loader)
        self._calls = 0  # train_batches calls: only the newest one's batches may be read
        skipped = getattr(self.data.train, "skipped", 0)  # left out while the data was read (counted once)
        self.build_skipped = dict(skipped) if isinstance(skipped, dict) else {"bad sample": skipped} if skipped else {}
        self.eval_duplicates, self.checks_eval_overlap, dropped = settle_eval_overlap(self.data, cfg.eval.overlap)
        if dropped:
            self.build_skipped[EVAL_OVERLAP] = self.build_skipped.get(EVAL_OVERLAP, 0) + dropped
        self._check_eval_sets()
        self.tags = {**{tag: r.description for tag, r in (("fastclip.retrieval_set", self.data.retrieval),
                                                           ("fastclip.val_retrieval_set", self.data.val_retrieval))
                        if r is not None and r.description}, **self.compression.tags()}

    def _check_eval_sets(self) -> None:
        """Every evaluation set (validation and test) exists and has a usable item before training
        starts, not after it."""
        ds = self.cfg.dataset
        if not (self.data.zeroshot or self.data.retrieval or self.cfg.eval.imagenet_val):
            raise InputError(f"dataset={ds.name} holds out no image to evaluate on"
                             + (f" (dataset.eval_fraction={ds.eval_fraction} of {len(self.data.train)} rows' images)"
                                if ds.name == "csv" else "") + ": set a held-out split or eval.imagenet_val")
        if not (self.data.val_zeroshot or self.data.val_retrieval):
            raise InputError(f"dataset={ds.name} holds out no validation image: per-epoch evaluation and a sweep's "
                             f"objective need one (dataset.val_fraction, val_images or val_shards)")
        for split, field in (("test", "zeroshot"), ("val", "val_zeroshot")):
            if getattr(self.data, field) is not None:
                require_usable(getattr(self.data, field).images, f"dataset={ds.name}'s {split} zero-shot set")
        for split, field in (("test", "retrieval"), ("val", "val_retrieval")):
            retrieval = getattr(self.data, field)
            if retrieval is None:
                continue
            missing = require_usable(retrieval.images, retrieval.description
                                     or f"dataset={ds.name}'s {split} retrieval set")
            if missing:  # the numbers will not be the named split's: say so wherever its name goes
                setattr(self.data, field, replace(retrieval, description=(
                    f"{retrieval.description or 'retrieval set'}, {missing} of its {len(retrieval.images)} "
                    f"images missing: not the complete set")))
        if self.cfg.eval.imagenet_val:
            imagenet_files(self.cfg.eval.imagenet_val)  # a wrong path or layout fails now

    def train_batches(self, epoch: int, start: int = 0):
        """The epoch's batches from batch `start` on (len: the whole epoch). A map-style source
        starts its sampler there, a stream's workers pass over their share without decoding it (or,
        where a worker runs out before them, this process reads past them). Data-parallel: this rank's
        run of each global batch (EpochOrder, ShardStream.set_epoch), in step with the other ranks'
        (distributed.Lockstep, where a bad sample can make a batch short)."""
        train, tc, world = self.data.train, self.cfg.trainer, distributed.current()
        workers = loader_workers(self.cfg)
        stream = isinstance(train, IterableDataset)
        self._calls += 1  # what follows moves the shared loader and epoch state: earlier results go stale
        call = self._calls
        in_workers = False
        if stream:  # the epoch first: which batches each worker makes depends on its shard order
            train.set_epoch(self.cfg.seed, epoch, batch_size=tc.batch_size, rank=world.rank, world_size=world.size)
            in_workers = bool(start) and train.skips_in_workers(start, tc.batch_size, workers)
            train.set_epoch(self.cfg.seed, epoch, start if in_workers else 0, tc.batch_size, world.rank, world.size)
        elif hasattr(train, "set_epoch"):
            train.set_epoch(self.cfg.seed, epoch)
        loader = self._train_loader(workers, epoch, start)
        batches = train.epoch_batches(tc.batch_size, workers) if stream else len(train) // (tc.batch_size * world.size)
        if stream and start and not in_workers:  # where the workers cannot: read past them here, decoded
            loader = ReadPast(loader, start, batches)
        elif start or stream:
            loader = Sized(loader, batches)
        if stream and not start and train.left_out(tc.batch_size, workers):
            loader = LeftOut(loader, train.left_out(tc.batch_size, workers))  # counted as the epoch starts
        # a source whose batches are always whole (in-memory images) needs no agreement on batch sizes each step
        lockstep = world.distributed and not getattr(train, "whole_batches", False)
        ready = distributed.Lockstep(loader, batch_rows, trim_batch) if lockstep else loader
        ready = Latest(ready, lambda: self._calls == call)
        # on a GPU each batch is copied on a side stream one batch ahead, beside the step's kernels
        return DeviceCopies(ready, self.device) if self.device.type == "cuda" else ready

    def _train_loader(self, workers: int, epoch: int, start: int) -> DataLoader:
        """The training DataLoader at (epoch, start). With workers it is built once and persists
        (persistent_workers): the workers outlive the epoch, so their start and the wait for the first
        batches are paid once a run, not every epoch. A new epoch changes only the sampler (this
        process's) and the source's set_epoch state (data/shared_state.py: what the workers read).
        Every sample's randomness comes from (seed, epoch, index), never from a worker's seed (the
        workers' seeds are drawn once, from the first call's generator), so the batches are those of a
        loader built for the epoch (tested). A transform that drew from Python's or numpy's global
        generator would break that, and exact resume with it."""
        train, tc, world = self.data.train, self.cfg.trainer, distributed.current()
        loader = self._persistent_loader
        if loader is not None:
            if isinstance(loader.sampler, EpochOrder):
                loader.sampler.set_epoch(epoch, start)
            return loader
        order = None if isinstance(train, IterableDataset) else \
            EpochOrder(len(train), self.cfg.seed, epoch, start, tc.batch_size, world.rank, world.size)
        loader = DataLoader(train, batch_size=tc.batch_size, drop_last=True, num_workers=workers, sampler=order,
                            # the workers' seeds from (seed, epoch of the first call), not the training process's generator
                            generator=runtime.epoch_generator(self.cfg.seed, epoch), collate_fn=collate_skipping,
                            worker_init_fn=ignore_stop_signals,  # Ctrl-C is the loop's: it stops after a step
                            timeout=tc.loader_timeout_s if workers else 0,  # a stuck worker raises, never hangs
                            persistent_workers=workers > 0, pin_memory=self.device.type == "cuda")
        if workers:
            self._persistent_loader = loader
        return loader

    def close(self) -> None:
        """Stops the persistent training loader's workers (once training ends, and when the run ends or
        fails); a later train_batches call starts new ones."""
        loader, self._persistent_loader = self._persistent_loader, None
        if loader is not None and loader._iterator is not None:  # torch's own shutdown of a persistent iterator
            loader._iterator._shutdown_workers()

    def epoch_samples(self) -> int:
        """Samples the training source declares per epoch (rows, files, or the shards' sizes)."""
        return len(self.data.train)

    def sizes(self) -> dict[str, int]:
        out = {"train samples/epoch": len(self.data.train)}
        if self.data.zeroshot is not None:
            out["zero-shot images"] = len(self.data.zeroshot.images)
        if self.data.retrieval is not None:
            out["retrieval images"] = len(self.data.retrieval.captions)
        if self.data.val_zeroshot is not None:
            out["validation zero-shot images"] = len(self.data.val_zeroshot.images)
        if self.data.val_retrieval is not None:
            out["validation retrieval images"] = len(self.data.val_retrieval.captions)
        return out

    def usable(self, batch) -> bool:
        return batch.images is not None

    def accumulate(self, batches, run):
        """Contrastive accumulation over the step's micro-batches (tasks/accumulation.py): the loss and
        gradients of one batch of accum_steps x batch_size."""
        if sum(map(self.usable, batches)) <= 1:  # nothing to gain from a second forward
            return super().accumulate(batches, run)
        return accumulate_contrastive(self, batches, run)

    def device_inputs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch on the device: images [B, 3, H, W] float32, normalised there from the
        loader's uint8; tokens [B, L]."""
        images = self.normalize(batch.images.to(self.device, non_blocking=True))
        return images, batch.tokens.to(self.device, non_blocking=True)

    def loss(self, batch, forward=None, criterion=None) -> StepOutput:
        """forward: what runs the model (the loop's DistributedDataParallel wrapper; else the model).
        criterion: the contrastive loss of (image_features, text_features, logit_scale) in place of
        self.criterion (accumulation's, over the step's micro-batches)."""
        if batch.images is None:  # every sample of this batch was bad: nothing to learn from
            return StepOutput(None, skipped=batch.skipped)
        images, texts = self.device_inputs(batch)
        with torch.no_grad():  # as open_clip_train: temperature capped at 100
            self.model.logit_scale.clamp_(0, 4.6052)
        out = (forward if forward is not None else self.model)(images, texts)
        loss, parts = clip_objective(self.model, criterion or self.criterion, out)
        # device scalars: the loop reads them in one transfer when it logs (no per-step sync)
        extras = {name: part.detach() for name, part in parts.items()}
        loss, compressing = self.compression.training_loss(loss, parts, out, images, texts)
        extras.update(compressing)
        extras["logit_scale"] = out["logit_scale"].detach()
        for tower in ("image", "text"):
            counts = out[f"{tower}_output"]
            extras[f"compression_{tower}"] = (counts.tokens.sum() / counts.segments.sum().clamp_min(1)).detach()
            if counts.dropped is not None:  # boundary.image_token_budget: what the budget cut this micro-batch
                extras[f"boundaries/dropped_{tower}"] = counts.dropped.sum().float()
        return StepOutput(loss, extras, images.shape[0], batch.skipped)

    def eval_batch(self, n: int = 64, split: str = "val"):
        """A real eval batch for FLOP counting: n held-out images of `split` (val or test) spread evenly
        over it (an image folder's split is sorted by class: its first 64 were one class, and a learned
        tower's compression and GFLOPs were that class's), with their own text (class prompts in unseen
        templates, or their first caption); ImageNet's where the split has neither (test)."""
        z, r = self.data.split(split)
        if z is not None:
            picked = (z.images[i] for i in spread(n, len(z.images)))
            images, labels = zip(*(s for s in picked if s is not None))
            texts = [z.templates[i % len(z.templates)].format(z.classnames[int(c)]) for i, c in enumerate(labels)]
        elif r is not None:
            pairs = [(r.images[i], r.captions[i][0]) for i in spread(n, len(r.captions))]
            pairs = [(im[0], c) for im, c in pairs if im is not None]
            images, texts = zip(*pairs)
        else:
            files, labels = imagenet_files(self.cfg.eval.imagenet_val)
            pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:n].tolist()
            samples = [s for s in ImageFiles([files[i] for i in pick], self.preprocess_eval,
                                             [labels[i] for i in pick]) if s is not None]
            images = [x for x, _ in samples]
            texts = [f"a photo of a {IMAGENET_CLASSNAMES[c]}." for _, c in samples]
        return torch.stack(list(images)).to(self.device), self.tokenizer(list(texts)).to(self.device)

    def quality(self, model=None, tokenizer=None, split: str = "test") -> dict[str, float]:
        """Zero-shot, retrieval and ImageNet numbers of `model` (default: the task's own; another one,
        a compressed copy or a distillation teacher, never reads or writes the ImageNet classifier
        cache, which is the task model's), reading text with `tokenizer` (default: the task's).
        split=test: the reported numbers (zeroshot/top1, retrieval/*, zeroshot/imagenet_*); split=val:
        the validation split's under val/ (val/zeroshot_top1, val/i2t_r1, ...; ImageNet is test only)."""
        cfg, metrics = self.cfg, {}
        own = model is None
        model = self.model if own else model
        tokenizer = tokenizer or self.tokenizer
        z, retrieval = self.data.split(split)
        if z is not None:
            acc = self._zero_shot(model, tokenizer, split)
            metrics.update({"zeroshot/top1": acc["top1"], "zeroshot/top5": acc["top5"]})
        workers = loader_workers(cfg, "eval.num_workers")
        with self._autocast():
            if retrieval is not None:
                metrics.update(retrieval_eval(model, tokenizer, retrieval, self.device, cfg.eval.batch_size, workers,
                                              cfg.trainer.loader_timeout_s))
            if split == "val":
                return {val_name(k): v for k, v in metrics.items()}
            if cfg.eval.imagenet_val:
                cache = Path(cfg.eval.classifier_cache_dir) if cfg.eval.classifier_cache_dir else (
                    self.run_dir / "cache" if self.run_dir else None)
                metrics.update(imagenet_eval(model, tokenizer, cfg.eval.imagenet_val, self.preprocess_eval,
                                             self.device, cfg.eval.imagenet_templates, cfg.eval.batch_size,
                                             workers, cache if own else None,
                                             timeout_s=cfg.trainer.loader_timeout_s))
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Per epoch: the validation split's numbers (val/*), the efficiency achieved on its images
        (efficiency/*, which final_evaluate logs again from the test split's images at the last step,
        later, so the run's latest value is the test split's) and the boundary picture. The test split
        is final_evaluate's."""
        cfg, metrics = self.cfg, self.quality(split="val")
        images, tokens = self.eval_batch(split="val")
        # structured pruning: counted on the layout the run deploys (heads and channels removed), the dense one's beside
        with self._autocast():  # the boundaries as training draws them
            metrics.update(self.compression.efficiency(self.model, images, tokens))
        main = distributed.current().main  # ranks evaluating together: one picture
        if main and self.run_dir is not None and cfg.eval.boundary_picture and has_boundary_picture(self.model):
            path = next_picture(self.run_dir, "png")
            draw(self.model, images, tokens, lambda t: decode_tokens(self.tokenizer, t), path)
            self.wrote(path)
        return metrics

    def final_evaluate(self) -> dict[str, float]:
        """At the end of a run: the test split's numbers under their reported names (quality()), and
        the efficiency the model achieved on the test split's eval batch (efficiency/*: the boundaries
        it drew on test images, the numbers printed and reported beside test accuracy).
        boundary=patch_dropout with eval_keep: zero-shot top-1 again on every
        patch (`zeroshot/top1_all_patches`). eval.placement_control: zero-shot as learned and with each
        image pooled at another image's boundary logits (a derangement over the set: the count
        distribution and per-position preferences stay, the tie to the image goes; models/vision.py
        placement_control); top1_shuffled_placement is the swapped top-1 (the name kept from the
        earlier control), top1_placement_gain = as learned - swapped.
        The learned top-1 is recomputed (one more zero-shot pass, opt-in) rather than taken from the
        loop's last evaluate, so the pair always comes from the same weights whatever called this."""
        metrics = self.quality()
        z = self.data.split("test")[0]
        if z is not None:  # the report's chance line: K / classes for a top-K accuracy
            metrics[CLASS_COUNT_METRIC] = float(len(z.classnames))
        images, tokens = self.eval_batch(split="test")
        with self._autocast():
            metrics.update(self.compression.efficiency(self.model, images, tokens))
        visual = self.model.visual
        if isinstance(visual, PatchDropoutImageTower) and visual.eval_keep and visual.keep < 1:
            with visual.all_patches():  # the same weights at full cost: a second bench row for free
                metrics["zeroshot/top1_all_patches"] = self._zero_shot()["top1"]
        if self.cfg.eval.placement_control:
            with sharded.alone():  # its derangement is over the whole set: each rank evaluates all of it
                learned, swapped = placement_control(visual, lambda: self._zero_shot()["top1"])
            metrics.update({"zeroshot/top1_shuffled_placement": swapped,
                            "zeroshot/top1_placement_gain": learned - swapped})
        return metrics

    def _zero_shot(self, model=None, tokenizer=None, split: str = "test") -> dict[str, float]:
        z = self.data.split(split)[0]
        with self._autocast():
            return zero_shot_eval(model if model is not None else self.model, tokenizer or self.tokenizer, z.images,
                                  z.classnames, z.templates, self.device, self.cfg.eval.batch_size,
                                  loader_workers(self.cfg, "eval.num_workers"), self.cfg.trainer.loader_timeout_s)

    def _autocast(self):
        """Evaluation under the training precision's autocast (trainer.precision): the features and
        DTP boundaries the model was trained to make."""
        return runtime.autocast(self.device, runtime.autocast_dtype(self.cfg.trainer.precision, self.device))

    def params(self) -> dict[str, int]:
        return parameter_counts(self.model)
