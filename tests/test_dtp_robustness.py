"""DTP towers on input and weights that break the easy assumptions: captions whose characters are
several bytes (accents, emoji, a character cut by the context length), empty captions, a unigram
vocabulary too small for the alphabet, diverged (NaN) predictor weights; and the CLIP objective's
boundary terms."""
import pytest
import torch
from open_clip import ClipLoss

from conftest import TINY_CLIP, compose_cfg, count_tensor_reads
from fastclip.data import unigram
from fastclip.eval import boundary_picture
from fastclip.eval.boundary_picture import caption_with_breaks
from fastclip.models.boundaries import EntropySpike, Gumbel, Unigram, every_kth
from fastclip.models.charlm import HourglassLM
from fastclip.models.clip import boundary_loss, build_clip, clip_objective
from fastclip.models.dtp import NonFiniteBoundaries, segment_counts
from fastclip.models.text import CharTokenizer, DTPTextTower

# Lower-cased and whitespace-normalised as CharTokenizer sees them. The last one is 62 ASCII bytes
# then an emoji: a 64-byte context cuts it after its second byte.
CAPTIONS = ["un café crème", "a cat 🐱 on a mat", "", "naïve señor à la piñata",
            "a photo of a red bus parked by a long wall on a sunny dayyyyy 🐱 x"]
assert len(CAPTIONS[-1].encode()) > 64 and len(CAPTIONS[-1].encode()[:64].decode("utf-8", "ignore").encode()) == 62


def clip_with(*overrides, captions=None, cache_dir=None):
    """The byte-level text tower's CLIP (these tests are about bytes; tests/test_bpe_dtp.py: BPE's)."""
    torch.manual_seed(0)
    cfg = compose_cfg(TINY_CLIP + ["boundary.text_tokens=bytes"] + list(overrides))
    return build_clip(cfg.encoder, cfg.boundary, captions, cache_dir)


def whole_prefix(data: bytes) -> str:
    """The longest prefix of data that decodes: what is left of a caption cut mid-character."""
    for n in range(len(data), -1, -1):
        try:
            return data[:n].decode("utf-8")
        except UnicodeDecodeError:
            continue


def assert_targets_are_piece_ends(sp, targets: torch.Tensor, tokens: torch.Tensor):
    """Decoding the bytes between consecutive targets gives exactly the pieces' surfaces ('▁' as a
    space) of what the tokens hold, and nothing of a cut character gets a target."""
    tok = CharTokenizer(tokens.shape[1])
    for row, ids in enumerate(tokens.tolist()):
        data = tok.to_bytes(ids)
        text = whole_prefix(data)
        ends = targets[row].nonzero().squeeze(1).tolist()
        starts = [0] + [e + 1 for e in ends[:-1]]
        segments = [data[s:e + 1].decode("utf-8") for s, e in zip(starts, ends)]
        assert segments == [p.replace("\u2581", " ") for p in sp.encode(text, out_type=str)], (row, text)
        assert (ends[-1] + 1 if ends else 0) == len(text.encode())


# 1. unigram with a vocabulary too small for the alphabet

def test_unigram_vocab_too_small_is_named_with_the_minimum_and_leaves_no_files(tmp_path):
    # "a café", "a cat": a, space (its '▁'), c, f, é, t: 6 characters + <unk>, <s>, </s> = 9
    captions = ["A café", "a  cat"]
    with pytest.raises(ValueError, match=r"boundary.vocab_size=8 is too small for this corpus: sentencepiece needs "
                                         r"at least 9 \(6 distinct characters"):
        unigram.train_on_captions(captions, 8, tmp_path)
    assert list(tmp_path.glob("unigram/*")) == []
    sp = unigram.train_on_captions(captions, 9, tmp_path)  # the minimum is exact: 9 trains
    assert sp.encode("a café", out_type=str)
    # the LM path (one long text8-format split): a, b, c, d, space -> 8
    with pytest.raises(ValueError, match=r"boundary.vocab_size=7 is too small .* at least 8"):
        unigram.train_or_load("ab cd ab cd dc", 7, tmp_path)
    unigram.train_or_load("ab cd ab cd dc", 8, tmp_path)
    # what the check cannot see, sentencepiece's own error says, named (here: nothing to train on)
    with pytest.raises(ValueError, match=r"boundary.vocab_size=50: sentencepiece could not train .*sentences_"):
        unigram.train_on_captions(["", " "], 50, tmp_path)
    left = sorted(p.name for p in (tmp_path / "unigram").iterdir())
    assert all(not name.startswith("tmp") for name in left), left
    assert sorted(name.rsplit(".", 1)[1] for name in left) == ["model", "model", "vocab", "vocab"]


