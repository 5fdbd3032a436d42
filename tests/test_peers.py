"""The peer baselines at matched FLOPs: ToMe as published (keys, inside the block, proportional
attention), FLIP's patch dropout, EViT, and a coarser patch grid; each one's counted GFLOPs match an
analytic count."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CLIP, compose_cfg, record_calls
from fastclip.checks import ConfigError, check_config
from fastclip.eval.efficiency import count_gflops
from fastclip.models import tome
from fastclip.models.clip import build_clip
from fastclip.models.evit import keep_attentive
from fastclip.models.tome import bipartite_merge
from fastclip.models.vit_block import attention_half
from fastclip.tasks.clip import has_boundary_picture

# 64 patches (32 px at patch 4), width 32 in 2 heads of 16, 4 blocks, MLP 128
GEOMETRY = [*TINY_CLIP, "encoder.vision.patch_size=4", "encoder.vision.layers=4"]
D, HEADS, MLP = 32, 2, 128


def tower(*overrides):
    cfg = compose_cfg([*GEOMETRY, *overrides])
    model, _ = build_clip(cfg.encoder, cfg.boundary)
    return model.visual


def test_tome_merges_the_pairs_the_metric_says_not_the_hidden_states():
    """[cls, t0..t5], split as ToMe's code does: A = the even positions {cls, t1, t3, t5}, B = {t0, t2,
    t4}. By the metric (the keys) t3 is t2's twin, the best match, so with r = 1 t3 goes into t2; by
    the hidden states it would have gone into t4. The unmerged A stay in position order (t1 before t5,
    though t5 is the better matched), and source tracking sums the merged tokens' inputs."""
    e = torch.eye(6)
    zero = torch.zeros(6)
    x = torch.stack([zero, e[0], e[3], e[1], e[2], e[2], e[4]])[None]  # t3 ~ t4 by the states
    metric = torch.stack([zero, e[0], e[0] + e[3], e[1], e[1], e[2], e[2] + 0.5 * e[4]])[None]  # t3 ~ t2
    size = torch.ones(1, 7, 1)
    merged, new_size, source = bipartite_merge(x, size, 1, metric=metric, source=torch.eye(7)[None])
    # [cls, unmerged A (t1, t5), B: t0, t2 holding t3, t4]
    torch.testing.assert_close(merged[0], torch.stack([zero, e[3], e[4], e[0], (e[1] + e[2]) / 2, e[2]]))
    assert new_size[0, :, 0].tolist() == [1.0, 1.0, 1.0, 1.0, 2.0, 1.0]
    assert [row.nonzero().flatten().tolist() for row in source[0]] == [[0], [2], [6], [1], [3, 4], [5]]
    by_states, _, _ = bipartite_merge(x, size, 1)  # on the hidden states: t3 into t4, t2 alone
    torch.testing.assert_close(by_states[0, 4], e[1])


def test_tome_keeps_the_size_weighted_mass_and_never_merges_the_class_token():
    torch.manual_seed(0)
    x, size = torch.randn(2, 17, 8), torch.randint(1, 4, (2, 17, 1)).float()
    merged, new_size, _ = bipartite_merge(x, size, 5, metric=torch.randn(2, 17, 6))
    assert merged.shape == (2, 12, 8) and new_size.sum(1).tolist() == size.sum(1).tolist()
    torch.testing.assert_close((merged * new_size).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged[:, 0], x[:, 0])


