"""What a model's forward returns, typed, in the manner of transformers' ModelOutput.

TowerOutput: what a tower's forward returns (every image and text tower: vanilla, DTP, ToMe,
EViT, patch dropout), in the manner of transformers' `BaseModelOutputWithPooling`: one typed object, the
fields a tower does not produce left None. Readers: the CLIP objective (models/clip.py), the task's
step metrics, efficiency and the boundary picture (eval/), inference and the benches.

FastCLIP.forward keeps open_clip's output dict (image_features, text_features, logit_scale) and
adds the two towers' outputs under `image_output` / `text_output`.

CharLMOutput: what the hourglass character LM (models/charlm.py) returns; readers: the LM task's
loss and metrics (tasks/lm.py) and bits per character (eval/bpc.py)."""
from dataclasses import dataclass

import torch
from torch.utils._pytree import register_dataclass


@dataclass
class TowerOutput:
    """One tower's forward on a batch of B inputs (N: the tokens a tower reads, patches or bytes).

    embedding: [B, D] the tower's embedding after its projection, not normalised.
    tokens: [B] float, the tokens each input came in as: patches for an image (0 for a ModifiedResNet,
        which has none), non-padding tokens for a caption (BPE tokens or bytes).
    segments: [B] float, the tokens the tower's later blocks ran on for that input: DTP segments,
        ToMe's or EViT's tokens after merging / dropping, patch dropout's kept patches; = tokens for a
        vanilla tower. tokens / segments is the logged compression.
    boundaries: [B, N] 0/1 (float), DTP towers only: 1 where a segment ends, in reading order (the
        scan order for images, bytes for text; 0 on padding).
    boundary_logits: [B, N], DTP towers with a boundary predictor only: its logits, which the
        method's auxiliary loss reads (None for rules without a predictor).
    boundary_targets: [B, N] 0/1 (float): the boundaries a supervised method is trained towards
        (entropy spikes of the next-patch / next-char head, unigram piece ends); None otherwise.
    auxiliary_loss: scalar, the loss of an auxiliary predictor the tower trains alongside (the
        entropy_spike method's next-patch or next-char head), added to the boundary loss; else None.
    token_mask: [B, N] float, DTP text tower only: 1 on real bytes, 0 on padding.
    scan: [N] long, DTP image tower read in a non-raster order only: reading position -> raster
        patch index (the boundary picture maps boundaries back to the grid with it).
    dropped: [B] long, DTP image tower under boundary.image_token_budget only: the boundaries the
        budget dropped from each image (boundaries keeps the predictor's own, which its loss reads).
    """
    embedding: torch.Tensor
    tokens: torch.Tensor
    segments: torch.Tensor
    boundaries: torch.Tensor | None = None
    boundary_logits: torch.Tensor | None = None
    boundary_targets: torch.Tensor | None = None
    auxiliary_loss: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    scan: torch.Tensor | None = None
    dropped: torch.Tensor | None = None


@dataclass
class CharLMOutput:
    """The hourglass character LM's forward on a batch of B windows of T characters (V: the alphabet).

    logits: [B, T, V], next-character logits (natural-log units: softmax gives P(char t+1 | chars <= t)).
    segments: [B] long, the positions the shortened layers ran on per window: closed segments plus
        the open one at the end (DTP), = T for the vanilla model (boundary=none). T * B / sum is the
        logged compression.
    boundaries: [B, T] 0/1 (float), DTP only: 1 where a segment ends (after that character); None for
        the vanilla model.
    boundary_logits: [B, T], DTP with a boundary predictor only: its logits, which the method's
        auxiliary loss reads; None for rules without a predictor (whitespace, fixed k) and the vanilla model.
    """
    logits: torch.Tensor
    segments: torch.Tensor
    boundaries: torch.Tensor | None = None
    boundary_logits: torch.Tensor | None = None


# Pytree nodes (as transformers registers its ModelOutput), so that DistributedDataParallel, which
# flattens a forward's output to route its tensors through its gradient hooks, sees the tensors inside
# as it saw them in the dicts these replaced.
register_dataclass(TowerOutput)
register_dataclass(CharLMOutput)