# 2. unigram targets are byte positions

def test_unigram_targets_are_the_last_bytes_of_pieces_on_non_ascii_captions(tmp_path):
    sp = unigram.train_on_captions(CAPTIONS * 3, 60, tmp_path)
    for context, cut in ((64, 4), (8, 1)):  # 8 bytes keep "a cat " and half the emoji of CAPTIONS[1]
        tower = DTPTextTower(Unigram(60), embed_dim=16, context_length=context, width=32, heads=2, layers=2,
                             pre_layers=1, unigram_model=sp)
        tokens = tower.tokenizer(CAPTIONS)
        assert len(whole_prefix(tower.tokenizer.to_bytes(tokens[cut]))) < len(tower.tokenizer.decode(tokens[cut]))
        targets = tower.unigram_targets(tokens)
        assert_targets_are_piece_ends(sp, targets, tokens)
        assert (targets[tokens == 0] == 0).all()
    # the LM path, one long text in lines: the same rule
    text = " ".join(CAPTIONS) * 40
    sp = unigram.train_or_load(text, 60, tmp_path)
    b = unigram.piece_end_boundaries(sp, text)
    data = text.encode()
    ends = b.nonzero()[0].tolist()
    assert len(b) == len(data) and ends[-1] == len(data) - 1
    pieces = [data[s:e + 1].decode("utf-8") for s, e in zip([0] + [e + 1 for e in ends[:-1]], ends)]
    assert "".join(pieces) == text
    assert pieces == [p.replace("\u2581", " ") for line in unigram._lines(text) for p in sp.encode(line, out_type=str)]


# 3. the boundary picture shows what the model did to the bytes

def test_caption_picture_marks_bytes_by_hand():
    data = "café 🐱".encode()  # c a f [c3 a9] ' ' [f0 9f 90 b1]: 10 bytes
    b = lambda *closed: [1.0 if i in closed else 0.0 for i in range(12)]  # noqa: E731 (12: with padding)
    assert caption_with_breaks(data, b(4, 5, 9)) == "café| |🐱|"
    assert caption_with_breaks(data, b(0, 9)) == "c|afé 🐱|"
    # a boundary inside a character: its bytes, the '|' between them
    assert caption_with_breaks(data, b(3, 7)) == "caf\\xc3|\\xa9 \\xf0\\x9f|\\x90\\xb1"
    # cut by the context length after the emoji's second byte
    assert caption_with_breaks(data[:8], b(1, 7)) == "ca|fé \\xf0\\x9f|"


def test_boundary_picture_labels_come_from_the_tower_bytes(tmp_path, monkeypatch):
    """draw: a DTP text tower's label is its bytes' segmentation (fixed k=3 here, by hand); a BPE
    tower has no boundaries and keeps the decoded text."""
    from fastclip.models.clip import decode_tokens  # what ClipTask.evaluate passes draw
    labels = []
    real_text = boundary_picture.plt.Axes.text
    monkeypatch.setattr(boundary_picture.plt.Axes, "text",
                        lambda self, x, y, s, **kw: labels.append(s.replace("\n", "")) or real_text(self, x, y, s, **kw))
    images = torch.randn(3, 3, 32, 32)
    model, tokenizer = clip_with("boundary=fixed", "boundary.k=3", "boundary.apply_to=[text]")
    captions = ["café €", "ça va €€", CAPTIONS[-1]]
    boundary_picture.draw(model, images, tokenizer(captions), tokenizer.decode, tmp_path / "a.png")
    # bytes: c a f| c3 a9 20| e2 82 ac| and c3 a7 61| 20 76 61| 20 e2 82| ac e2 82| ac
    assert labels[:2] == ["caf|é |€|", "ça| va| \\xe2\\x82|\\xac\\xe2\\x82|\\xac"]
    # 62 ASCII bytes, then the first two of the emoji's four (byte 62 closes: f0|)
    ascii_part = "".join(ch + "|" * ((i + 1) % 3 == 0) for i, ch in enumerate(CAPTIONS[-1][:62]))
    assert labels[2] == ascii_part + "\\xf0|\\x9f"
    labels.clear()
    model, tokenizer = clip_with("boundary=none")
    tokens = tokenizer(captions)
    boundary_picture.draw(model, images, tokens, lambda t: decode_tokens(tokenizer, t), tmp_path / "b.png")
    assert labels == [decode_tokens(tokenizer, t).replace("\n", "") for t in tokens]


