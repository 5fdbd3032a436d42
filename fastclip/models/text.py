"""Text towers: open_clip's BPE TextTransformer for vanilla runs, and a tokenizer-free
(character-level) DTP tower: causal pre-layers -> boundary predictor -> segment means ->
bidirectional shortened layers over valid segments -> mean -> projection."""
import codecs

import numpy as np
import torch
from open_clip.transformer import ResidualAttentionBlock, text_global_pool
from torch import nn

from fastclip.data.unigram import piece_end_bytes
from fastclip.errors import InputError
from fastclip.schema.fields import choice
from fastclip.schema.model import TEXT_LAYOUTS
from fastclip.models.boundaries import EntropySpike, Unigram
from fastclip.models.charlm import causal_mask
from fastclip.models.dtp import (BoundaryPredictor, check_finite, downsample, finite_flag, mean_of_valid,
                                 padding_attn_mask, segment_counts)
from fastclip.models.outputs import TowerOutput
from fastclip.models.packed import PackedRows, packed_block


class CharTokenizer:
    """Bytes of the lower-cased text, +1 so that 0 is padding; truncated/padded to context_length.
    Callable like open_clip's tokenizers: list[str] (or str) -> LongTensor [N, context_length]."""
    vocab_size = 257
    pad_id = 0
    space_id = ord(" ") + 1

    def __init__(self, context_length: int):
        self.context_length = context_length

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = np.frombuffer(" ".join(text.lower().split()).encode("utf-8"), dtype=np.uint8)[:self.context_length]
            out[row, :len(ids)] = torch.from_numpy(ids.astype(np.int64) + 1)
        return out

    def to_bytes(self, ids) -> bytes:
        """The caption's bytes (padding dropped): token t is byte t."""
        return bytes(int(i) - 1 for i in ids if int(i) != self.pad_id)

    def decode(self, ids) -> str:
        return self.to_bytes(ids).decode("utf-8", errors="replace")

    def decode_prefix(self, ids) -> str:
        """The text of the longest whole-character prefix of the bytes: a caption cut mid-character
        by context_length loses that character's leading bytes, and nothing before them moves."""
        return codecs.getincrementaldecoder("utf-8")().decode(self.to_bytes(ids))


def longest_caption(tokens: torch.Tensor, pad_id: int = 0) -> int:
    """The columns [B, L] token rows need: up to the last non-padding token of any row, at least 1. A CPU
    batch is read through numpy (no device read); a CUDA one costs one host sync."""
    if tokens.is_cpu:
        used = np.flatnonzero((tokens.numpy() != pad_id).any(0))
        return int(used[-1]) + 1 if used.size else 1
    return longest_caption_read(tokens, pad_id)


def longest_caption_read(tokens: torch.Tensor, pad_id: int = 0) -> int:
    """longest_caption computed on the tokens' device, read back in one transfer (CUDA's path)."""
    used = (tokens != pad_id).any(0)
    return max(int((used * torch.arange(1, used.numel() + 1, device=used.device)).max()), 1)


class VanillaTextTower(nn.Module):
    """open_clip's BPE TextTransformer, run at each batch's longest caption instead of its
    context_length: under the causal mask the padding after a caption's EOT changes nothing before
    it, so trimming it is exact (up to float summation order) and the FLOPs fall with the captions'
    lengths (efficiency/text_gflops, efficiency/train_gflops)."""
    full_tokens = False  # nothing to turn off (trimming the padding changes no result)

    def __init__(self, text):
        super().__init__()
        self.text = text
        # the trimmed forward below handles open_clip's default text tower; others run as open_clip runs them
        # pooled from a position the padding after it cannot move (argmax/eos: EOT; first), no token output
        self.trims = getattr(text, "cls_emb", None) is None and not getattr(text, "use_pad_mask", False) \
            and getattr(text, "attn_mask", None) is not None and not getattr(text, "output_tokens", False) \
            and getattr(text, "pool_type", None) in ("argmax", "eos", "first")
        self.pad_id = getattr(text, "pad_id", 0)

    def forward(self, tokens) -> TowerOutput:
        n = (tokens != 0).sum(1).float()
        if not self.trims:
            return TowerOutput(self.text(tokens), tokens=n, segments=n)
        return TowerOutput(self.encode(tokens[:, :longest_caption(tokens, self.pad_id)]), tokens=n, segments=n)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """TextTransformer.forward on [B, L <= context_length] tokens. Written here because open_clip
        slices its causal mask to a shorter input only when it also builds a padding mask."""
        t = self.text
        L = tokens.shape[1]
        x = t.token_embedding(tokens).to(t.transformer.get_cast_dtype()) + t.positional_embedding[:L]
        x = t.ln_final(t.transformer(x, attn_mask=t.attn_mask[:L, :L]))
        pooled = text_global_pool(x, tokens, pool_type=t.pool_type, eos_token_id=getattr(t, "eos_id", None))
        if t.text_projection is None:
            return pooled
        return t.text_projection(pooled) if isinstance(t.text_projection, nn.Linear) else pooled @ t.text_projection


