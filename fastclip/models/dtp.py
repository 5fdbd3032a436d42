"""Dynamic Token Pooling primitives (Nawrot et al. 2023), shared by the char LM and CLIP towers.

Convention: boundaries b[B, T] in {0, 1}; b[t] = 1 means token t CLOSES its segment, so a
token's segment id is the exclusive cumsum of b. Boundaries may carry a straight-through
gradient (gumbel): the pooling weights are built so that their VALUES are exact 0/1 memberships
while their DERIVATIVE w.r.t. the segment id is +1 (paper: the reference implementation's) or -1
(leave), which is how the task loss reaches the boundary predictor through the pooling. Never
cast b to int/bool before pooling.

Why two signs (boundary.pooling_grad). A boundary inserted inside segment s raises the segment
id of s's tail (and of every later token). Whole later segments cancel out of the segment-mean
gradient either way (their tokens' deviations from their mean sum to 0), so what reaches b_t is
s's tail. With +1, the tail counts as weighing MORE in s's mean: the linearised effect of
splitting has the opposite sign to splitting's actual effect on s, which keeps only its head.
With -1 (leave), the tail leaves s, as it does when the boundary is inserted.
"""
import math

import torch
from torch import nn


class BoundaryPredictor(nn.Module):
    """MLP d -> hidden_ratio * d -> 1 on the pre-layer output (the paper: 4); one logit per token.

    init_rate starts the predictor at a boundary rate (gumbel: its prior). Started at 0.5, the
    task's early gradients drove the logits deep negative, where the relaxed Bernoulli's
    gradient vanishes and the prior can no longer pull the rate back (collapse to one segment).
    """

    def __init__(self, width: int, dropout: float = 0.0, init_rate: float | None = None, hidden_ratio: int = 4):
        super().__init__()
        hidden = max(1, int(hidden_ratio * width))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
        if init_rate is not None:
            nn.init.constant_(self.mlp[-1].bias, math.log(init_rate / (1 - init_rate)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden).squeeze(-1)


class NonFiniteBoundaries(FloatingPointError):
    """A DTP tower's boundary predictor gave a non-finite logit (its weights have diverged).
    Raised from the tower's one host sync, before a garbage segment count sizes any tensor; the
    training loop reports it as TrainingDiverged, naming the step."""


def finite_flag(logits: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """0-dim tensor of like's dtype and device: 1 if every logit is finite (or there are no logits:
    a rule without a predictor), else 0. Stacked into a tower's size transfer, so the check
    adds no host sync of its own; the host side is check_finite."""
    if logits is None:
        return torch.ones((), dtype=like.dtype, device=like.device)
    return torch.isfinite(logits.detach()).all().to(like.dtype)


def check_finite(flag: int, tower: str) -> None:
    """The host side of finite_flag. Raises NonFiniteBoundaries naming the tower."""
    if not flag:
        raise NonFiniteBoundaries(f"{tower}: the boundary predictor's logits are not finite (the weights have diverged)")


# boundary.pooling_grad -> d membership / d segment id at the member slot (module docstring)
POOLING_GRAD_SIGN = {"paper": 1.0, "leave": -1.0}


def _membership(index: torch.Tensor, n_slots: int, grad: str = "paper") -> torch.Tensor:
    """[B, n_slots, T] with value 1 where index[b, t] == slot, else 0; there, d/d index = +1
    (paper) or -1 (leave: a token whose index rises leaves its slot)."""
    sign = POOLING_GRAD_SIGN[grad]  # an unknown name fails here rather than pooling as paper
    slots = torch.arange(n_slots, device=index.device, dtype=index.dtype)
    diff = slots[None, :, None] - index[:, None, :]
    member = diff.detach() == 0
    return torch.where(member, 1.0 - sign * diff, torch.zeros_like(diff))


def segment_counts(boundaries: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Segments per row: boundaries strictly inside the valid tokens, plus the last (open) segment."""
    b = boundaries.detach()
    if token_mask is None:
        return b[:, :-1].sum(1).long() + 1
    lengths = token_mask.sum(1)
    inner = (b * token_mask).cumsum(1).gather(1, (lengths - 1).clamp_min(0)[:, None]).squeeze(1)
    last_is_boundary = b.gather(1, (lengths - 1).clamp_min(0)[:, None]).squeeze(1)
    return (inner - last_is_boundary).long() + (lengths > 0).long()


def segment_ids(b: torch.Tensor) -> torch.Tensor:
    """The segment each token belongs to along the last dim: the exclusive cumsum of b
    (differentiable, so a straight-through b passes its gradient on)."""
    return b.cumsum(-1) - b


def downsample(hidden: torch.Tensor, boundaries: torch.Tensor, token_mask: torch.Tensor | None = None,
               n_segments: int | None = None, grad: str = "paper"):
    """Segment means. hidden [B, T, D], boundaries [B, T] -> (segments [B, S, D], segment_mask [B, S]).

    Rows with fewer segments are padded; segment_mask says which segments hold tokens. Padded
    tokens (token_mask False) belong to no segment. grad: the straight-through estimator's sign
    (module docstring); values do not depend on it.
    """
    b = boundaries.to(hidden.dtype) if boundaries.dtype == torch.bool else boundaries
    seg_id = segment_ids(b)
    if n_segments is None:
        n_segments = int(segment_counts(b, token_mask).max().item()) if b.numel() else 1
    weights = _membership(seg_id, n_segments, grad)      # [B, S, T]
    if token_mask is not None:
        weights = weights * token_mask[:, None, :].to(weights.dtype)
    counts = weights.sum(-1, keepdim=True)  # not detached: the mean's normaliser carries gradient too
    segment_mask = counts.detach().squeeze(-1) > 0
    weights = weights / counts.clamp_min(1.0)
    return torch.bmm(weights.to(hidden.dtype), hidden), segment_mask


def mean_of_valid(seq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """seq [B, S, D], valid [B, S] -> [B, D]: each row's mean over its valid positions (0 for none)."""
    w = valid.to(seq.dtype)[..., None]
    return (seq * w).sum(1) / w.sum(1).clamp_min(1.0)


def causal_upsample(short: torch.Tensor, boundaries: torch.Tensor, grad: str = "paper") -> torch.Tensor:
    """short [B, 1 + S, D] with the null group at index 0 -> [B, T, D].

    Token t reads index sum(b[:t+1]): the latest segment that has CLOSED at or before t, or the
    null group when none has; it never sees a segment still open. grad: the straight-through sign,
    as in downsample (boundary.pooling_grad): a boundary inserted at or before t raises t's read
    index, and with `leave` t leaves the slot it read; values do not depend on it.
    """
    b = boundaries.to(short.dtype) if boundaries.dtype == torch.bool else boundaries
    read = b.cumsum(1)
    weights = _membership(read, short.shape[1], grad)    # [B, 1 + S, T]
    return torch.bmm(weights.transpose(1, 2).to(short.dtype), short)


def padding_attn_mask(segment_mask: torch.Tensor, n_heads: int, causal: bool = False) -> torch.Tensor:
    """Additive float mask [B * heads, S, S] for nn.MultiheadAttention: padded keys get -inf.

    A padded query row attends to itself only, so no row is all -inf (which would give NaN).
    """
    B, S = segment_mask.shape
    allowed = segment_mask[:, None, :].expand(B, S, S).clone()
    if causal:
        allowed &= torch.ones(S, S, dtype=torch.bool, device=segment_mask.device).tril()
    allowed |= torch.eye(S, dtype=torch.bool, device=segment_mask.device)
    mask = torch.zeros(B, S, S, device=segment_mask.device).masked_fill(~allowed, float("-inf"))
    return mask.repeat_interleave(n_heads, dim=0)
