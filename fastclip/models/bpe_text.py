"""The DTP text tower over open_clip's BPE tokens (boundary.text_tokens=bpe): open_clip's text tower cut
in two. Its token embedding and its first boundary.text_pre_layers causal blocks run on every BPE token
(each batch trimmed to its longest caption, as VanillaTextTower runs, and with text_layout=packed
every caption's tokens end to end, so the FLOPs follow each caption's own length); the boundary
predictor closes segments there; the remaining blocks run on the segment means, causally (a segment attends to itself
and the segments before it); the embedding is the segment that holds the EOT token (the row's highest
id, as open_clip's argmax pooling reads it) after ln_final and the projection.

Causality: a segment's mean holds its own tokens only, and the shortened blocks' mask lets it read
only the segments that closed before it, so a segment's output depends on the tokens up to its own
end and on none after it (the test perturbs later tokens). The EOT segment, the last one, reads the
whole caption, as open_clip's EOT token does."""
import numpy as np
import torch
from torch import nn

from fastclip.errors import InputError
from fastclip.schema.fields import choice
from fastclip.schema.model import TEXT_LAYOUTS
from fastclip.models.boundaries import EntropySpike
from fastclip.models.dtp import (BoundaryPredictor, check_finite, downsample, finite_flag, padding_attn_mask,
                                 segment_counts, segment_ids)
from fastclip.models.outputs import TowerOutput
from fastclip.models.packed import PackedRows, packed_block
PAD_ID = 0  # open_clip's SimpleTokenizer pads with 0


def caption_sizes(tokens: torch.Tensor) -> tuple[int, int]:
    """(the columns [B, L] BPE rows need: up to the longest caption's last token, at least 1; their tokens
    in all). Captions are prefixes of their rows (SOT .. EOT, then padding). A CPU batch is read through
    numpy (no device read); a CUDA one costs one host sync."""
    lengths = (tokens != PAD_ID).sum(1)
    if tokens.is_cpu:
        longest, total = int(np.max(lengths.numpy(), initial=0)), int(np.sum(lengths.numpy()))
    else:
        longest, total = torch.stack([lengths.max(), lengths.sum()]).tolist()
    return max(longest, 1), total


def word_end_ids(tokenizer) -> torch.Tensor:
    """[vocab] bool: the BPE tokens that end a word (open_clip's SimpleTokenizer writes '</w>' at the end
    of a word's last token; the start and end of text tokens end none)."""
    ends = torch.zeros(len(tokenizer.encoder), dtype=torch.bool)
    ends[[i for token, i in tokenizer.encoder.items() if token.endswith("</w>")]] = True
    return ends