class DTPTextTower(nn.Module):
    def __init__(self, method, embed_dim: int, context_length: int, width: int, heads: int, layers: int,
                 pre_layers: int, mlp_ratio: float = 4.0, unigram_model=None, layout: str = "packed",
                 inference: bool = False):
        super().__init__()
        if not 0 < pre_layers < layers:
            raise InputError(f"boundary.text_pre_layers={pre_layers}: expected 1 .. {layers - 1} for a {layers}-layer text tower")
        choice("boundary.text_layout", layout, TEXT_LAYOUTS)  # the schema checks configs; this, direct callers
        self.layout = layout
        self.packed_block = packed_block  # trainer.compile swaps in a compiled copy (runtime.compile_blocks)
        self.method = method
        self.tokenizer = CharTokenizer(context_length)
        self.embed = nn.Embedding(CharTokenizer.vocab_size, width)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.pre = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(pre_layers))
        self.short = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers - pre_layers))
        self.heads = heads
        self.predictor = BoundaryPredictor(width, init_rate=method.init_rate, hidden_ratio=method.predictor_ratio) if method.needs_predictor else None
        # entropy_spike: next-char entropies come from an auxiliary LM head on the causal pre-layers
        self.next_char = nn.Linear(width, CharTokenizer.vocab_size) if isinstance(method, EntropySpike) else None
        self.unigram_model = unigram_model
        if isinstance(method, Unigram) and unigram_model is None and not inference:  # its targets train the predictor
            raise InputError("boundary=unigram on the text tower needs a unigram model of the training captions")
        self.ln_final = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)

    def unigram_targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] float: 1 on the last byte of every unigram piece of each caption (tokens are bytes;
        computed on the fly, no gradient). The bytes of a character cut by context_length get none."""
        texts = [self.tokenizer.decode_prefix(ids) for ids in tokens.tolist()]
        out = torch.zeros(tokens.shape, dtype=torch.float32)
        for row, ends in enumerate(piece_end_bytes(self.unigram_model, texts)):
            out[row, torch.from_numpy(ends)] = 1.0
        return out.to(tokens.device)

    full_tokens = False  # trainer.full_token_steps' phase (FastCLIP.set_full_tokens)

    def forward(self, tokens) -> TowerOutput:
        """tokens [B, L] bytes (+1, 0 padding) -> TowerOutput with boundaries, boundary_logits and
        token_mask over the batch's first L' bytes (L' its longest caption: the padding after it changes
        nothing before it under the causal pre-layers, and no segment holds it, so trimming it is exact);
        boundary_targets from the next-char head (entropy_spike, which also gives auxiliary_loss, its mean
        next-byte NLL in nats) or the unigram model."""
        context = tokens.shape[1]
        tokens = tokens[:, :longest_caption(tokens, CharTokenizer.pad_id)]
        token_mask = tokens != CharTokenizer.pad_id
        B, L = tokens.shape
        x = self.embed(tokens) + self.pos[:L]
        cmask = causal_mask(L, tokens.device).to(x.dtype)
        for block in self.pre:
            x = block(x, attn_mask=cmask)
        logits = self.predictor(x) if self.predictor is not None else None
        b = self.method.boundaries(logits, tokens, token_mask) * token_mask
        if self.full_tokens:  # trainer.full_token_steps' phase: every byte its own segment
            b = token_mask.to(b.dtype)
        counts = segment_counts(b, token_mask)
        # the one host sync: the pooled sizes, and whether the predictor has diverged (before they size anything)
        longest, total, finite = torch.stack([counts.max(), counts.sum(), finite_flag(logits, counts)]).tolist()
        check_finite(finite, "DTP text tower")
        pooled, seg_mask = downsample(x, b, token_mask=token_mask, n_segments=longest, grad=self.method.pooling_grad)
        if self.layout == "packed":  # the shortened blocks on every caption's segments end to end
            rows = PackedRows.from_lengths(counts, longest, total)
            h = rows.pack(pooled)
            for block in self.short:
                h = self.packed_block(block, h, rows)
            pooled = rows.unpack(self.ln_final(h))
        else:
            mask = padding_attn_mask(seg_mask, self.heads).to(pooled.dtype)
            for block in self.short:
                pooled = block(pooled, attn_mask=mask)
            pooled = self.ln_final(pooled)
        emb = mean_of_valid(pooled, seg_mask)
        targets = auxiliary_loss = None
        if self.next_char is not None and self.training:  # a training objective: evaluation pools without it
            next_logits = self.next_char(x)  # a caption's last byte predicts the end (padding), as untrimmed
            nll = nn.functional.cross_entropy(next_logits[:, :-1].float().transpose(1, 2), tokens[:, 1:],
                                              reduction="none")
            keep = token_mask[:, 1:].float()
            auxiliary_loss = (nll * keep).sum() / keep.sum().clamp_min(1)
            targets = self.method.targets(next_logits.detach()) * token_mask
            if L == context:
                # The context's last byte has no next byte in view: no target there, as the image
                # tower's last patch gets none (spikes read only earlier entropies, so no other moves).
                targets[:, -1] = 0
        elif self.unigram_model is not None:
            targets = self.unigram_targets(tokens)
        return TowerOutput(emb @ self.proj, tokens=token_mask.sum(1).float(), segments=counts.float(),
                           boundaries=b, boundary_logits=logits, boundary_targets=targets,
                           auxiliary_loss=auxiliary_loss, token_mask=token_mask.float())
