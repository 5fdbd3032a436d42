"""Bits per character over a WHOLE split: windows of `context` chars moved by `stride`; each
window scores only the positions no earlier window scored (its last `stride`, the first window
all of them), so every character after the first is predicted exactly once, with at least
context - stride chars of history (less only at the very start)."""
import math

import numpy as np
import torch

from fastclip.errors import InputError


def window_plan(n_targets: int, context: int, stride: int) -> list[tuple[int, int]]:
    """[(window start, first scored offset inside the window)] covering targets 0..n_targets-1 once."""
    if not 0 < stride <= context:
        raise InputError(f"eval stride={stride}: expected 0 < stride <= context ({context})")
    if n_targets <= context:
        return [(0, 0)]
    starts = list(range(0, n_targets - context + 1, stride))
    if starts[-1] + context < n_targets:
        starts.append(n_targets - context)
    plan, scored_until = [], 0
    for a in starts:
        plan.append((a, scored_until - a if scored_until > a else 0))
        scored_until = a + context
    return plan


@torch.no_grad()
def evaluate_bpc(model, ids: np.ndarray, context: int, stride: int, device, batch_size: int = 32) -> dict[str, float]:
    """Returns bpc, the number of scored chars, and the achieved compression (tokens / segments)."""
    was_training = model.training
    model.eval()
    data = torch.from_numpy(ids.astype(np.int64))
    n_targets = len(data) - 1
    length = min(context, n_targets)
    plan = window_plan(n_targets, length, min(stride, length))
    nats, scored, tokens, segments = 0.0, 0, 0, 0
    for i in range(0, len(plan), batch_size):
        chunk = plan[i:i + batch_size]
        x = torch.stack([data[a:a + length] for a, _ in chunk]).to(device)
        y = torch.stack([data[a + 1:a + 1 + length] for a, _ in chunk]).to(device)
        first = torch.tensor([f for _, f in chunk], device=device)
        keep = torch.arange(length, device=device)[None, :] >= first[:, None]
        out = model(x)
        nll = torch.nn.functional.cross_entropy(out.logits.float().transpose(1, 2), y, reduction="none")
        nats += float(nll[keep].sum())
        scored += int(keep.sum())
        tokens += x.numel()
        segments += int(out.segments.sum())
    model.train(was_training)
    if scored != n_targets:
        raise AssertionError(f"BPC scored {scored} of {n_targets} characters")
    return {"bpc": nats / scored / math.log(2), "chars": scored, "compression": tokens / segments}


def collapsed(compression: float, context: int) -> bool:
    """Whether an evaluation's segmentation has collapsed: at most 2 segments per `context`-char window
    (compression = chars / segments >= context / 2). The model then hardly uses its shortened layers,
    so its BPC is not DTP's (an unconfident gumbel predictor after a short run thresholds to none)."""
    return compression >= context / 2