class BPEDTPTextTower(nn.Module):
    def __init__(self, text: nn.Module, method, pre_layers: int, tokenizer, layout: str = "packed"):
        """text: open_clip's TextTransformer (its modules are taken over; the geometry is its text_cfg's);
        tokenizer: the open_clip SimpleTokenizer the tower reads (the boundary picture decodes with it)."""
        super().__init__()
        blocks = text.transformer.resblocks
        if not 0 < pre_layers < len(blocks):
            raise InputError(f"boundary.text_pre_layers={pre_layers}: expected 1 .. {len(blocks) - 1} for a "
                             f"{len(blocks)}-layer text tower")
        choice("boundary.text_layout", layout, TEXT_LAYOUTS)  # the schema checks configs; this, direct callers
        if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False) \
                or text.attn_mask is None or text.pool_type != "argmax":
            raise InputError("boundary.text_tokens=bpe cuts open_clip's default text tower (causal mask, no class "
                             "token, argmax pooling); this encoder's text_cfg differs: use boundary.text_tokens=bytes")
        self.method, self.layout, self.tokenizer = method, layout, tokenizer
        self.packed_block = packed_block  # trainer.compile swaps in a compiled copy (runtime.compile_blocks)
        self.token_embedding, self.positional_embedding = text.token_embedding, text.positional_embedding
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        self.pre = nn.ModuleList(blocks[:pre_layers])
        self.short = nn.ModuleList(blocks[pre_layers:])
        self.ln_final, self.text_projection = text.ln_final, text.text_projection
        self.heads = blocks[0].attn.num_heads
        width = text.width
        self.predictor = BoundaryPredictor(width, init_rate=method.init_rate, hidden_ratio=method.predictor_ratio) \
            if method.needs_predictor else None
        # entropy_spike: next-token entropies from an auxiliary head over the BPE vocabulary (its FLOPs are counted)
        self.next_token = nn.Linear(width, text.vocab_size) if isinstance(method, EntropySpike) else None

    full_tokens = False  # trainer.full_token_steps' phase (FastCLIP.set_full_tokens)

    def forward(self, tokens) -> TowerOutput:
        """tokens [B, context_length] BPE ids (0 padding) -> TowerOutput; boundaries, boundary_logits and
        token_mask over the batch's first longest-caption tokens; boundary_targets and auxiliary_loss
        (mean next-token NLL in nats) from the next-token head (entropy_spike)."""
        longest, total = caption_sizes(tokens)
        tokens = tokens[:, :longest]
        token_mask = tokens != PAD_ID
        x, logits = self.causal_prefix(tokens, token_mask, total)
        b = self.method.boundaries(logits, tokens, token_mask) * token_mask
        if self.full_tokens:  # trainer.full_token_steps' phase: every token its own segment
            b = token_mask.to(b.dtype)
        counts = segment_counts(b, token_mask)
        # the one host sync: the pooled sizes, and whether the predictor has diverged (before they size anything)
        longest, total, finite = torch.stack([counts.max(), counts.sum(), finite_flag(logits, counts)]).tolist()
        check_finite(finite, "DTP text tower")
        segments = self.shortened(x, b, token_mask, counts, max(longest, 1), total)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        eot = segment_ids(b.detach())[rows, tokens.argmax(-1)].round().long()  # the segment that holds EOT
        emb = segments[rows, eot]
        emb = self.text_projection(emb) if isinstance(self.text_projection, nn.Linear) else emb @ self.text_projection
        targets = auxiliary_loss = None
        if self.next_token is not None and self.training:  # a training objective: evaluation pools without it
            targets, auxiliary_loss = self.next_token_spikes(x, tokens, token_mask)
        return TowerOutput(emb, tokens=token_mask.sum(1).float(), segments=counts.float(), boundaries=b,
                           boundary_logits=logits, boundary_targets=targets, auxiliary_loss=auxiliary_loss,
                           token_mask=token_mask.float())

    def causal_prefix(self, tokens: torch.Tensor, token_mask: torch.Tensor, total: int):
        """[B, L] -> ([B, L, width]: the embedding and the causal pre-layers, as open_clip runs them; the
        predictor's logits [B, L] or None). Packed: on every caption's tokens end to end (padding: zeros)."""
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        if self.layout == "packed" and total > 0:
            rows = PackedRows.from_lengths(token_mask.sum(1), L, total, causal=True)
            h = rows.pack(x)
            for block in self.pre:
                h = self.packed_block(block, h, rows)
            return rows.unpack(h), rows.unpack(self.predictor(h)) if self.predictor is not None else None
        mask = self.attn_mask[:L, :L].to(x.dtype)
        for block in self.pre:
            x = block(x, attn_mask=mask)
        return x, self.predictor(x) if self.predictor is not None else None

    def shortened(self, x, b, token_mask, counts, longest: int, total: int) -> torch.Tensor:
        """The segment means through the shortened blocks (causal over segments) and ln_final -> [B, S, width]."""
        pooled, seg_mask = downsample(x, b, token_mask=token_mask, n_segments=longest, grad=self.method.pooling_grad)
        if self.layout == "packed" and total > 0:  # every caption's segments end to end
            rows = PackedRows.from_lengths(counts, longest, total, causal=True)
            h = rows.pack(pooled)
            for block in self.short:
                h = self.packed_block(block, h, rows)
            return rows.unpack(self.ln_final(h))
        mask = padding_attn_mask(seg_mask, self.heads, causal=True).to(pooled.dtype)
        for block in self.short:
            pooled = block(pooled, attn_mask=mask)
        return self.ln_final(pooled)

    def segment_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(every segment's output [B, S, width] after ln_final, boundaries [B, L]) as forward computes them
        (the causality test reads them)."""
        longest, total = caption_sizes(tokens)
        tokens = tokens[:, :longest]
        token_mask = tokens != PAD_ID
        x, logits = self.causal_prefix(tokens, token_mask, total)
        b = self.method.boundaries(logits, tokens, token_mask) * token_mask
        if self.full_tokens:  # trainer.full_token_steps' phase: every token its own segment
            b = token_mask.to(b.dtype)
        counts = segment_counts(b, token_mask)
        return self.shortened(x, b, token_mask, counts, max(int(counts.max()), 1), int(counts.sum())), b

    def next_token_spikes(self, x, tokens, token_mask):
        """(entropy-spike targets [B, L], the head's mean next-token NLL). A token with no next token in
        view (a caption's EOT, the last column) gets no target."""
        next_logits = self.next_token(x[:, :-1])
        nll = nn.functional.cross_entropy(next_logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
        keep = token_mask[:, 1:].float()
        auxiliary_loss = (nll * keep).sum() / keep.sum().clamp_min(1)
        targets = nn.functional.pad(self.method.targets(next_logits.detach()) * keep, (0, 1))
        return targets, auxiliary_loss

    def caption_with_breaks(self, ids, boundaries) -> str:
        """One caption's BPE tokens as text, '|' after each token that closes a segment (the boundary picture)."""
        special = set(self.tokenizer.all_special_ids)
        out = []
        for i, closes in zip([int(i) for i in ids if int(i) != PAD_ID], boundaries):
            text = "" if i in special else self.tokenizer.decode([i]).strip()
            space = "" if i in special or not self.tokenizer.decoder[i].endswith("</w>") else " "
            out.append(text + ("|" if float(closes) > 0.5 else space))
        return "".join(out).strip()