def test_the_tome_tower_merges_on_the_keys_between_attention_and_mlp(monkeypatch):
    torch.manual_seed(0)
    visual = tower("boundary=tome", "boundary.r=4").eval()
    merges = record_calls(monkeypatch, tome, "bipartite_merge")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = visual(images)
        vit = visual.vit
        block = vit.transformer.resblocks[0]
        x0 = vit._embeds(images)
        keys = F.linear(block.ln_1(x0), block.attn.in_proj_weight, block.attn.in_proj_bias)[..., D:2 * D]
        after_attention = x0 + block.attn(block.ln_1(x0), block.ln_1(x0), block.ln_1(x0), need_weights=False)[0]
    assert len(merges) == 4 and out.segments[0] == 64 - 4 * 4
    (x, *_), kwargs, _ = merges[0]
    torch.testing.assert_close(kwargs["metric"], keys.unflatten(-1, (HEADS, D // HEADS)).mean(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(x, after_attention, atol=1e-5, rtol=0)  # merged before the MLP


def test_the_tome_picture_groups_each_patch_with_the_token_that_holds_it(monkeypatch):
    """merged_groups follows every merge: each group holds as many patches as its token's size, and
    there are as many groups as patch tokens the last block leaves (the picture: the test below)."""
    torch.manual_seed(0)
    visual = tower("boundary=tome", "boundary.r=19").eval()
    images = torch.randn(3, 3, 32, 32)
    merges = record_calls(monkeypatch, tome, "bipartite_merge")
    groups = visual.merged_groups(images)
    final = merges[-1][2][1][:, 1:, 0]  # the last merge's sizes  # 64 -> 45 -> 26 -> 13 -> 7 patch tokens (r capped at half)
    assert groups.shape == (3, 64) and final.shape == (3, 7) and groups.min() >= 1
    for b in range(3):
        assert torch.bincount(groups[b], minlength=8)[1:].tolist() == final[b].tolist()


def test_proportional_attention_adds_log_size_to_every_keys_logit():
    torch.manual_seed(0)
    block = tower("boundary=tome").vit.transformer.resblocks[0].eval()
    x, size = torch.randn(2, 6, D), torch.tensor([[1., 2, 1, 3, 1, 1], [1, 1, 4, 1, 2, 1]])
    with torch.no_grad():
        got, _, _ = attention_half(block, x, bias=size.log()[:, None, None, :])
        h = block.ln_1(x)
        q, k, v = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).unflatten(-1, (3, HEADS, -1)).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-1, -2) / math.sqrt(D // HEADS) + size.log()[:, None, None, :]).softmax(-1)
        expected = x + block.attn.out_proj((weights @ v).transpose(1, 2).flatten(-2))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def first_block_lengths(visual, images, train: bool) -> list[int]:
    lengths = []
    hook = visual.vit.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    visual.train(train)
    with torch.no_grad():
        visual(images)
    hook.remove()
    return lengths


def test_patch_dropout_keeps_its_fraction_in_training_and_every_patch_at_eval_unless_eval_keep():
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    visual = tower("boundary=patch_dropout", "boundary.keep=0.25")
    assert first_block_lengths(visual, images, train=True) == [1 + 16]
    assert first_block_lengths(visual, images, train=False) == [1 + 64]
    visual = tower("boundary=patch_dropout", "boundary.keep=0.25", "boundary.eval_keep=true")
    assert first_block_lengths(visual, images, train=False) == [1 + 16]
    out = visual.eval()(images)
    assert out.tokens.tolist() == [64.0] * 3 and out.segments.tolist() == [16.0] * 3
    with visual.all_patches():  # the eval_keep run's weights read on every patch (zeroshot/top1_all_patches)
        assert first_block_lengths(visual, images, train=False) == [1 + 64]
        assert visual.eval()(images).segments.tolist() == [64.0] * 3
    assert first_block_lengths(visual, images, train=False) == [1 + 16]  # and back


def test_patch_dropout_logs_the_patch_count_open_clip_keeps():
    """efficiency/compression_image reads the segments the tower reports: the patches its blocks
    ran on. At keep 0.2 of 25 patches (patch 6) open_clip's PatchDropout keeps
    int(25 x (1 - 0.8)) = 4, as floating point rounds 1 - 0.8 (int(25 x 0.2) would say 5)."""
    visual = tower("boundary=patch_dropout", "boundary.keep=0.2", "boundary.eval_keep=true",
                   "encoder.vision.patch_size=6")
    images = torch.randn(2, 3, 32, 32)
    ran = first_block_lengths(visual, images, train=False)[0] - 1
    with torch.no_grad():
        out = visual.eval()(images)
    assert ran == 4 and out.segments.tolist() == [4.0, 4.0] and out.tokens.tolist() == [25.0, 25.0]


def blank_patch_tokens(visual, images, train: bool) -> list[int]:
    """Per image: how many patch tokens entering ln_pre are their positional embedding alone."""
    seen = {}
    hook = visual.vit.ln_pre.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    visual.train(train)
    with torch.no_grad():
        visual(images)
    hook.remove()
    position = visual.vit.positional_embedding[1:]
    return (seen["x"][:, 1:] - position).abs().amax(-1).lt(1e-6).sum(-1).tolist()


def test_patch_mask_blanks_the_dropped_patches_and_runs_every_token():
    """boundary.mask_only=true, the augmentation-only control: in training every block runs on all 64
    patches (vanilla's FLOPs, compression 1 logged) while int(64 x 0.25) = 16 of each image's patch
    tokens keep their content and the other 48 are their positional embedding alone (their pixels
    zeroed); a different draw per image. Evaluation and the full-token phase blank nothing."""
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    visual = tower("boundary=patch_dropout", "boundary.keep=0.25", "boundary.mask_only=true")
    assert first_block_lengths(visual, images, train=True) == [1 + 64]
    assert blank_patch_tokens(visual, images, train=True) == [48] * 3
    seen = {}
    hook = visual.vit.ln_pre.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        out = visual.train()(images)
    hook.remove()
    blank = (seen["x"][:, 1:] - visual.vit.positional_embedding[1:]).abs().amax(-1).lt(1e-6)
    assert not torch.equal(blank[0], blank[1])
    assert out.tokens.tolist() == [64.0] * 3 and out.segments.tolist() == [64.0] * 3
    assert blank_patch_tokens(visual, images, train=False) == [0] * 3
    visual.full_tokens = True
    assert blank_patch_tokens(visual, images, train=True) == [0] * 3
    visual.full_tokens = False
    with torch.no_grad():  # every patch at the vanilla tower's cost
        masked, _ = count_gflops(visual.train(), images)
        vanilla, _ = count_gflops(tower("boundary=none").train(), images)
    assert masked == pytest.approx(vanilla, rel=1e-3)


@pytest.mark.parametrize("keep,side", [(0.453125, 32), (1 / 7, 30)])
def test_patch_mask_blanks_the_patches_open_clips_dropout_drops_from_the_same_generator_state(keep, side):
    """The same draw as open_clip's PatchDropout (its count, int(N x (1 - (1 - keep))), 6 of 49 at
    keep 1/7 where int(N x keep) would be 7), the class token never blanked; at 30 px and patch 4 the
    conv crops the last 2 pixel rows and columns, which the mask leaves alone."""
    from open_clip.transformer import PatchDropout
    from fastclip.models.patch_dropout import mask_patches
    grid = side // 4
    n = grid * grid
    images = torch.rand(2, 3, side, side) + 1  # no zero pixel: a zero is a blanked one
    tokens = torch.arange(1 + n, dtype=torch.float).view(1, -1, 1).expand(2, -1, 1)
    torch.manual_seed(7)
    kept = PatchDropout(1 - keep, exclude_first_token=True).train()(tokens)[:, 1:, 0].long() - 1
    torch.manual_seed(7)
    masked = mask_patches(images, (grid, grid), (4, 4), keep)
    cells = masked[:, 0, :grid * 4, :grid * 4].unflatten(1, (grid, 4)).unflatten(3, (grid, 4)).amax((2, 4)).flatten(1) > 0
    assert cells.sum(1).tolist() == [kept.shape[1]] * 2
    assert all(set(cells[b].nonzero().squeeze(1).tolist()) == set(kept[b].tolist()) for b in range(2))
    assert torch.equal(masked[:, :, grid * 4:], images[:, :, grid * 4:])  # beyond the grid: untouched


def test_a_patch_dropout_run_at_keep_also_scores_every_patch_at_the_end(tmp_path):
    """One training gives bench-clip both patch-dropout rows: top-1 at the keep rate (the matched
    GFLOPs) and, from the same weights, on every patch."""
    from fastclip.tasks.clip import ClipTask
    cfg = compose_cfg(TINY_CLIP + ["boundary=patch_dropout", "boundary.keep=0.5", "boundary.eval_keep=true"])
    task = ClipTask(cfg, torch.device("cpu"))
    final = task.final_evaluate()
    with task.model.visual.all_patches():
        assert final["zeroshot/top1_all_patches"] == task._zero_shot()["top1"]
    assert "zeroshot/top1_all_patches" not in ClipTask(compose_cfg(TINY_CLIP + ["boundary=patch_dropout"]),
                                                       torch.device("cpu")).final_evaluate()


def test_evit_keeps_the_top_k_by_class_attention_and_fuses_the_rest_by_that_attention():
    x = torch.arange(6 * 2, dtype=torch.float).view(1, 6, 2)  # cls + 5 patches
    attention = torch.tensor([[0.3, 0.05, 0.4, 0.1, 0.05, 0.1]])  # cls, then patches p0..p4
    out, kept_mask = keep_attentive(x, attention, keep=0.4)  # ceil(0.4 x 5) = 2 kept: p1 (0.4) and p2 (0.1 tie p4: first)
    kept = out[0, 1:3]
    assert out.shape == (1, 1 + 2 + 1, 2)
    torch.testing.assert_close(out[0, 0], x[0, 0])
    top = attention[0, 1:].topk(2).indices.sort().values
    torch.testing.assert_close(kept, x[0, 1:][top])
    assert kept_mask[0].nonzero().flatten().tolist() == top.tolist()
    rest = [i for i in range(5) if i not in top.tolist()]
    w = attention[0, 1:][rest]  # 0.05, 0.05, 0.1: they sum to 0.2, so a weighted mean would be 5x this
    # EViT's published fused token (`extra_token` in its Block.forward): the attention-weighted SUM
    torch.testing.assert_close(out[0, 3], (w[:, None] * x[0, 1:][rest]).sum(0))


def test_the_evit_tower_drops_and_fuses_at_its_layers():
    torch.manual_seed(0)
    visual = tower("boundary=evit", "boundary.keep=0.5", "boundary.layers=[1,2]").eval()
    lengths = []
    for block in visual.vit.transformer.resblocks:
        block.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    with torch.no_grad():
        out = visual(torch.randn(2, 3, 32, 32))
    # blocks 1 and 2 run in halves (no forward call); block 3 sees cls + 17 kept + 1 fused: 64 patches -> 32 kept
    # + 1 fused at block 1, 33 -> 17 + 1 at block 2
    assert lengths == [65, 1 + 17 + 1] and out.segments.tolist() == [18.0, 18.0]


def analytic_gflops(attention_lengths: list[int], mlp_lengths: list[int], patches: int, patch: int,
                    extra: float = 0.0) -> float:
    """Multiply-adds x 2 per image: patch embedding, per block qkv + attention (QK^T, AV) + out
    projection at its attention length and the MLP at its MLP length, and the final projection."""
    flops = 2 * patches * 3 * patch * patch * D
    for la, lm in zip(attention_lengths, mlp_lengths):
        flops += 2 * la * D * 3 * D + 2 * 2 * la * la * D + 2 * la * D * D + 2 * lm * 2 * D * MLP
    return (flops + 2 * D * 32 + extra) / 1e9


@pytest.mark.parametrize("name,overrides,attention,mlp,patches,patch,extra", [
    ("vanilla", ["boundary=none"], [65] * 4, [65] * 4, 64, 4, 0.0),
    ("coarser grid", ["boundary=none", "encoder.vision.patch_size=8"], [17] * 4, [17] * 4, 16, 8, 0.0),
    # r = 8 per block: 64 -> 56 -> 48 -> 40 -> 32 patches after each block's attention; matching scores 32x32 ... x 16
    ("tome", ["boundary=tome", "boundary.r=8"], [65, 57, 49, 41], [57, 49, 41, 33], 64, 4,
     sum(2 * (n // 2) * (n - n // 2) * (D // HEADS) for n in (64, 56, 48, 40))),
    ("patch dropout, eval at keep", ["boundary=patch_dropout", "boundary.keep=0.5", "boundary.eval_keep=true"],
     [33] * 4, [33] * 4, 64, 4, 0.0),
    ("evit", ["boundary=evit", "boundary.keep=0.5", "boundary.layers=[1]"], [65, 65, 34, 34], [65, 34, 34, 34],
     64, 4, 0.0),
])
def test_counted_gflops_match_an_analytic_count(name, overrides, attention, mlp, patches, patch, extra):
    visual = tower(*overrides).eval()
    with torch.no_grad():
        counted, _ = count_gflops(visual, torch.randn(2, 3, 32, 32))
    expected = analytic_gflops(attention, mlp, patches, patch, extra)
    assert counted == pytest.approx(expected, rel=0.05), (name, counted, expected)


def test_peer_baselines_are_image_only_and_checked_before_training():
    for name in ("patch_dropout", "evit", "tome"):
        with pytest.raises(ConfigError, match=f"boundary={name} has no meaning on the text tower"):
            check_config(compose_cfg([f"boundary={name}", "boundary.apply_to=[image,text]"]))
        with pytest.raises(ConfigError, match=f"boundary={name} reduces image tokens"):
            check_config(compose_cfg(["task=lm", f"boundary={name}"]))
    with pytest.raises(ValueError, match=r"boundary.keep=1.5"):
        tower("boundary=patch_dropout", "boundary.keep=1.5")
    with pytest.raises(ValueError, match=r"boundary.layers=\[7\]"):
        tower("boundary=evit", "boundary.layers=[7]")


@pytest.mark.parametrize("values", [list(range(1, 49)), list(range(48, 0, -1)), [5, 6, 7, 8], [3]])
def test_bench_knob_bisection_finds_what_trying_every_candidate_finds(values):
    """The bench matches each peer's knob to a GFLOPs target by bisection (a ViT-B/16 build per
    candidate made the exhaustive search minutes long): on rising, falling and flat-topped costs it
    must pick the candidate an exhaustive search picks, with O(log n) evaluations."""
    from fastclip.bench.clip import closest_monotone
    calls = []

    def cost(v):  # falls with v, with a plateau where ToMe runs out of tokens
        calls.append(v)
        return 100.0 / min(v, 30)

    for target in [1.0, 3.4, 3.3334, 5.1, 17.0, 40.0, 200.0]:
        calls.clear()
        value, got = closest_monotone(values, cost, target)
        assert got == cost(value) and len(calls) - 1 <= 3 + math.ceil(math.log2(len(values)))
        assert abs(got - target) == min(abs(cost(v) - target) for v in values)


def test_the_boundary_pictures_of_the_peers_mark_the_patches_they_keep_or_merge(tmp_path, monkeypatch):
    """Kept vs dropped patches, where the picture has a meaning: patch dropout at eval_keep keeps its
    fraction, the very patches the first block runs on; EViT keeps the top-k by the class token's
    attention in its first block. The picture draws those, and ToMe's merged groups, and an
    evaluation asks for it for all three."""
    from fastclip.eval.boundary_picture import draw
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    visual = tower("boundary=patch_dropout", "boundary.keep=0.25", "boundary.eval_keep=true").eval()
    seen = []
    hook = visual.vit.transformer.resblocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    kept = visual.kept_patches(images)
    hook.remove()
    assert kept.shape == (3, 64) and kept.sum(1).tolist() == [16] * 3 and not torch.equal(kept[0], kept[1])
    with torch.no_grad(), visual.all_patches():  # the block's rows are the kept patches' embeddings
        embeds = visual.vit._embeds(images)[:, 1:]
    for b in range(3):
        rows = seen[0][b, 1:]
        assert torch.equal((embeds[b][:, None] == rows[None]).all(-1).any(-1), kept[b])

    visual = tower("boundary=evit", "boundary.keep=0.35", "boundary.layers=[0]").eval()
    kept = visual.kept_patches(images)
    with torch.no_grad():
        _, _, cls = attention_half(visual.vit.transformer.resblocks[0], visual.vit._embeds(images), cls_attention=True)
    top = cls.mean(1)[:, 1:].topk(math.ceil(0.35 * 64), dim=-1).indices
    assert torch.equal(kept, torch.zeros(3, 64, dtype=torch.bool).scatter(1, top, True))

    for overrides in (["boundary=evit", "boundary.keep=0.35"], ["boundary=patch_dropout", "boundary.eval_keep=true"],
                      ["boundary=tome", "boundary.r=19"]):
        cfg = compose_cfg([*GEOMETRY, *overrides])
        model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
        asked = record_calls(monkeypatch, model.visual, "merged_groups" if "tome" in overrides[0] else "kept_patches")
        path = tmp_path / f"{overrides[0]}.png"
        draw(model, images, tokenizer(["a cat", "a dog", "a ship"]), str, path)
        assert path.stat().st_size > 0 and len(asked) == 1 and has_boundary_picture(model)
    cfg = compose_cfg(GEOMETRY)
    vanilla, _ = build_clip(cfg.encoder, cfg.boundary)
    assert not has_boundary_picture(vanilla)


def test_group_outlines_run_between_neighbouring_cells_of_different_groups():
    from fastclip.eval.boundary_picture import group_edges
    grid = np.array([[0, 0, 1], [2, 2, 1]])
    assert sorted(group_edges(grid)) == sorted([((2, 0), (2, 1)), ((2, 1), (2, 2)),  # 0|1, 2|1
                                                ((0, 1), (1, 1)), ((1, 1), (2, 1))])  # 0 over 2, twice


# CLIPA's low resolution (boundary=lowres)

@pytest.mark.parametrize("scale, grid", [(0.5, 4), (0.75, 6), (1.0, 8)])
def test_lowres_reads_the_image_at_a_lower_resolution_on_fewer_patches_with_interpolated_positions(scale, grid):
    """8 x 8 patches at scale 1; the position embeddings resized to the smaller grid keep the class
    token's and, at scale 1, are the tower's own (the forward is then open_clip's)."""
    visual = tower("boundary=lowres", f"boundary.scale={scale}")
    images = torch.randn(3, 3, 32, 32)
    out = visual(images)
    assert out.tokens.tolist() == [64.0] * 3 and out.segments.tolist() == [float(grid * grid)] * 3
    pos = visual.positions()
    assert pos.shape == (1 + grid * grid, D) and torch.equal(pos[0], visual.vit.positional_embedding[0])
    vanilla = count_gflops(visual.vit, images)[0]
    if scale == 1.0:
        assert torch.equal(pos, visual.vit.positional_embedding)
        with torch.no_grad():
            assert torch.allclose(out.embedding, visual.vit(images), atol=1e-5)
    else:
        assert count_gflops(visual, images)[0] < vanilla * (grid * grid + 1) / 64 * 1.1


def test_lowres_is_an_image_peer_with_its_scale_checked():
    with pytest.raises(ConfigError, match="boundary=lowres has no meaning on the text tower"):
        check_config(compose_cfg(["boundary=lowres", "boundary.apply_to=[image,text]"]))
    with pytest.raises(ConfigError, match=r"boundary.scale=1.5: expected a share of the image side in \(0, 1\]"):
        check_config(compose_cfg(["boundary=lowres", "boundary.scale=1.5"]))