# 4. every text boundary method keeps its books in bytes

@pytest.mark.parametrize("method", ["fixed", "whitespace", "gumbel", "entropy_spike", "unigram"])
def test_every_text_boundary_method_counts_bytes(method, tmp_path):
    own = {"fixed": ["boundary.k=3"], "unigram": ["boundary.vocab_size=60"]}.get(method, [])
    model, tokenizer = clip_with(f"boundary={method}", "boundary.apply_to=[text]", *own,
                                 captions=CAPTIONS * 3, cache_dir=tmp_path)
    tower = model.text
    tokens = tokenizer(CAPTIONS)
    valid = tokens != CharTokenizer.pad_id
    n_bytes = [min(len(c.encode()), tokens.shape[1]) for c in CAPTIONS]
    for mode in ("train", "eval"):
        tower.train(mode == "train")
        with torch.no_grad():
            out = tower(tokens)
        b = out.boundaries
        assert set(b.unique().tolist()) <= {0.0, 1.0}
        assert (b[~valid] == 0).all(), "a boundary on padding"
        assert out.tokens.tolist() == n_bytes
        assert torch.equal(out.segments, segment_counts(b, valid).float())
        if method == "whitespace":
            assert torch.equal(b.bool(), tokens == ord(" ") + 1)
        if method == "fixed":
            assert torch.equal(b.bool(), every_kth(tokens.shape[1], 3)[None] & valid)
        if out.boundary_targets is not None:
            assert (out.boundary_targets[~valid] == 0).all(), "a target on padding"
        if method == "unigram":
            assert_targets_are_piece_ends(tower.unigram_model, out.boundary_targets, tokens)
    assert max(n_bytes) == tokens.shape[1] and 0 in n_bytes  # a cut caption and an empty one were in


# 5. a diverged predictor raises NonFiniteBoundaries from the tower's one host sync

def nan_predictor(predictor):
    with torch.no_grad():
        predictor.mlp[-1].weight.fill_(float("nan"))


@pytest.mark.parametrize("tower,layout", [("image", "packed"), ("image", "padded"), ("text", "packed")])
def test_nan_predictor_weights_raise_naming_the_tower(tower, layout, monkeypatch):
    model, tokenizer = clip_with("boundary=gumbel", f"boundary.apply_to=[{tower}]", f"boundary.{tower}_layout={layout}")
    module = model.visual if tower == "image" else model.text
    inputs = torch.randn(4, 3, 32, 32) if tower == "image" else tokenizer(["a cat", "", "two red buses", "dögs"])
    nan_predictor(module.predictor)
    for mode in ("train", "eval"):  # a sampled NaN boundary, or expected_count of NaN probabilities
        module.train(mode == "train")
        reads = count_tensor_reads(monkeypatch)
        with pytest.raises(NonFiniteBoundaries, match=f"DTP {tower} tower: the boundary predictor's logits are not finite"):
            module(inputs)
        assert sum(reads.values()) == 1, reads  # the sizes' own sync, no other
        monkeypatch.undo()


