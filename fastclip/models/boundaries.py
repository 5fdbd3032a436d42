"""Boundary methods: how a tower decides where segments end, and the auxiliary loss that teaches it.

Every method returns HARD boundaries (values exactly 0/1, float). Only gumbel's carry a
gradient (straight-through); the supervised methods (entropy_spike, unigram) train the
predictor with BCE on its LOGITS and pool with its thresholded output, at training and at
evaluation alike (the targets are never used for pooling, so nothing leaks from the future).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastclip.errors import InputError
from fastclip.models.dtp import POOLING_GRAD_SIGN
from fastclip.schema.model import check_predictor_ratio

METHODS = ("none", "fixed", "whitespace", "gumbel", "entropy_spike", "unigram", "tome")


class BoundaryMethod(nn.Module):
    name = "base"
    needs_predictor = False
    init_rate = None  # where the predictor starts (gumbel: at its prior)
    predictor_ratio = 4  # the predictor MLP's hidden width / model width (boundary.predictor_ratio)
    pooling_grad = "paper"  # the straight-through estimator's sign in the pooling (gumbel's boundaries only carry one)

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = loss_weight

    def boundaries(self, logits, tokens, token_mask=None) -> torch.Tensor:
        raise NotImplementedError

    def static_segments(self, length: int) -> int | None:
        """Segments per full-length row when the rule fixes them in advance (no host sync needed
        to size the pooled sequence); None when they depend on the data."""
        return None

    def aux_loss(self, logits, hard, targets=None, token_mask=None) -> torch.Tensor | None:
        """Unweighted auxiliary loss; None when the method has none."""
        return None


def every_kth(length: int, k: int, device=None, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """[length] bool: True at every k-th token (indices k-1, 2k-1, ...), where fixed k closes a
    segment. The one definition of fixed k's grid: Fixed, the stride start, row breaks and the
    on-stride metric all read it. offset ([B, 1] ints, or one int): the grid shifted left by it
    (True where (t + 1 + offset) % k == 0) -> [B, length] for a [B, 1] offset."""
    return (torch.arange(length, device=device) + 1 + offset) % k == 0


class Fixed(BoundaryMethod):
    """Every k-th token closes a segment (k = 2, 3, 4 are the paper's baselines).

    random_offset (boundary.random_offset, ours: an ablation, not the paper's): in training each row's
    grid is shifted by an offset drawn uniformly from 0..k-1 at every forward (torch's generator), so
    its boundaries fall elsewhere each step as patch dropout's kept subset does, while its segments stay
    k tokens long but the first and the last (64 patches at k=4: 16 segments on the grid, 17 at any
    other offset). Evaluation uses the grid (offset 0)."""
    name = "fixed"

    def __init__(self, k: int, random_offset: bool = False, **kw):
        super().__init__(**kw)
        if k < 1:
            raise InputError(f"boundary.k={k}: expected >= 1")
        self.k, self.random_offset = k, random_offset

    def boundaries(self, logits, tokens, token_mask=None):
        """-> [B, T] hard boundaries (float 0/1): the grid, or in training with random_offset each row's
        grid shifted by its own offset (a boundary at t where (t + 1 + offset) % k == 0)."""
        B, T = tokens.shape[:2]
        if self.shifted:
            offset = torch.randint(self.k, (B, 1), device=tokens.device)
            return every_kth(T, self.k, tokens.device, offset).float()
        b = every_kth(T, self.k, tokens.device).float()
        return b.expand(B, T).contiguous()

    @property
    def shifted(self) -> bool:
        """Whether this forward draws offsets (random_offset, in training)."""
        return self.random_offset and self.training and self.k > 1

    def static_segments(self, length: int) -> int | None:
        return None if self.shifted else -(-length // self.k)


class Whitespace(BoundaryMethod):
    """A space closes its word's segment ('the ', 'cat '); over BPE tokens (word_ends: [vocab] bool,
    the tokens that end a word), a word's last token closes it ('the</w>', 'ca' 'ts</w>')."""
    name = "whitespace"

    def __init__(self, space_id: int | None = None, word_ends: torch.Tensor | None = None, **kw):
        super().__init__(**kw)
        self.space_id = space_id
        self.register_buffer("word_ends", word_ends, persistent=False)

    def boundaries(self, logits, tokens, token_mask=None):
        if self.word_ends is not None:
            return self.word_ends[tokens].float()
        return (tokens == self.space_id).float()


class Gumbel(BoundaryMethod):
    """Relaxed Bernoulli (temperature 0.5), hard = soft > 0.5, straight-through; a Binomial prior
    on the number of HARD boundaries sets the rate.

    At evaluation: eval_rule=threshold (the paper's rule, no noise; causal, so the LM's default)
    keeps p > 0.5. It matches training only once the predictor is confident: a
    predictor sitting at p ~= prior everywhere samples the prior's rate in training but
    thresholds to ONE segment at eval. Two remedies, both measured in bench-clip:
    confidence > 0 adds confidence * mean binary entropy of p to the loss (pushes p to 0/1 while
    the prior holds the count), and eval_rule=expected_count keeps, per sequence, the
    round(sum p) most likely boundaries (non-causal: it looks at the whole sequence).
    eval_rule=sample draws hard boundaries as training does, from a fixed seed (repeatable).
    """
    name = "gumbel"
    needs_predictor = True
    # config also takes auto: threshold if causal, else expected_count
    EVAL_RULES = ("threshold", "expected_count", "sample")

    def __init__(self, prior: float, temperature: float = 0.5, confidence: float = 0.0,
                 eval_rule: str = "threshold", pooling_grad: str = "paper", **kw):
        super().__init__(**kw)
        if pooling_grad not in POOLING_GRAD_SIGN:
            raise InputError(f"boundary.pooling_grad={pooling_grad!r}: expected one of {', '.join(POOLING_GRAD_SIGN)}")
        self.pooling_grad = pooling_grad
        if not 0.0 < prior < 1.0:
            raise InputError(f"boundary.prior={prior}: expected a rate in (0, 1)")
        if eval_rule not in self.EVAL_RULES:
            raise InputError(f"boundary.eval_rule={eval_rule!r}: expected one of {', '.join(self.EVAL_RULES)}")
        if confidence < 0:
            raise InputError(f"boundary.confidence={confidence}: expected >= 0")
        self.prior, self.temperature = prior, temperature
        self.confidence, self.eval_rule = confidence, eval_rule
        self.init_rate = prior

    def boundaries(self, logits, tokens, token_mask=None):
        # fp32 whatever the logits' dtype (the seed's fp16 NaNs came from this sample); in fp16 the eps clamp
        # of the uniform draw (1e-3) cuts the noise off at |6.9|: a logit beyond that would never flip
        logits = logits.float()
        if not self.training:
            if self.eval_rule == "expected_count":
                return expected_count_boundaries(logits, token_mask)
            if self.eval_rule == "sample":  # the training distribution, with noise fixed per call
                g = torch.Generator(device=logits.device).manual_seed(0)
                return torch.bernoulli(logits.sigmoid(), generator=g)
            return (logits > 0).float()
        # The relaxed Bernoulli sample (logistic noise / temperature), written out: the distribution
        # object wants the temperature as a device tensor, a host-to-device copy every step.
        eps = torch.finfo(logits.dtype).eps
        u = torch.rand_like(logits).clamp(eps, 1 - eps)
        soft = torch.sigmoid((logits + u.log() - (-u).log1p()) / self.temperature)
        hard = (soft > 0.5).float()
        return hard - soft.detach() + soft

    def aux_loss(self, logits, hard, targets=None, token_mask=None):
        """-log Binomial(n, prior).prob(hard count) / n per row (n: the row's valid tokens), averaged
        over the rows that have tokens (an empty caption has no count to hold; none: 0), plus the
        confidence term. No host sync."""
        hard = hard.float()
        if token_mask is None:
            n = torch.full((hard.shape[0],), hard.shape[1], device=hard.device, dtype=torch.float32)
            count = hard.sum(1)
        else:
            m = token_mask.float()
            n, count = m.sum(1), (hard * m).sum(1)
        prior = torch.distributions.Binomial(total_count=n, probs=torch.full_like(n, self.prior),
                                             validate_args=False)
        nonempty = (n > 0).float()
        per_row = -prior.log_prob(count) / n.clamp_min(1)  # clamped: 0 / 0 would be NaN, and NaN * 0 too
        loss = (per_row * nonempty).sum() / nonempty.sum().clamp_min(1)
        if self.confidence > 0:
            logits = logits.float()
            p = logits.sigmoid()
            entropy = F.binary_cross_entropy_with_logits(logits, p, reduction="none")  # H(p), stable
            if token_mask is not None:
                entropy = (entropy * token_mask).sum() / token_mask.sum().clamp_min(1)
            loss = loss + self.confidence * entropy.mean()
        return loss


def expected_count_boundaries(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the k = round(sum of p over valid tokens) highest-probability tokens; ties go to
    the earlier token. Deterministic, and its rate is the rate training samples."""
    p = logits.sigmoid()
    if token_mask is not None:
        p = p * token_mask
        logits = logits.masked_fill(~token_mask.bool(), float("-inf"))
    k = p.sum(1).round().long()
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(logits.shape[1], device=logits.device)
                                            .expand_as(order).contiguous())
    return (rank < k[:, None]).float()


class SupervisedBoundaries(BoundaryMethod):
    """The predictor learns targets with BCE on logits; it pools with its own thresholded output."""
    needs_predictor = True

    def boundaries(self, logits, tokens, token_mask=None):
        return (logits.detach() > 0).float()

    def aux_loss(self, logits, hard, targets=None, token_mask=None):
        if targets is None:
            raise InputError(f"boundary={self.name} needs targets for its loss")
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
        if token_mask is not None:
            return (loss * token_mask).sum() / token_mask.sum().clamp_min(1)
        return loss.mean()


class EntropySpike(SupervisedBoundaries):
    """Targets: b_t = 1 iff the model's next-token entropy H_t exceeds each of H_{t-1} .. H_{t-k},
    taken from the same forward pass with no gradient through them."""
    name = "entropy_spike"

    def __init__(self, window: int = 2, **kw):
        super().__init__(**kw)
        self.window = window

    def targets(self, next_token_logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return entropy_spikes(next_token_logits.float(), self.window)


def spikes(signal: torch.Tensor, window: int) -> torch.Tensor:
    """[B, T] bool: signal_t exceeds each of signal_{t-1} .. signal_{t-window} that exists;
    t = 0 has no history and is never a spike."""
    spike = torch.zeros_like(signal, dtype=torch.bool)
    spike[:, 1:] = True
    for j in range(1, window + 1):
        prev = F.pad(signal, (j, 0), value=-math.inf)[:, :signal.shape[1]]  # signal_{t-j}; -inf before the start
        spike &= signal > prev
    return spike


def entropy_spikes(next_token_logits: torch.Tensor, window: int) -> torch.Tensor:
    logp = next_token_logits.log_softmax(-1)
    H = -(logp.exp() * logp).sum(-1)                    # [B, T] in nats
    return spikes(H, window).float()


class Unigram(SupervisedBoundaries):
    """Targets: ends of sentencepiece Unigram pieces, precomputed by the data pipeline."""
    name = "unigram"

    def __init__(self, vocab_size: int, **kw):
        super().__init__(**kw)
        self.vocab_size = vocab_size


def build_boundary_method(cfg, space_id: int | None = None, causal: bool = False,
                          word_ends: torch.Tensor | None = None, task: str = "clip") -> BoundaryMethod | None:
    """None for boundary=none (no pooling at all). causal: the sequence model is autoregressive
    (the LM), so no rule may look ahead. word_ends: a BPE vocabulary's word-final tokens ([vocab] bool),
    whitespace's rule over BPE tokens (space_id: over characters). task: clip or lm (predictor_ratio=auto)."""
    method = _build(cfg, space_id, causal, word_ends)
    if method is not None and method.needs_predictor:
        method.predictor_ratio = predictor_ratio(cfg.get("predictor_ratio", 4), task)
    return method


def predictor_ratio(ratio, task: str) -> int:
    """boundary.predictor_ratio as a number. auto: the paper's d -> 4d -> 1 for the char LM (task=lm, the
    paper's model), d -> d -> 1 for CLIP towers (a quarter of the predictor's FLOPs, quality within noise
    or mixed: docs/guide/configure.md)."""
    check_predictor_ratio(ratio, auto=True)  # the schema's rule: configs pass it there, direct callers here
    if ratio == "auto":
        return 4 if task == "lm" else 1
    return ratio


def _build(cfg, space_id: int | None, causal: bool, word_ends: torch.Tensor | None) -> BoundaryMethod | None:
    name = cfg.name
    weight = cfg.get("loss_weight", 1.0)
    if name == "none":
        return None
    if name == "fixed":
        return Fixed(cfg.k, random_offset=cfg.get("random_offset", False), loss_weight=weight)
    if name == "whitespace":
        if word_ends is not None:
            return Whitespace(word_ends=word_ends, loss_weight=weight)
        if space_id is None:
            raise InputError("boundary=whitespace needs a tokenizer with a space token (a character-level tower)")
        return Whitespace(space_id, loss_weight=weight)
    if name == "gumbel":
        rule = cfg.get("eval_rule", "auto")
        if rule == "auto":  # measured in bench-clip: threshold collapsed CIFAR images to one segment
            rule = "threshold" if causal else "expected_count"
        if causal and rule == "expected_count":
            raise InputError(f"boundary.eval_rule={rule} looks at the whole sequence; an autoregressive "
                             "model (task=lm) needs eval_rule=threshold or sample")
        return Gumbel(cfg.prior, cfg.temperature, cfg.get("confidence", 0.0), rule,
                      cfg.get("pooling_grad", "paper"), loss_weight=weight)
    if name == "entropy_spike":
        return EntropySpike(cfg.window, loss_weight=weight)
    if name == "unigram":
        return Unigram(cfg.vocab_size, loss_weight=weight)
    if name == "tome":
        raise InputError("boundary=tome merges image tokens inside a ViT; it is not a boundary method for "
                         "character sequences (task=lm)")
    raise InputError(f"boundary={name!r}: expected one of {', '.join(METHODS)}")
