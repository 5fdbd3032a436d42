"""DTP primitives against hand-computed examples, and the seed's failure modes 1, 2 and 6."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from fastclip.models.boundaries import (EntropySpike, Fixed, Gumbel, Unigram, Whitespace, build_boundary_method,
                                        entropy_spikes, expected_count_boundaries)
from fastclip.models.dtp import BoundaryPredictor, causal_upsample, downsample, padding_attn_mask, segment_counts


def test_downsample_segment_means_by_hand():
    # tokens 0..5 with values 1..6; b closes segments after tokens 1 and 4: [0,1] [2,3,4] [5]
    h = torch.arange(1.0, 7.0)[None, :, None]
    b = torch.tensor([[0.0, 1, 0, 0, 1, 0]])
    pooled, mask = downsample(h, b)
    assert pooled.squeeze().tolist() == [1.5, 4.0, 6.0]
    assert mask.tolist() == [[True, True, True]]


def test_rows_with_different_segment_counts_are_padded_and_masked():
    h = torch.arange(1.0, 7.0)[None, :, None].repeat(2, 1, 1)
    b = torch.tensor([[0.0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]])
    pooled, mask = downsample(h, b)
    assert pooled.shape == (2, 3, 1)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert pooled[1, 0, 0] == 3.5 and pooled[1, 1:].abs().sum() == 0
    assert segment_counts(b).tolist() == [3, 1]


def test_padded_tokens_join_no_segment():
    h = torch.tensor([[[1.0], [3.0], [100.0], [100.0]]])
    b = torch.tensor([[0.0, 0, 1, 0]])
    token_mask = torch.tensor([[True, True, False, False]])
    pooled, mask = downsample(h, b, token_mask=token_mask)
    assert pooled[0, 0, 0] == 2.0 and mask.tolist() == [[True]]
    assert segment_counts(b, token_mask).tolist() == [1]


def test_causal_upsample_reads_only_closed_segments_by_hand():
    # short = [null, seg0, seg1]; b closes seg0 at t=1 and seg1 at t=4
    short = torch.tensor([[[-1.0], [10.0], [20.0]]])
    b = torch.tensor([[0.0, 1, 0, 0, 1, 0]])
    up = causal_upsample(short, b)
    assert up.squeeze().tolist() == [-1.0, 10.0, 10.0, 10.0, 20.0, 20.0]


def test_attention_mask_blocks_padded_segments_and_never_gives_nan():
    mask = padding_attn_mask(torch.tensor([[True, True, False]]), n_heads=2)
    assert mask.shape == (2, 3, 3)
    assert torch.isinf(mask[0, 0, 2]) and mask[0, 0, 1] == 0
    assert mask[0, 2, 2] == 0  # padded query sees itself: softmax stays finite
    x = torch.randn(1, 3, 8)
    attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    out = attn(x, x, x, attn_mask=mask, need_weights=False)[0]
    assert torch.isfinite(out).all()


def test_gumbel_gradient_reaches_predictor_through_pooling():
    """Failure mode 2: casting boundaries to int before pooling cut this gradient."""
    torch.manual_seed(0)
    predictor, method = BoundaryPredictor(8), Gumbel(prior=0.3)
    method.train()
    h = torch.randn(2, 12, 8)
    b = method.boundaries(predictor(h), tokens=None)
    pooled, _ = downsample(h, b)
    upsampled = causal_upsample(torch.cat([torch.zeros(2, 1, 8), pooled], 1), b)
    (pooled.pow(2).sum() + upsampled.pow(3).sum()).backward()  # a task loss only, no prior loss
    grad = predictor.mlp[-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_pooling_grad_sign_against_actually_splitting_the_segment():
    """boundary.pooling_grad: the values are the same either way; the derivative of a loss on a
    segment's mean w.r.t. a boundary inside it has the sign of what inserting that boundary does
    to the loss with `leave`, and the opposite sign with `paper` (the reference's estimator)."""
    torch.manual_seed(0)
    h, w = torch.randn(1, 6, 4), torch.randn(4)
    closed = torch.tensor([[0.0, 0, 0, 0, 0, 1]])  # one segment of six tokens
    loss_of = lambda b, grad="paper": (downsample(h, b, n_segments=6, grad=grad)[0][0, 0] @ w)  # noqa: E731
    signs = {}
    for grad in ("paper", "leave"):
        b = closed.clone().requires_grad_(True)
        loss = loss_of(b, grad)
        loss.backward()
        assert loss.item() == pytest.approx(loss_of(closed).item())
        signs[grad] = b.grad[0, :5].sign()
    for t in range(5):  # insert a boundary after token t: segment 0 keeps tokens 0..t
        split = closed.clone()
        split[0, t] = 1.0
        actual = (loss_of(split) - loss_of(closed)).sign()
        assert signs["leave"][t] == actual and signs["paper"][t] == -actual
    with pytest.raises(ValueError, match="boundary.pooling_grad='up'"):
        Gumbel(prior=0.25, pooling_grad="up")


def test_pooling_grad_leave_flips_the_lms_upsampling_too():
    """boundary.pooling_grad applies to both places a straight-through boundary moves a token: the
    pooling (its segment id) and the char LM's upsampling (the segment it reads). The task loss reaches
    the predictor only through those two, each linear in the sign, so with the same weights and the
    same Gumbel noise `leave` gives the predictor exactly the negated gradient of `paper`, and the
    same loss. With the upsampling left at +1 only the pooling's part would flip."""
    from fastclip.models.charlm import HourglassLM
    torch.manual_seed(0)
    model = HourglassLM(vocab_size=11, width=16, heads=2, mlp_ratio=2.0, pre_layers=1, short_layers=1,
                        post_layers=1, max_len=24, boundary=Gumbel(prior=0.3)).train()
    tokens = torch.randint(1, 11, (3, 24))
    out = {}
    for sign in ("paper", "leave"):
        model.boundary.pooling_grad = sign
        model.zero_grad()
        torch.manual_seed(1)  # the same Gumbel noise for both
        logits = model(tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens)  # the task loss only
        loss.backward()
        out[sign] = loss.item(), [p.grad.clone() for p in model.predictor.parameters()]
    assert out["leave"][0] == out["paper"][0]
    assert out["paper"][1][-1].abs().sum() > 0
    for leave, paper in zip(out["leave"][1], out["paper"][1]):
        torch.testing.assert_close(leave, -paper)
    short, b = torch.randn(1, 3, 2), torch.tensor([[0.0, 1, 0, 1, 0]], requires_grad=True)
    for sign in ("paper", "leave"):  # the upsampling alone: a read index that rises leaves its slot
        b.grad = None
        up = causal_upsample(short, b, grad=sign)
        up.sum().backward()
        out[sign] = up.detach(), b.grad.clone()
    assert torch.equal(out["leave"][0], out["paper"][0])
    torch.testing.assert_close(out["leave"][1], -out["paper"][1])


def test_gumbel_prior_loss_is_on_hard_boundaries():
    """Failure mode 1: the prior on SOFT boundaries pinned the achieved rate near 0.17."""
    method = Gumbel(prior=0.25)
    method.train()
    logits = torch.randn(3, 40, requires_grad=True)
    hard = method.boundaries(logits, tokens=None)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    loss = method.aux_loss(logits, hard)
    counts = hard.detach().sum(1)
    expected = -torch.distributions.Binomial(40, probs=torch.tensor(0.25)).log_prob(counts) / 40
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0  # straight-through: the prior still trains the predictor


def test_gumbel_is_deterministic_at_eval_and_finite_in_fp16():
    """Failure mode 6: fp16 NaNs in the relaxed Bernoulli. The sample runs in fp32 whatever the
    logits' dtype: in fp16 the uniform draw is clamped at fp16's eps (1e-3), which cuts the
    logistic noise off at |6.9|, so a logit beyond that would never (or always) close a segment."""
    method = Gumbel(prior=0.2)
    logits = torch.tensor([[-70000.0, -3.0, 0.5, 3.0, 65000.0]]).half()
    method.eval()
    assert method.boundaries(logits, None).tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]]
    method.train()
    for _ in range(20):
        b = method.boundaries(logits, None)
        assert torch.isfinite(b).all()
        assert b[0, 0] == 0 and b[0, -1] == 1
    torch.manual_seed(0)
    for logit in (-8.0, 8.0):  # Bernoulli(sigmoid(logit)): 1e6 draws, ~335 of the rare outcome (sd 18)
        rate = method.boundaries(torch.full((1, 1_000_000), logit).half(), None).mean().item()
        want = torch.sigmoid(torch.tensor(logit)).item()
        assert abs(rate - want) <= 0.2 * min(want, 1 - want), (logit, rate, want)


