"""The placement control (eval.placement_control): zero-shot top-1 of a learned DTP image tower as
learned and with each image pooled at another image's boundary logits, which separates boundaries
that follow an image's content from where they merely fall. The tower's `placement` hook is where the
logits are recorded and swapped (models/vision.py DTPImageTower.forward)."""
import contextlib
from typing import Callable

import torch

from fastclip.errors import InputError


class RecordedPlacement:
    """The placement control's first pass: every image's boundary logits [B, N] kept, in the order
    the images come (on their device), and passed on unchanged."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.rows.append(logits.detach())
        return logits

    def logits(self) -> torch.Tensor:
        """[n_images, N] in the order the images came."""
        if not self.rows:
            raise RuntimeError("eval.placement_control: the learned pass ran no image through the DTP image tower")
        return torch.cat(self.rows)


class BorrowedPlacement:
    """The placement control's second pass: the i-th image to come gets the boundary logits of
    image donor[i] of the first pass (the same images in the same order), in place of its own."""

    def __init__(self, logits: torch.Tensor, donor: torch.Tensor):
        self.donors = logits[donor.to(logits.device)]
        self.used = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        B = logits.shape[0]
        if self.used + B > len(self.donors) or self.donors.shape[1:] != logits.shape[1:]:
            raise RuntimeError(f"eval.placement_control: the swapped pass's images ({self.used + B} so far, "
                             f"{logits.shape[1]} patches) are not the learned pass's ({len(self.donors)} images, "
                             f"{self.donors.shape[1]} patches)")
        out = self.donors[self.used:self.used + B].to(logits.dtype)
        self.used += B
        return out


def derangement(n: int, seed: int) -> torch.Tensor:
    """[n] long: a random permutation with no fixed point, seeded (a random cyclic order: each
    image's donor is the next image along it)."""
    if n < 2:
        raise InputError(f"eval.placement_control swaps boundaries between evaluation images; it needs at "
                         f"least 2, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    donor = torch.empty_like(order)
    donor[order] = order.roll(-1)
    return donor


def require_learned_placement(tower) -> None:
    if getattr(tower, "predictor", None) is None:
        raise InputError("eval.placement_control=true compares learned image boundaries with other images' ones: "
                         f"this image tower ({type(tower).__name__}) has no boundary predictor "
                         "(boundary=gumbel or entropy_spike with image in boundary.apply_to)")


@contextlib.contextmanager
def _placement(tower, hook):
    tower.placement = hook
    try:
        yield hook
    finally:
        tower.placement = None


def placement_control(tower, top1: Callable[[], float], seed: int = 0) -> tuple[float, float]:
    """The placement control (eval.placement_control) -> (top-1 as learned, top-1 with swapped
    placements). top1() evaluates the model holding `tower` (a learned DTP image tower) on a fixed
    image set in a fixed order; it runs twice. The first pass records each image's boundary logits
    (the predictor's plus any learned per-position logits, before forced row ends); in the second,
    every image is pooled with another image's logits, a seeded derangement over the whole set (not
    just its batch: an evaluation set in class order would lend a batch-mate of the same class).

    What a placement shares across images stays: the set's logits are permuted, so the distribution
    of boundary counts (the compute), the per-position preferences (image_start=stride) and the
    forced row ends are the same; only each placement's tie to its own image goes. A tower whose
    boundaries ignore the image gets exactly its own boundaries back (gain 0); one whose boundaries
    follow the image's content in a way the task uses scores lower when swapped (gain > 0).
    Errors: ValueError for a tower without a boundary predictor, fewer than 2 images, or a second
    pass that sees other images than the first."""
    require_learned_placement(tower)
    with _placement(tower, RecordedPlacement()) as record:
        learned = top1()
    logits = record.logits()
    with _placement(tower, BorrowedPlacement(logits, derangement(len(logits), seed))) as borrowed:
        swapped = top1()
    if borrowed.used != len(logits):
        raise RuntimeError(f"eval.placement_control: the swapped pass saw {borrowed.used} images, the learned "
                         f"pass {len(logits)}")
    return learned, swapped
