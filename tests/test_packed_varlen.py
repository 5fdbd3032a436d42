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
    """varlen_attn's contract in plain torch: q, k, v [T, heads, head_dim] with a contiguous last dim,
    cu_seqlens int32 on their device; the rows outside every span are unset in the output and in the
    gradients of q, k and v (the kernel allocates both with empty_like): NaN here."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and cu_q.is_contiguous() and cu_q.device == q.device
    assert q.dim() == 3 and all(t.stride(-1) == 1 for t in (q, k, v))
    out = torch.full_like(q, float("nan"))
    covered = torch.zeros(q.shape[0], dtype=torch.bool)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        assert e - s <= max_q
        covered[s:e] = True
        if e > s:
            span = [t[s:e].transpose(0, 1) for t in (q, k, v)]
            out[s:e] = F.scaled_dot_product_attention(*span, is_causal=window_size == (-1, 0)).transpose(0, 1)
    for t in (q, k, v):
        if t.requires_grad:
            t.register_hook(lambda g: g.masked_fill(~covered[:, None, None], float("nan")))
    return out


def block_outputs(block, x, rows, varlen: bool, monkeypatch):
    monkeypatch.setattr(packed, "VARLEN", reference_varlen)
    monkeypatch.setattr(packed, "VARLEN_DTYPES", (torch.float32,))  # the kernel's are half; the reference's any
    rows.varlen = varlen
    block.zero_grad()
    x = x.detach().requires_grad_()
    out = packed_block(block, x, rows)
    real = out[rows.real.squeeze(1)]
    real.square().sum().backward()
    # filler rows too: the next block's LayerNorm and MLP read them, and their gradients reach the weights
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    return real, x.grad[rows.real.squeeze(1)], block.attn.in_proj_weight.grad.clone()


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
    """Packed rows on the CPU, or on CUDA without half-precision autocast, keep the masked path."""
    lengths = torch.tensor([2, 3])
    assert not PackedRows.from_lengths(lengths, 3, 5).varlen
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not PackedRows.from_lengths(lengths, 3, 5).varlen
    if torch.cuda.is_available():
        assert not PackedRows.from_lengths(lengths.cuda(), 3, 5).varlen  # float32
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert PackedRows.from_lengths(lengths.cuda(), 3, 5).varlen == (packed.VARLEN is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen_attn is CUDA-only")
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_kernel_on_cuda_agrees_with_the_masked_path(causal):
    """The real kernel (flash; rows over 128 tokens without a causal mask go to cuDNN on recent GPUs):
    outputs and gradients as the masked path's, finite filler gradients."""
    torch.manual_seed(0)
    block = ResidualAttentionBlock(256, 4).cuda()
    lengths = torch.tensor([17, 3, 140, 1, 25], device="cuda")
    size = int(lengths.sum()) + 10  # filler rows beyond the real tokens' end
    x = torch.randn(size, 256, device="cuda")
    results = {}
    for varlen in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rows = PackedRows.from_lengths(lengths, 140, None, causal=causal, size=size)
            assert rows.varlen  # the probe passed on this GPU
            rows.varlen = varlen
            block.zero_grad()
            xg = x.clone().requires_grad_()
            out = packed_block(block, xg, rows)[rows.real.squeeze(1)].float()
            out.square().sum().backward()
        assert torch.isfinite(xg.grad).all() and torch.isfinite(block.attn.in_proj_weight.grad).all()
        results[varlen] = (out, xg.grad[rows.real.squeeze(1)], block.attn.in_proj_weight.grad.clone())
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
