"""compression=distill: knowledge distillation from a frozen fastclip teacher while the student trains.

loss = (1 - alpha) x contrastive + alpha x affinity KL + beta x feature MSE (+ the student's own
boundary objectives, unscaled).
- affinity KL (TinyCLIP's affinity mimicking; open_clip's DistillClipLoss uses the cross-entropy,
  which differs by the teacher's entropy): KL(teacher || student) of the image->text and text->image
  softmax over the batch, each model's logits at its own learned scale, both divided by
  `compression.temperature`, times temperature^2 (Hinton et al. 2015), the two directions averaged.
- feature MSE (CLIP-KD, Yang et al. 2024: feature mimicry was its strongest single term): the squared
  distance between the student's unit embeddings, projected to the teacher's width by a learned
  linear map where the widths differ (renormalised), and the teacher's, summed over the width,
  averaged over the batch and the two towers.
Data-parallel, both terms are over each rank's own batch (the teacher's affinities are a local
batch's): the objective's distillation part depends on the per-process batch, not the global one.

The teacher is a fastclip checkpoint (`compression.teacher`: a file, a run dir or runs:/<MLflow run
id>, through fastclip.inference.load). It runs in eval mode under no_grad, is never in the optimizer,
and its forward time is logged per step (time/teacher_ms). It reads the captions its own way: the
student's tokens are decoded to text and tokenized with the teacher's tokenizer where the two differ
(a character-level DTP student under a BPE teacher), and images are resized to the teacher's input
size where that differs. Written here: open_clip's DistillClipLoss has no feature term, no KL
temperature and expects one tokenizer.
"""
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.checkpoint import CheckpointError, ResumeError
from fastclip.checks import ConfigError
from fastclip.compression import PROJECTION
from fastclip.compression.base import Compression, Twin
from fastclip.compression.measure import QUALITY, eval_batch_ms, run_autocast, side_by_side_ms
from fastclip.models.clip import decode_tokens

log = logging.getLogger(__name__)