def test_expected_count_keeps_the_most_likely_boundaries_at_the_sampled_rate():
    logits = torch.tensor([[-1.0, 0.2, -0.5, -0.1, -2.0, -1.2],    # p sum = 2.22 -> 2 boundaries
                           [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0]])  # p = .27 each: 1.6 -> 2, ties to the earliest
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    b = expected_count_boundaries(logits, mask)
    assert b.tolist() == [[0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    mask[1, 3:] = False  # padding: neither counted nor chosen (0.81 -> 1)
    assert expected_count_boundaries(logits, mask)[1].tolist() == [1, 0, 0, 0, 0, 0]


def test_gumbel_eval_rules_and_causality():
    cfg = OmegaConf.create({"name": "gumbel", "prior": 0.2, "temperature": 0.5, "eval_rule": "auto"})
    assert build_boundary_method(cfg, causal=True).eval_rule == "threshold"
    assert build_boundary_method(cfg).eval_rule == "expected_count"
    cfg.eval_rule = "expected_count"
    with pytest.raises(ValueError, match="eval_rule=expected_count looks at the whole sequence"):
        build_boundary_method(cfg, causal=True)
    cfg.eval_rule = "sample"  # draws are per token: allowed for the LM, repeatable, at the model's rate
    method = build_boundary_method(cfg, causal=True).eval()
    logits = torch.full((4, 2000), -1.0986)  # p = 0.25
    first, second = method.boundaries(logits, None), method.boundaries(logits, None)
    assert torch.equal(first, second) and abs(first.mean().item() - 0.25) < 0.02
    cfg.eval_rule = "median"
    with pytest.raises(ValueError, match="boundary.eval_rule='median'"):
        build_boundary_method(cfg)


def test_confidence_term_adds_the_mean_binary_entropy():
    logits = torch.tensor([[0.0, 2.0, -2.0, 0.5]])
    hard = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    plain = Gumbel(prior=0.25).aux_loss(logits, hard)
    confident = Gumbel(prior=0.25, confidence=2.0).aux_loss(logits, hard)
    p = logits.sigmoid()
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    assert (confident - plain).item() == pytest.approx(2.0 * entropy.item(), rel=1e-5)


def test_fixed_and_whitespace_boundaries():
    tokens = torch.tensor([[1, 2, 0, 3, 4, 0, 5, 6]])
    assert Fixed(3).boundaries(None, tokens).tolist() == [[0, 0, 1, 0, 0, 1, 0, 0]]
    assert Whitespace(space_id=0).boundaries(None, tokens).tolist() == [[0, 0, 1, 0, 0, 1, 0, 0]]


def test_entropy_spike_targets_by_hand():
    # entropies 0.1, 0.5, 0.3, 0.9, 0.2 (via two-way logits): spikes where H_t > H_{t-1} and H_{t-2}
    def logits_for(h):  # binary distribution with entropy h nats
        p = torch.tensor(0.5)
        lo, hi = 1e-6, 0.5
        for _ in range(60):
            p = (lo + hi) / 2
            ent = -(p * math.log(p) + (1 - p) * math.log(1 - p))
            lo, hi = (p, hi) if ent < h else (lo, p)
        return torch.tensor([math.log(p), math.log(1 - p)])
    logits = torch.stack([logits_for(h) for h in (0.1, 0.5, 0.3, 0.6, 0.2)])[None]
    assert entropy_spikes(logits, window=2).tolist() == [[0, 1, 0, 1, 0]]
    assert entropy_spikes(logits, window=1).tolist() == [[0, 1, 0, 1, 0]]


@pytest.mark.parametrize("method", [EntropySpike(window=2), Unigram(vocab_size=300)])
def test_supervised_boundary_losses_take_logits(method):
    """BCE on LOGITS: a sigmoid applied twice (the reference bug) would give a different value."""
    logits = torch.tensor([[4.0, -4.0, 0.3]])
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    loss = method.aux_loss(logits, None, targets)
    manual = -(torch.log(torch.sigmoid(logits)) * targets + torch.log(1 - torch.sigmoid(logits)) * (1 - targets))
    assert loss.item() == pytest.approx(manual.mean().item(), rel=1e-5)
    double = torch.nn.functional.binary_cross_entropy(torch.sigmoid(torch.sigmoid(logits)), targets)
    assert abs(loss.item() - double.item()) > 0.1
    assert method.boundaries(logits, None).tolist() == [[1.0, 0.0, 1.0]]