def test_nan_predictor_weights_raise_in_the_char_lm(monkeypatch):
    torch.manual_seed(0)
    model = HourglassLM(27, 32, 2, 4.0, 1, 2, 1, max_len=64, boundary=Gumbel(prior=0.2))
    x = torch.randint(0, 27, (2, 64))
    reads = count_tensor_reads(monkeypatch)
    out = model(x)
    n_reads = sum(reads.values())
    monkeypatch.undo()
    assert n_reads == 1 and torch.isfinite(out.logits).all()
    nan_predictor(model.predictor)
    reads = count_tensor_reads(monkeypatch)
    with pytest.raises(NonFiniteBoundaries, match="DTP char LM: the boundary predictor's logits are not finite"):
        model(x)
    assert sum(reads.values()) == 1, reads
    assert issubclass(NonFiniteBoundaries, FloatingPointError)


# 6. empty rows add nothing to the boundary losses

def test_gumbel_prior_skips_empty_rows():
    method = Gumbel(prior=0.25)
    logits = torch.randn(3, 6, requires_grad=True)
    hard = torch.tensor([[0.0, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    # by hand: row 0 has 1 boundary in 4 valid tokens, row 1 4 in 6; the empty row 2 is left out
    by_hand = -(torch.distributions.Binomial(4, torch.tensor(0.25)).log_prob(torch.tensor(1.0)) / 4
                + torch.distributions.Binomial(6, torch.tensor(0.25)).log_prob(torch.tensor(4.0)) / 6) / 2
    loss = method.aux_loss(logits, hard, token_mask=mask)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert method.aux_loss(logits[:2], hard[:2], token_mask=mask[:2]).item() == pytest.approx(loss.item())
    straight_through = hard + logits - logits.detach()  # a gradient path as gumbel's boundaries carry
    method.aux_loss(logits, straight_through, token_mask=mask).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[2].abs().sum() == 0
    assert method.aux_loss(logits, hard, token_mask=torch.zeros_like(mask)).item() == 0.0  # all empty


@pytest.mark.parametrize("method", [Gumbel(prior=0.25, confidence=1.0), EntropySpike(window=2), Unigram(vocab_size=60)])
def test_confidence_and_bce_terms_skip_empty_rows(method):
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.3, 0.3, -0.2, 1.0]])
    hard = targets = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    full = method.aux_loss(logits, hard, targets, mask)
    assert torch.isfinite(full)
    assert full.item() == pytest.approx(method.aux_loss(logits[:1], hard[:1], targets[:1], mask[:1]).item())


def test_empty_caption_adds_nothing_to_the_text_towers_boundary_loss():
    model, tokenizer = clip_with("boundary=gumbel", "boundary.apply_to=[text]", "boundary.confidence=0.5")
    tower = model.text.train()
    tokens = tokenizer(["a cat", "two red buses by a wall", ""])  # the empty one last: the others' noise is the same
    losses = []
    for batch in (tokens, tokens[:2]):
        torch.manual_seed(0)
        losses.append(boundary_loss(model.text_method, tower(batch)))
    assert torch.isfinite(losses[0])
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    losses[0].backward()
    assert all(torch.isfinite(p.grad).all() for p in tower.predictor.parameters())


# 7c. the CLIP objective carries each DTP tower's weighted boundary loss

def test_clip_objective_adds_each_towers_weighted_boundary_loss():
    """total = contrastive + w (image + text boundary loss), and the prior's gradient reaches each
    predictor's output bias through it (w = 0: it does not)."""
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for w in (2.0, 0.0):
        model, tokenizer = clip_with("boundary=gumbel", f"boundary.loss_weight={w}")
        model.train()
        out = model(images, tokenizer(["a cat", "two red buses", "a dog", "ein hündchen"]))
        loss, parts = clip_objective(model, ClipLoss(), out)
        assert set(parts) == {"contrastive_loss", "boundary_loss_image", "boundary_loss_text"}
        expected = parts["contrastive_loss"] + w * (parts["boundary_loss_image"] + parts["boundary_loss_text"])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
        biases = [model.visual.predictor.mlp[-1].bias, model.text.predictor.mlp[-1].bias]
        grads = torch.autograd.grad(loss - parts["contrastive_loss"], biases, allow_unused=True)
        for name, grad in zip(("image", "text"), grads):
            reached = grad is not None and grad.abs().sum() > 0
            assert reached == (w > 0), (name, w, grad)
