"""Packed rows' attention through torch's variable-length flash attention (models/packed.py).

The kernel itself is CUDA-only: on this CPU the glue around it (the [T, heads, head_dim] views of the
packed qkv, the cumulative row starts, the causal window, the filler rows no sequence covers) is
checked against the masked padded path by standing a reference with varlen_attn's documented
contract in for the kernel: each cu_seqlens span attends within itself, window (-1, 0) is causal,
and rows outside every span are left unset (NaN here, so a filler row read anywhere shows). The
CUDA test runs the real kernel where there is one."""
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock

from fastclip.models import packed
from fastclip.models.packed import PackedRows, packed_block


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1)):
    """varlen_attn's contract in plain torch: q, k, v [T, heads, head_dim]."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and q.dim() == 3
    out = torch.full_like(q, float("nan"))
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        assert e - s <= max_q
        if e > s:
            span = [t[s:e].transpose(0, 1) for t in (q, k, v)]
            out[s:e] = F.scaled_dot_product_attention(*span, is_causal=window_size == (-1, 0)).transpose(0, 1)
    return out


def block_outputs(block, x, rows, varlen: bool, monkeypatch):
    monkeypatch.setattr(packed, "VARLEN", reference_varlen)
    monkeypatch.setattr(packed, "varlen_usable", lambda *a: varlen)
    block.zero_grad()
    x = x.detach().requires_grad_()
    out = packed_block(block, x, rows)
    real = out[rows.real.squeeze(1)]
    real.square().sum().backward()
    assert torch.isfinite(out).all()  # filler rows too: the next block's LayerNorm and MLP read them
    return real, x.grad, block.attn.in_proj_weight.grad.clone()


@pytest.mark.parametrize("causal,lengths,size", [
    (False, [3, 5, 1, 4], None),          # image rows (class token + segments), filler to a multiple of B
    (False, [3, 5, 1, 4], 4 * 6),         # a token budget (padded length 6): a fixed size, more filler
    (True, [4, 0, 6, 2], None),           # text rows, causal, with an empty caption
])
def test_varlen_attention_equals_the_masked_padded_attention(causal, lengths, size, monkeypatch):
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4)
    lengths = torch.tensor(lengths)
    L = max(int(lengths.max()), (size or 0) // len(lengths))
    rows = PackedRows.from_lengths(lengths, L, None if size else int(lengths.sum()), causal=causal, size=size)
    assert rows.cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    x = torch.randn(rows.size, 32)
    masked = block_outputs(block, x, rows, False, monkeypatch)
    varlen = block_outputs(block, x, rows, True, monkeypatch)
    for a, b in zip(masked, varlen):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_varlen_runs_only_where_it_can():
    """CPU, float32, attention dropout or an odd head width: the masked path."""
    qkv = torch.zeros(4, 3 * 64)
    assert not packed.varlen_usable(qkv, 16, 0.0)
    assert not packed.varlen_usable(qkv.bfloat16(), 16, 0.0)  # no CUDA here
    if torch.cuda.is_available():
        cuda = qkv.cuda()
        assert not packed.varlen_usable(cuda, 16, 0.0)  # float32
        assert not packed.varlen_usable(cuda.half(), 16, 0.1)  # dropout
        assert not packed.varlen_usable(cuda.half(), 12, 0.0)  # head_dim not a multiple of 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen_attn is CUDA-only")
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_kernel_on_cuda_agrees_with_the_masked_path(causal, monkeypatch):
    torch.manual_seed(0)
    block = ResidualAttentionBlock(256, 4).cuda()
    lengths = torch.tensor([17, 3, 40, 1, 25], device="cuda")
    rows = PackedRows.from_lengths(lengths, 40, int(lengths.sum()), causal=causal)
    x = torch.randn(rows.size, 256, device="cuda")
    outs = {}
    for varlen in (False, True):
        monkeypatch.setattr(packed, "varlen_usable", lambda *a, v=varlen: v and packed.VARLEN is not None)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs[varlen] = packed_block(block, x, rows)[rows.real.squeeze(1)].float()
    assert packed.VARLEN is not None and torch.cuda.is_bf16_supported()
    torch.testing.assert_close(outs[True], outs[False], rtol=2e-2, atol=2e-2)