class Distiller:
    """The teacher and the distillation terms for one student. __call__(loss, parts, out, images,
    tokens) -> (loss, metrics): the student's objective (clip_objective's loss and parts) with the
    distillation terms mixed in, and distill/kl, distill/feature_mse, time/teacher_ms."""

    def __init__(self, teacher: nn.Module, teacher_tokenizer, student_tokenizer, cc,
                 teacher_image_size: int, student_image_size: int):
        self.teacher, self.teacher_tokenizer, self.student_tokenizer = teacher, teacher_tokenizer, student_tokenizer
        self.alpha, self.beta, self.temperature = float(cc.alpha), float(cc.beta), float(cc.temperature)
        self.teacher.eval().requires_grad_(False)
        self.image_size = teacher_image_size if teacher_image_size != student_image_size else None
        self.same_tokens = (type(teacher_tokenizer) is type(student_tokenizer)
                            and getattr(teacher_tokenizer, "context_length", None)
                            == getattr(student_tokenizer, "context_length", None))

    @torch.no_grad()
    def teacher_outputs(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[dict, float]:
        """The teacher's forward on the student's batch, read its own way -> (outputs, milliseconds: the
        caption re-tokenization and the forward; on CUDA synchronised around it, one wait per step)."""
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if not self.same_tokens:
            tokens = self.teacher_tokens(tokens)
        if self.image_size is not None:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        out = self.teacher(images, tokens)
        if images.is_cuda:
            torch.cuda.synchronize()
        return out, (time.perf_counter() - start) * 1000

    def teacher_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The student's token rows as text, tokenized the teacher's way (on the same device)."""
        texts = [decode_tokens(self.student_tokenizer, row) for row in tokens.cpu()]
        return self.teacher_tokenizer(texts).to(tokens.device)

    def __call__(self, loss, parts: dict, out: dict, images: torch.Tensor, tokens: torch.Tensor):
        teacher, ms = self.teacher_outputs(images, tokens)
        kl = affinity_kl(out, teacher, self.temperature)
        mse = feature_mse(out, teacher)
        total = loss - self.alpha * parts["contrastive_loss"] + self.alpha * kl + self.beta * mse
        return total, {"distill/kl": kl.detach(), "distill/feature_mse": mse.detach(), "time/teacher_ms": ms}


def affinity_kl(student: dict, teacher: dict, temperature: float = 1.0) -> torch.Tensor:
    """Mean of KL(teacher || student) over the image->text and text->image batch softmaxes, x T^2.
    student/teacher: a CLIP forward's outputs (unit image_features / text_features [B, d], logit_scale)."""
    s = student["logit_scale"] * student["image_features"] @ student["text_features"].T / temperature
    t = teacher["logit_scale"] * teacher["image_features"] @ teacher["text_features"].T / temperature
    s, t = s.float(), t.float()

    def kl(s_logits, t_logits):
        return F.kl_div(s_logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    return (kl(s, t) + kl(s.T, t.T)) / 2 * temperature ** 2


def feature_mse(student: dict, teacher: dict) -> torch.Tensor:
    """Squared distance between the student's unit embeddings (projected_<key> where the student has a
    projection to the teacher's width) and the teacher's, summed over the width, averaged over the
    batch and the two towers."""
    total = 0.0
    for key in ("image_features", "text_features"):
        s = student.get(f"projected_{key}", student[key])
        total = total + (s.float() - teacher[key].float()).pow(2).sum(-1).mean()
    return total / 2


def _with_projected_features(model: nn.Module, args, out: dict) -> dict:
    """The student's forward hook: its unit embeddings mapped to the teacher's width, renormalised."""
    projection = getattr(model, PROJECTION)
    return {**out, **{f"projected_{key}": F.normalize(projection(out[key]), dim=-1)
                      for key in ("image_features", "text_features")}}


def build_distiller(cc, student: nn.Module, student_tokenizer, student_image_size: int, device,
                    tracking_uri: str | None = None) -> Distiller:
    """Loads the teacher named by compression.teacher (fastclip.inference.load) onto `device` and, where
    its embedding width differs from the student's, gives the student a learned projection (`PROJECTION`,
    trained with it, left out when the student is loaded for inference). Raises ConfigError naming the
    key and value for a missing or unreadable teacher, or one that is not a CLIP checkpoint."""
    from fastclip.inference import load
    spec = cc.teacher
    if not spec:
        raise ConfigError("compression=distill needs compression.teacher: a fastclip checkpoint, a run dir or "
                          "runs:/<MLflow run id>")
    from fastclip.checkpoint_paths import checkpoint_path
    try:
        path = checkpoint_path(str(spec), tracking_uri)
        teacher, preprocess, tokenizer = load(path, device, uri=tracking_uri)
    except (CheckpointError, FileNotFoundError, OSError) as exc:
        raise ConfigError(f"compression.teacher={spec}: {exc}") from None
    width_s, width_t = _embed_width(student, student_tokenizer, device), _embed_width(teacher, tokenizer, device)
    if width_s != width_t:
        setattr(student, PROJECTION, nn.Linear(width_s, width_t, bias=False, device=device))
        # projected inside the student's forward: data-parallel, DistributedDataParallel then sees the
        # projection used in the forward it wraps (with find_unused_parameters too)
        student.register_forward_hook(_with_projected_features)
    size = _image_size(preprocess)
    distiller = Distiller(teacher, tokenizer, student_tokenizer, cc, size, student_image_size)
    distiller.identity = {"checkpoint": str(path), "weights_digest": weights_digest(teacher)}
    return distiller


def weights_digest(model: nn.Module) -> str:
    """The teacher's identity: a BLAKE2b digest (16 hex digits) of its state dict (names, dtypes, shapes,
    values). A run dir or runs:/<id> names that run's last.pt, which changes while the run trains on:
    the student's checkpoint keeps the digest, and a resume with other weights is refused."""
    import hashlib
    h = hashlib.blake2b(digest_size=8)
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d tensors have no byte view
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself, no copy of a 600 MB teacher
    return h.hexdigest()


@torch.no_grad()
def _embed_width(model: nn.Module, tokenizer, device) -> int:
    """The width of a CLIP's embeddings (one caption through its text tower)."""
    was_training = model.training
    width = model.eval().encode_text(tokenizer(["a probe"]).to(device)).shape[-1]
    model.train(was_training)
    return int(width)


def _image_size(preprocess) -> int:
    """The square input size of an open_clip eval transform (its CenterCrop's)."""
    for t in getattr(preprocess, "transforms", []):
        if type(t).__name__ == "CenterCrop":
            size = t.size
            return int(size[0] if isinstance(size, (tuple, list)) else size)
    raise ValueError("the teacher's eval transform has no CenterCrop: its input size is unknown")


def compress(task, distiller: Distiller, final: dict[str, float]) -> dict[str, float]:
    """At the end: the teacher's own quality on the same evaluation sets as <name>_teacher (skipped where
    its input size differs from the student's: the sets are preprocessed at the student's), and the eval
    latency of the student beside the teacher's on one batch (time/eval_batch_ms, time/eval_batch_ms_teacher),
    both under the run's autocast."""
    metrics = {}
    images, tokens = task.eval_batch()
    was_training = task.model.training
    try:
        task.model.eval()
        amp = run_autocast(task.cfg, images.device)
        teacher_tokens = tokens if distiller.same_tokens else distiller.teacher_tokens(tokens)
        if distiller.image_size is None:  # the teacher timed beside the student (side_by_side_ms)
            metrics["time/eval_batch_ms"], metrics["time/eval_batch_ms_teacher"] = side_by_side_ms(
                [(task.model, images, tokens), (distiller.teacher, images, teacher_tokens)], amp_dtype=amp)
            teacher = task.quality(distiller.teacher, distiller.teacher_tokenizer)
            metrics.update({f"{k}_teacher": v for k, v in teacher.items() if k.startswith(QUALITY)})
        else:
            metrics["time/eval_batch_ms"] = eval_batch_ms(task.model, images, tokens, amp_dtype=amp)
            log.warning("the teacher reads %d px images and the evaluation sets are preprocessed at the student's "
                        "%d px: the teacher's own numbers (*_teacher, time/eval_batch_ms_teacher) are not measured; "
                        "evaluate the teacher's run for them", distiller.image_size, images.shape[-1])
    finally:
        task.model.train(was_training)
    return metrics


class Distillation(Compression):
    """compression=distill. Its twin is the teacher (its own quality on the same evaluation sets)."""
    name = "distill"
    twin = Twin("teacher", "the frozen teacher the student learned from")

    def __init__(self, cc, cfg):
        self.cc, self.cfg = cc, cfg
        self.distiller: Distiller | None = None

    def prepare(self, model: nn.Module, tokenizer=None) -> None:
        """Loads the teacher before any data is read (a bad compression.teacher fails first)."""
        from fastclip.models.clip import clip_geometry
        size = clip_geometry(self.cfg.encoder)["vision_cfg"].get("image_size", 224)
        self.distiller = build_distiller(self.cc, model, tokenizer, size, next(model.parameters()).device,
                                         self.cfg.tracking.uri)

    def training_loss(self, loss, parts, out, images, tokens):
        return self.distiller(loss, parts, out, images, tokens)

    def tags(self) -> dict[str, str]:
        return {"fastclip.teacher": f"{self.distiller.identity['checkpoint']} (weights "
                                    f"{self.distiller.identity['weights_digest']})"}

    def state_dict(self) -> dict:
        """The teacher it learned from: its checkpoint and its weights' digest."""
        return {"teacher": dict(self.distiller.identity)}

    def load_state_dict(self, state: dict) -> None:
        """Refuses a teacher other than the one the checkpoint's steps learned from (a run dir's last.pt
        trained on since), naming compression.teacher; a checkpoint written before the record is taken
        as it is."""
        was, now = state.get("teacher"), self.distiller.identity
        if was and was["weights_digest"] != now["weights_digest"]:
            raise ResumeError(f"compression.teacher={self.cc.teacher}: {now['checkpoint']} holds other weights "
                              f"(digest {now['weights_digest']}) than the teacher this run learned from "
                              f"({was['checkpoint']}, digest {was['weights_digest']}): that run trained on, or "
                              f"the path names another; resume with the same teacher, or start a new run")

    def finish(self, task, final: dict[str, float], step: int) -> dict[str, float]:
        return compress(task, self.distiller, final)

    def describe(self, metrics: dict[str, float]) -> str:
        return f"teacher {self.cc.teacher} (weights {self.distiller.identity['weights_digest']})"

