"""DTP inside CLIP's towers: masks, gradients, achieved rates, FLOPs from real boundaries, per-tower
meaning of every boundary option, ToMe."""
import pytest
import torch

from conftest import TINY_CLIP, compose_cfg, count_tensor_reads, record_calls
from fastclip import runtime
from fastclip.eval.efficiency import count_gflops, on_grid_share, tower_efficiency
from fastclip.eval.boundary_picture import segment_grid
from fastclip.models import vision
from fastclip.models.clip import build_clip
from fastclip.models.patch_order import patch_order
from fastclip.tasks.clip import ClipTask

CPU = torch.device("cpu")


def task_for(*overrides):
    runtime.seed_everything(0)
    return ClipTask(compose_cfg(TINY_CLIP + list(overrides)), CPU)


@pytest.mark.parametrize("boundary", ["none", "fixed", "whitespace", "gumbel", "entropy_spike", "unigram", "tome"])
def test_every_boundary_option_trains_and_evaluates_with_clip(boundary, tmp_path):
    over_bytes = ["boundary.text_tokens=bytes"] if boundary == "unigram" else []  # unigram has no meaning over BPE
    task = task_for(f"boundary={boundary}", "trainer.batch_size=32", f"+dataset.cache_dir={tmp_path}", *over_bytes)
    loss, extras, n = task.loss(next(iter(task.train_batches(0))))
    loss.backward()
    assert torch.isfinite(loss) and n == 32
    metrics = task.evaluate()
    for key in ("val/zeroshot_top1", "efficiency/image_gflops", "efficiency/text_gflops",
                "efficiency/compression_image", "efficiency/compression_text"):
        assert key in metrics, key
    assert not any(k.startswith("zeroshot/") for k in metrics)  # the test split is read at the end only
    if boundary in ("fixed", "entropy_spike", "tome"):
        assert metrics["efficiency/compression_image"] > 1.0
    if boundary == "gumbel":
        # untrained, p ~= prior 0.2 on each of the 16 patches: expected_count keeps round(sum p) = 3 or 4
        # boundaries per image (the spread is the predictor's init), i.e. 3 to 5 segments (a boundary on
        # the last patch adds none): 16/5 .. 16/3 (threshold would give one segment: 16)
        assert 16 / 5 <= metrics["efficiency/compression_image"] <= 16 / 3
    if boundary in ("none", "tome"):
        assert metrics["efficiency/compression_text"] == 1.0


@pytest.mark.parametrize("boundary,tower", [("whitespace", "image"), ("unigram", "image"), ("tome", "text")])
def test_meaningless_tower_combination_fails_at_config_time(boundary, tower):
    with pytest.raises(ValueError, match=rf"boundary={boundary} has no meaning on the {tower} tower"):
        task_for(f"boundary={boundary}", f"boundary.apply_to=[{tower}]")


def test_rn50_image_tower_with_dtp_text_tower():
    cfg = compose_cfg(["encoder=rn50", "boundary=gumbel", "boundary.apply_to=[text]", "+encoder.vision.width=8",
                       "+encoder.vision.image_size=64", "+encoder.text.width=32", "+encoder.text.layers=2",
                       "+encoder.text.heads=2", "encoder.embed_dim=32"])
    model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
    out = model(torch.randn(2, 3, 64, 64), tokenizer(["a red bus", "two dogs playing in the snow"]))
    assert out["image_features"].shape == out["text_features"].shape == (2, 32)
    with pytest.raises(ValueError, match="needs a ViT image tower"):
        cfg = compose_cfg(["encoder=rn50", "boundary=gumbel", "boundary.apply_to=[image]"])
        build_clip(cfg.encoder, cfg.boundary)


def test_segment_masks_with_different_counts_in_one_batch():
    task = task_for("boundary=fixed", "boundary.k=3", "boundary.apply_to=[text]", "boundary.text_tokens=bytes")
    tokens = task.tokenizer(["ab", "a much longer caption here"])
    out = task.model.text(tokens)
    assert out.segments.tolist() == [1.0, 9.0]  # ceil(2/3), ceil(26/3)
    assert out.tokens.tolist() == [2.0, 26.0]
    # the short row must not depend on the long row's padding or content
    alone = task.model.text(tokens[:1]).embedding
    torch.testing.assert_close(out.embedding[:1], alone, rtol=1e-4, atol=1e-5)


def test_image_embedding_does_not_depend_on_the_batch_padding():
    task = task_for("boundary=gumbel", "boundary.apply_to=[image]")
    model = task.model.eval()
    with torch.no_grad():
        model.visual.predictor.mlp[-1].weight.mul_(20)  # spread the per-image boundary counts
        images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        out = model.visual(images)
        counts = out.segments
        assert counts.min() < counts.max()  # this batch pads its shorter rows
        i = int(counts.argmin())
        alone = model.visual(images[i:i + 1])  # alone: no padding, no mask
    assert alone.segments.item() == counts[i].item()
    torch.testing.assert_close(out.embedding[i:i + 1], alone.embedding, rtol=1e-4, atol=1e-5)


def towers_agreeing_across_layouts(variants: dict, pool: str = "mean"):
    """Gumbel image towers with the same weights, one per {key: placement overrides}, their
    predictors sharpened so that the 12 test images get different segment counts. -> (towers,
    images, {key: (embeddings, segment counts, predictor grad, patch-embedding grad)}); checks
    that the counts differ and that every variant matches the first."""
    towers, out = {}, {}
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for key, overrides in variants.items():
        task = task_for("boundary=gumbel", "boundary.apply_to=[image]", f"boundary.image_pool={pool}", *overrides)
        tower = towers[key] = task.model.visual.eval()
        with torch.no_grad():
            tower.predictor.mlp[-1].weight.mul_(20)  # spread the per-image counts
        tower_out = tower(images)
        tower_out.embedding.square().sum().backward()
        out[key] = (tower_out.embedding, tower_out.segments, tower.predictor.mlp[0].weight.grad,
                    tower.vit.conv1.weight.grad)
    first, *rest = out.values()
    assert first[1].min() < first[1].max()
    for other in rest:
        for a, b in zip(first, other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    return towers, images, out


def test_segment_count_buckets_change_no_result_and_cut_padding():
    """image_buckets > 1 runs the shortened layers per group of rows sorted by segment count:
    the same embeddings and gradients as one padded batch, fewer FLOPs spent on padding."""
    towers, images, _ = towers_agreeing_across_layouts({b: ["boundary.image_layout=padded", f"boundary.image_buckets={b}"]
                                                 for b in (1, 3)})
    with torch.no_grad():
        padded, _ = count_gflops(towers[1], images)
        bucketed, _ = count_gflops(towers[3], images)
    assert bucketed < padded


@pytest.mark.parametrize("boundary,tower,syncs", [("fixed", "image", 0), ("gumbel", "image", 1), ("gumbel", "text", 1)])
def test_dtp_tower_host_syncs(boundary, tower, syncs, monkeypatch):
    """A fixed k image tower knows its pooled length in advance: no sync; a learned one needs one
    (the longest row), and so does a text tower (captions differ in length)."""
    task = task_for(f"boundary={boundary}", f"boundary.apply_to=[{tower}]")
    task.model.train()
    inputs = torch.randn(4, 3, 32, 32) if tower == "image" else task.tokenizer(["a cat", "two red buses", "x", "dogs"])
    reads = count_tensor_reads(monkeypatch)
    out = (task.model.visual if tower == "image" else task.model.text)(inputs)
    assert sum(reads.values()) == syncs
    monkeypatch.undo()
    assert out.embedding.shape[0] == 4 and (out.segments <= out.tokens).all()


def test_bench_gpu_attributes_each_host_sync_to_the_line_that_made_it(monkeypatch):
    """bench-gpu's sync column: torch warns on each synchronizing CUDA call (sync-debug mode);
    emulated here by a warning from Tensor.tolist, the call the gumbel image tower syncs with."""
    import inspect
    import warnings
    from fastclip.bench import gpu
    from fastclip.models import vision
    tower = task_for("boundary=gumbel", "boundary.apply_to=[image]").model.visual
    for name in ("is_available", "synchronize", "set_sync_debug_mode"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: True)
    real = torch.Tensor.tolist

    def warning_tolist(self):
        warnings.warn("called a synchronizing CUDA operation")
        return real(self)
    monkeypatch.setattr(torch.Tensor, "tolist", warning_tolist)
    sites = gpu.host_syncs_per_step(lambda: tower(torch.randn(2, 3, 32, 32)))
    line = next(n for n, text in enumerate(inspect.getsource(vision).splitlines(), 1) if "longest, total, finite = " in text)
    assert dict(sites) == {f"vision.py:{line}": 1}


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_packed_rows_change_no_result_and_count_no_padding(pool):
    """image_layout=packed (the default) runs the shortened blocks on every row's segments laid end
    to end: the same embeddings and gradients as one padded batch, and the counted FLOPs of the
    shortened blocks' projections and MLPs those of the real segments only."""
    towers, images, out = towers_agreeing_across_layouts(
        {layout: [f"boundary.image_layout={layout}", "boundary.image_buckets=1"] for layout in ("padded", "packed")}, pool)
    counts = out["padded"][1]
    with torch.no_grad():
        padded, _ = count_gflops(towers["padded"], images)
        packed, _ = count_gflops(towers["packed"], images)
    assert packed < padded
    # each shortened block's MLP runs on the class token + the real segments of each row, plus
    # filler up to the next multiple of the batch size (few distinct sizes for the allocator)
    mlp_rows = []
    hook = towers["packed"].vit.transformer.resblocks[-1].mlp.register_forward_hook(
        lambda m, inp, _: mlp_rows.append(inp[0].shape[0]))
    with torch.no_grad():
        towers["packed"](images)
    hook.remove()
    real = int(counts.sum()) + len(images)
    assert mlp_rows == [-(-real // len(images)) * len(images)]


def test_packed_rows_round_trip():
    from fastclip.models.packed import PackedRows
    lengths = torch.tensor([3, 1, 4])
    rows = PackedRows.from_lengths(lengths, 4, int(lengths.sum()))
    padded = torch.arange(1, 13, dtype=torch.float).view(3, 4, 1)
    packed = rows.pack(padded)
    assert rows.size == 9 and packed.shape == (9, 1)  # 8 real tokens, filler to a multiple of the batch (3)
    assert packed[:rows.total].squeeze(1).tolist() == [1, 2, 3, 5, 9, 10, 11, 12]
    assert rows.starts.tolist() == [0, 3, 4]
    back = rows.unpack(packed).squeeze(-1)
    assert back.tolist() == [[1, 2, 3, 0], [5, 0, 0, 0], [9, 10, 11, 12]]


def test_image_layout_errors_name_the_key():
    with pytest.raises(ValueError, match="boundary.image_layout='jagged'"):
        task_for("boundary=gumbel", "boundary.apply_to=[image]", "boundary.image_layout=jagged")
    from fastclip.models.vision import DTPImageTower
    packed = task_for("boundary=gumbel", "boundary.apply_to=[image]", "boundary.image_layout=packed",
                      "boundary.image_buckets=4").model
    assert packed.visual.buckets == "auto"  # a grid's key the packed job does not read: run off (placement_unread)
    with pytest.raises(ValueError, match="boundary.image_buckets=4 applies to boundary.image_layout=padded"):
        DTPImageTower(packed.visual.vit, packed.image_method, 1, layout="packed", buckets=4)  # a direct caller's
    from open_clip.transformer import ResidualAttentionBlock
    from fastclip.models.packed import check_packable

    class Custom(ResidualAttentionBlock):
        pass
    with pytest.raises(ValueError, match="image_layout=packed needs open_clip ResidualAttentionBlocks"):
        check_packable(Custom(32, 2))
    with pytest.raises(ValueError, match="cross-attention"):
        check_packable(ResidualAttentionBlock(32, 2, is_cross_attention=True))


def test_image_buckets_auto_follows_the_device_and_bad_values_are_named():
    """auto: buckets where compute bounds the step (CPU), one padded batch on CUDA, where each
    bucket's extra kernel launches cost more than the padding they save (bench-gpu)."""
    tower = task_for("boundary=gumbel", "boundary.apply_to=[image]", "boundary.image_buckets=auto").model.visual
    assert tower._bucket_count(torch.device("cpu")) == 4 and tower._bucket_count(torch.device("cuda")) == 1
    assert task_for("boundary=gumbel", "boundary.apply_to=[image]", "boundary.image_layout=padded",
                    "boundary.image_buckets=3").model.visual._bucket_count(torch.device("cuda")) == 3
    for bad in ("0", "many"):
        with pytest.raises(ValueError, match=f"boundary.image_buckets={bad!r}" if bad == "many" else "image_buckets=0"):
            task_for("boundary=gumbel", "boundary.apply_to=[image]", f"boundary.image_buckets={bad}")


def test_text_entropy_spike_sets_no_target_on_the_last_byte_of_a_full_context():
    """The text tower's entropy_spike targets come from an auxiliary next-byte head; the context's
    last byte has no next byte in view, so it gets no target (its padded logits, zeros, would read as
    uniform: the highest entropy, a spike on every caption that fills the context). The other bytes'
    targets are the spikes of the head's entropies."""
    from fastclip.models.boundaries import entropy_spikes
    from fastclip.models.charlm import causal_mask
    task = task_for("boundary=entropy_spike", "boundary.apply_to=[text]", "boundary.text_tokens=bytes")
    tower = task.model.text.train()  # the head and its targets are training's
    tokens = task.tokenizer(["a photo of a cat " * 8, "a dog"])  # the first fills the 64-byte context
    assert (tokens[0] != 0).all() and (tokens[1] == 0).any()
    with torch.no_grad():
        out = tower(tokens)
        x = tower.embed(tokens) + tower.pos[:tokens.shape[1]]
        for block in tower.pre:
            x = block(x, attn_mask=causal_mask(64, x.device))
        spikes = entropy_spikes(tower.next_char(x[:, :-1]), tower.method.window) * out.token_mask[:, :-1]
    assert out.boundary_targets[0, -1] == 0
    torch.testing.assert_close(out.boundary_targets[:, :-1], spikes)


def test_clip_runs_the_text_tower_before_the_image_tower():
    """The DTP image tower's one host sync then waits on text work already queued on the GPU,
    instead of the text tower being launched after it behind an idle GPU."""
    task = task_for("boundary=gumbel", "boundary.apply_to=[image]")
    model, order = task.model, []
    model.text.register_forward_pre_hook(lambda *_: order.append("text"))
    model.visual.register_forward_pre_hook(lambda *_: order.append("image"))
    model(torch.randn(2, 3, 32, 32), task.tokenizer(["a cat", "two dogs"]))
    assert order == ["text", "image"]


def test_contrastive_loss_reaches_both_predictors():
    """... under either straight-through sign (boundary.pooling_grad), which both towers take:
    the same data, weights and noise give the same loss and different predictor gradients."""
    grads = {}
    for sign in ("paper", "leave"):
        task = task_for("boundary=gumbel", "boundary.loss_weight=0", "trainer.batch_size=16",
                        f"boundary.pooling_grad={sign}")
        task.model.train()
        torch.manual_seed(0)
        loss, _, _ = task.loss(next(iter(task.train_batches(0))))
        loss.backward()
        for tower in (task.model.visual, task.model.text):
            assert tower.method.pooling_grad == sign
            grad = tower.predictor.mlp[0].weight.grad
            assert grad is not None and grad.abs().sum() > 0, type(tower).__name__
        grads[sign] = (loss.item(), [t.predictor.mlp[0].weight.grad for t in (task.model.visual, task.model.text)])
    assert grads["paper"][0] == pytest.approx(grads["leave"][0])
    for paper, leave in zip(grads["paper"][1], grads["leave"][1]):
        assert not torch.allclose(paper, leave)


def test_gumbel_image_rate_follows_the_prior_after_short_training():
    """The prior holds the SAMPLED hard boundaries at its rate (the seed's soft-boundary loss stuck
    near 0.17 whatever the target), and the achieved rate at evaluation (eval_rule=auto ->
    expected_count for a CLIP tower) follows it too. Thresholding instead would give ~no
    boundary at all this early (the predictor is not confident yet): asserted as the contrast."""
    task = task_for("boundary=gumbel", "boundary.prior=0.25", "boundary.apply_to=[image]",
                    "encoder.vision.patch_size=4", "trainer.batch_size=64")
    opt = torch.optim.AdamW(task.model.parameters(), lr=5e-4)
    for batch in task.train_batches(0):  # one epoch: 22 steps
        loss, _, _ = task.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    images, _ = task.eval_batch()
    task.model.train()
    with torch.no_grad():
        sampled = task.model.visual(images).boundaries
    rate = float(sampled.mean())
    assert abs(rate - 0.25) <= 0.25 * 0.25, rate
    task.model.eval()
    with torch.no_grad():
        out = task.model.visual(images)
    achieved = float(out.segments.sum() / out.tokens.sum())  # segments per patch = 1 / compression
    assert abs(achieved - 0.25) <= 0.25 * 0.25, achieved
    task.model.visual.method.eval_rule = "threshold"
    with torch.no_grad():
        assert float(task.model.visual(images).boundaries.mean()) < 0.1


def test_dtp_vit_fixed_4_flops_match_the_analytic_count():
    # narrow and long (64 patches of width 32): attention is ~25% of a full-length layer, so a
    # counter that missed it (torch's has no formula for the CPU attention kernel) fails here
    geometry = ["encoder.vision.width=32", "encoder.vision.head_width=16", "encoder.vision.layers=3",
                "encoder.vision.patch_size=4", "encoder.embed_dim=64"]
    task = task_for("boundary=fixed", "boundary.k=4", "boundary.apply_to=[image]", *geometry)
    images, _ = task.eval_batch(8)
    gflops, _ = count_gflops(task.model.visual, images)
    N, D, E, P, k = 64, 32, 64, 4, 4
    def layer(S):  # qkv + out proj + 4x MLP (24 S D^2) and attention scores + mixing (4 S^2 D)
        return 24 * S * D * D + 4 * S * S * D
    analytic = (2 * N * 3 * P * P * D          # patch embedding
                + layer(N + 1)                 # one pre-layer at full length (class token + 64 patches)
                + 2 * (N // k) * N * D         # segment-mean pooling
                + 2 * layer(N // k + 1)        # two shortened layers on class token + 16 segments
                + 2 * D * E) / 1e9             # projection
    assert gflops == pytest.approx(analytic, rel=0.05)
    vanilla = task_for("boundary=none", *geometry)
    assert count_gflops(vanilla.model.visual, images)[0] == pytest.approx(
        (2 * N * 3 * P * P * D + 3 * layer(N + 1) + 2 * D * E) / 1e9, rel=0.05)
    v_gflops, _ = count_gflops(vanilla.model.visual, images)
    assert gflops < 0.75 * v_gflops


def test_flops_follow_the_boundaries_actually_produced():
    """Failure mode 4: FLOPs from simulated evenly spaced boundaries instead of the real ones."""
    task = task_for("boundary=gumbel", "boundary.apply_to=[image]")
    images, tokens = task.eval_batch(16)
    predictor_bias = task.model.visual.predictor.mlp[-1].bias
    with torch.no_grad():
        predictor_bias.fill_(-50.0)  # no boundaries: one segment per image
    few = tower_efficiency(task.model, images, tokens)
    with torch.no_grad():
        predictor_bias.fill_(50.0)   # every patch closes a segment
    many = tower_efficiency(task.model, images, tokens)
    assert few["efficiency/compression_image"] == 16.0 and many["efficiency/compression_image"] == 1.0
    assert few["efficiency/image_gflops"] < 0.8 * many["efficiency/image_gflops"]


def test_run_logs_efficiency_params_and_boundary_pictures(tmp_path, store):
    import mlflow
    from fastclip.train import run
    # image_start=stride: a multirun's key for its gumbel jobs; this fixed job runs without it and says so
    cfg = compose_cfg(TINY_CLIP + [f"tracking.uri={store}", "boundary=fixed", "epochs=1", "trainer.max_steps=2",
                                   "boundary.image_start=stride"])
    metrics = run(cfg, tmp_path / "run")
    client = mlflow.MlflowClient(tracking_uri=store)
    r = client.get_run(metrics["mlflow_run_id"])
    assert r.data.tags["fastclip.unread_keys"] == \
        "boundary.image_start=stride (only boundary=gumbel reads it, not boundary=fixed)"
    assert r.data.metrics["efficiency/compression_image"] == 4.0
    assert "efficiency/image_gflops" in r.data.metrics and int(r.data.params["model.params_image"]) > 0
    pictures = [a.path for a in client.list_artifacts(r.info.run_id, "boundaries")]
    assert pictures == ["boundaries/eval_001.png"]


def test_predictor_width_is_configurable_and_its_flops_are_counted():
    from fastclip.eval.efficiency import count_gflops
    images = None
    gflops = {}
    for ratio in (4, 1):
        task = task_for("boundary=gumbel", "boundary.apply_to=[image]", f"boundary.predictor_ratio={ratio}")
        tower = task.model.visual.eval()
        width = tower.vit.conv1.out_channels
        assert tower.predictor.mlp[0].out_features == ratio * width
        torch.nn.init.zeros_(tower.predictor.mlp[-1].weight)  # the same boundaries for both: the bias alone
        images = task.eval_batch(8)[0] if images is None else images
        gflops[ratio] = count_gflops(tower, images)[0]
    n_patches = tower.vit.grid_size[0] * tower.vit.grid_size[1]
    saved = 2 * n_patches * (3 * width) * (width + 1) / 1e9  # 3d fewer hidden units: d in, 1 out, 2 FLOPs per MAC
    assert gflops[4] - gflops[1] == pytest.approx(saved, rel=0.05)


def test_row_breaks_close_a_segment_at_every_patch_grid_row_end():
    """image_row_breaks: segments follow the raster order but never wrap from one row's end to the
    next row's start; in training and under every eval rule; the prior sees the forced boundaries;
    a rule without a predictor is refused."""
    task = task_for("boundary=gumbel", "boundary.apply_to=[image]", "boundary.image_row_breaks=true",
                    "boundary.prior=0.1")
    tower = task.model.visual
    width = tower.vit.grid_size[1]
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for rule in ("expected_count", "threshold", "sample"):
        tower.method.eval_rule = rule
        tower.eval()
        with torch.no_grad():
            out = tower(images)
        assert (out.boundaries[:, width - 1::width] == 1).all(), rule
    tower.train()
    out = tower(images)
    assert (out.boundaries[:, width - 1::width] == 1).all()
    assert (out.segments >= tower.vit.grid_size[0]).all()
    (out.embedding.sum() + task.model.image_method.aux_loss(out.boundary_logits, out.boundaries)).backward()
    assert tower.predictor.mlp[0].weight.grad.abs().sum() > 0
    from fastclip.models.vision import DTPImageTower
    fixed = task_for("boundary=fixed", "boundary.apply_to=[image]", "boundary.image_row_breaks=true").model
    assert not fixed.visual.row_breaks  # a multirun's key fixed does not read: run off (schema READS)
    with pytest.raises(ValueError, match="boundary.image_row_breaks=true needs learned boundaries"):
        DTPImageTower(fixed.visual.vit, fixed.image_method, 1, row_breaks=True)  # a direct caller's


def _cells(order, rows, cols):
    return [divmod(i, cols) for i in patch_order(order, rows, cols).tolist()]


@pytest.mark.parametrize("rows,cols", [(8, 8), (16, 16), (14, 14), (4, 6)])
def test_hilbert_order_steps_to_neighbours_and_groups_squares(rows, cols):
    """Every patch once; on a power-of-two square every step goes to a neighbouring patch; on any
    even grid each aligned run of 4 is a 2x2 square (what fixed k=4 pools)."""
    cells = _cells("hilbert", rows, cols)
    assert sorted(cells) == [(r, c) for r in range(rows) for c in range(cols)]
    steps = [abs(r1 - r0) + abs(c1 - c0) for (r0, c0), (r1, c1) in zip(cells, cells[1:])]
    if rows == cols and rows & (rows - 1) == 0:
        assert set(steps) == {1}
    for i in range(0, len(cells), 4):
        run = cells[i:i + 4]
        assert {(r // 2, c // 2) for r, c in run} == {(run[0][0] // 2, run[0][1] // 2)}, run
    assert patch_order("raster", rows, cols) is None
    with pytest.raises(ValueError, match="boundary.image_order='zigzag': expected one of raster, hilbert"):
        patch_order("zigzag", rows, cols)


def test_hilbert_order_pools_2x2_squares_and_draws_them_in_place(monkeypatch):
    """image_order=hilbert with fixed k=4: each segment is the mean of one 2x2 square of the
    pre-layers' patch features, and the boundary picture puts each segment back on its square."""
    task = task_for("boundary=fixed", "boundary.k=4", "boundary.apply_to=[image]", "encoder.vision.patch_size=4",
                    "boundary.image_order=hilbert")
    tower = task.model.visual.eval()
    rows, cols = tower.vit.grid_size
    pooled = record_calls(monkeypatch, vision, "downsample")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tower(images)
        x = tower.vit._embeds(images)
        for block in tower.vit.transformer.resblocks[:tower.pre_layers]:
            x = block(x)
    grid = x[:, 1:].reshape(3, rows, cols, -1)
    squares = grid.reshape(3, rows // 2, 2, cols // 2, 2, -1).mean((2, 4))  # [B, rows/2, cols/2, D]
    cells = _cells("hilbert", rows, cols)
    for j in range(rows * cols // 4):
        r, c = cells[4 * j]
        torch.testing.assert_close(pooled[0][2][0][:, j], squares[:, r // 2, c // 2])
    assert out.segments.tolist() == [rows * cols / 4] * 3
    seg = segment_grid(out.boundaries[0], rows, cols, out.scan)
    assert (seg == seg[::2, ::2].repeat(2, 0).repeat(2, 1)).all()  # one id per 2x2 square
    assert len(set(seg.ravel().tolist())) == rows * cols // 4
    hilbert = task_for("boundary=gumbel", "boundary.apply_to=[image]", "boundary.image_row_breaks=true",
                       "boundary.image_order=hilbert").model
    assert not hilbert.visual.row_breaks  # a grid's key a hilbert job does not read: run off (placement_unread)
    from fastclip.models.vision import DTPImageTower
    with pytest.raises(ValueError, match="boundary.image_row_breaks=true forces breaks at raster row ends"):
        DTPImageTower(hilbert.visual.vit, hilbert.image_method, 1, row_breaks=True, order="hilbert")


def test_random_offset_shifts_each_rows_grid_in_training_and_evaluates_on_the_grid():
    """boundary.random_offset: in training every row's fixed-k grid is shifted by its own offset, drawn
    afresh each forward (every offset 0..k-1 appears; segments k long but the first and last); the
    tower trains on them, with the boundaries the rows really got counted; evaluation is the grid."""
    from fastclip.models.boundaries import Fixed, every_kth
    from fastclip.models.dtp import segment_counts
    method, T, k = Fixed(4, random_offset=True), 64, 4
    order = torch.arange(T).expand(256, T)
    torch.manual_seed(0)
    first, second = method.boundaries(None, order), method.boundaries(None, order)
    assert not torch.equal(first, second)  # drawn again each step
    offsets = set()
    for row in first:
        ends = row.nonzero().squeeze(1)
        offset = (k - 1 - int(ends[0])) % k
        offsets.add(offset)
        assert torch.equal(row.bool(), (torch.arange(T) + 1 + offset) % k == 0)
        lengths = torch.diff(torch.cat([torch.tensor([-1]), ends, torch.tensor([T - 1])]))
        lengths = lengths[lengths > 0]
        assert (lengths[1:-1] == k).all() and int(lengths.sum()) == T
    assert offsets == {0, 1, 2, 3}
    counts = segment_counts(first)
    assert set(counts.tolist()) == {16, 17} and method.static_segments(T) is None
    method.eval()
    assert torch.equal(method.boundaries(None, order), every_kth(T, k).float().expand(256, T))
    assert method.static_segments(T) == 16
    task = task_for("boundary=fixed", "boundary.apply_to=[image]", "boundary.image_order=hilbert",
                    "boundary.random_offset=true", "encoder.vision.patch_size=4")
    images, _ = task.eval_batch(32)
    task.model.train()
    out = task.model.visual(images)
    out.embedding.sum().backward()
    assert set(out.segments.tolist()) <= {16.0, 17.0} and out.segments.max() == 17
    assert torch.equal(out.segments.long(), segment_counts(out.boundaries))
    task.model.eval()
    with torch.no_grad():
        assert (task.model.visual(images).segments == 16).all()
    plain = task_for("boundary=fixed", "boundary.apply_to=[image]", "boundary.image_order=hilbert",
                     "encoder.vision.patch_size=4")
    plain.model.load_state_dict(task.model.state_dict())
    plain.model.eval()
    with torch.no_grad():  # the offset is training's only: the same weights evaluate as the plain grid's
        assert torch.equal(plain.model.visual(images).embedding, task.model.visual(images).embedding)


def test_stride_start_begins_at_fixed_k_and_learns_from_there():
    """image_start=stride: before training, the learned tower's eval boundaries are fixed k's, so
    with the same ViT weights it gives fixed k=4's embeddings; training samples about the prior's
    rate around them, and the task's gradient reaches the per-position logits."""
    fixed = task_for("boundary=fixed", "boundary.k=4", "boundary.apply_to=[image]").model.visual.eval()
    task = task_for("boundary=gumbel", "boundary.prior=0.25", "boundary.apply_to=[image]",
                    "boundary.image_start=stride")
    tower = task.model.visual
    tower.vit.load_state_dict(fixed.vit.state_dict())
    torch.nn.init.zeros_(tower.predictor.mlp[-1].weight)  # the predictor's content term: 0 at this check
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = fixed(images)
        for rule in ("expected_count", "threshold"):
            tower.method.eval_rule = rule
            got = tower.eval()(images)
            assert torch.equal(got.boundaries, want.boundaries), rule
            torch.testing.assert_close(got.embedding, want.embedding)
        assert tower_efficiency(task.model, images[:8], task.tokenizer(["a cat"] * 8),
                                unpadded_samples=0)["boundary/image_on_stride"] == 1.0
    tower.train()
    out = tower(images)
    assert 0.2 < out.boundaries.mean().item() < 0.3
    assert not torch.equal(out.boundaries, want.boundaries)  # sampled: it can move
    out.embedding.square().sum().backward()
    assert tower.position_logits.grad.abs().sum() > 0
    from fastclip.models.vision import DTPImageTower
    fixed = task_for("boundary=fixed", "boundary.apply_to=[image]", "boundary.image_start=stride").model
    assert fixed.visual.stride_k is None  # a multirun's key fixed does not read: run off (schema READS)
    with pytest.raises(ValueError, match="boundary.image_start=stride starts learned boundaries"):
        DTPImageTower(fixed.visual.vit, fixed.image_method, 1, start="stride")  # a direct caller's
    with pytest.raises(ValueError, match="boundary.image_start='grid': expected prior or stride"):
        task_for("boundary=gumbel", "boundary.apply_to=[image]", "boundary.image_start=grid")



def test_random_offset_shifts_a_learned_towers_stride_start_per_row_in_training_only():
    """boundary.random_offset with boundary=gumbel, image_start=stride: in training each row's
    per-position logits are the stride start shifted by its own offset 0..k-1 (fixed's shifted grid:
    high where (t + 1 + offset) % k == 0), drawn afresh each forward, the gradient reaching the one
    shared parameter; evaluation adds them unshifted, so the same weights evaluate as a plain
    stride-start tower's. Without the stride start there is nothing to shift: refused, naming both keys."""
    from fastclip.checks import ConfigError
    stride = ["boundary=gumbel", "boundary.prior=0.25", "boundary.apply_to=[image]", "boundary.image_start=stride",
              "boundary.image_order=hilbert", "encoder.vision.patch_size=4"]
    task = task_for(*stride, "boundary.random_offset=true")
    tower, k = task.model.visual.train(), 4
    n = tower.position_logits.numel()
    torch.manual_seed(0)
    first, second = tower._positions(256, n, "cpu"), tower._positions(256, n, "cpu")
    assert first.shape == (256, n) and not torch.equal(first, second)
    offsets = set()
    for row in first:
        on = row > 0
        offset = next(o for o in range(k) if torch.equal(on, (torch.arange(n) + 1 + o) % k == 0))
        offsets.add(offset)
        assert torch.equal(row, tower.position_logits[(torch.arange(n) + offset) % n])
    assert offsets == {0, 1, 2, 3}
    images, _ = task.eval_batch(16)
    tower(images).embedding.square().sum().backward()
    assert tower.position_logits.grad.abs().sum() > 0
    tower.eval()
    assert torch.equal(tower._positions(256, n, "cpu"), tower.position_logits)
    plain = task_for(*stride)
    plain.model.load_state_dict(task.model.state_dict())
    with torch.no_grad():
        assert torch.equal(plain.model.visual.eval()(images).embedding, tower(images).embedding)
    # a grid's key a job does not read (Gumbel.READ_WHEN: image_start=stride with an image tower): run off,
    # named by the job (schema.unread), refused on a command line where no job reads it
    prior = task_for("boundary=gumbel", "boundary.apply_to=[image]", "boundary.random_offset=true")
    assert not prior.model.visual.shift_start
    from fastclip.override_checks import check_override_keys
    from fastclip.schema.unread import unread_keys
    text = ["boundary=gumbel", "boundary.apply_to=[text]", "boundary.image_start=stride", "boundary.random_offset=true"]
    assert unread_keys(compose_cfg(text))["boundary.random_offset=true"] == \
        "only boundary.image_start=stride and image in boundary.apply_to reads it, not boundary.apply_to=[text]"
    with pytest.raises(ConfigError, match=r"boundary.random_offset=true: no job reads it \(only boundary.image_start="
                                          r"stride and image in boundary.apply_to reads it, not boundary.image_start=prior"):
        check_override_keys(["boundary=gumbel", "boundary.apply_to=[image]", "boundary.random_offset=true"])
    check_override_keys(["-m", *text[:1], "boundary.apply_to=[image],[text]", *text[2:]])
    # a multirun's char LM job meets the conditions on paper, yet reads no placement key to meet them with
    lm = unread_keys(compose_cfg(["task=lm", "boundary=gumbel", *text[2:]]))
    assert lm["boundary.random_offset=true"].startswith("it needs boundary.image_start, which this job does not read")

def segmentation_reading_task(follows_image: bool):
    """A DTP image tower (16 patches) whose embedding reads its segmentation: identity blocks (zero
    output projections), no LayerNorms, patch features = the patch's mean colour (dims 0-2) + a large
    random position code (dims 16-31), the mean over segments of their means, a projection keeping
    both. follows_image: a boundary where a patch is lit (the predictor reads the colour dims); else
    positions only (stride start, the predictor's output weight zeroed): every image's boundaries on
    every 4th patch, whatever it shows."""
    start = [] if follows_image else ["boundary.image_start=stride"]
    task = task_for("boundary=gumbel", "boundary.prior=0.25", "boundary.apply_to=[image]",
                    "boundary.image_pool=mean", *start)
    tower = task.model.visual.eval()
    vit = tower.vit
    with torch.no_grad():
        vit.ln_pre, vit.ln_post = torch.nn.Identity(), torch.nn.Identity()
        for block in vit.transformer.resblocks:
            for p in (*block.attn.out_proj.parameters(), *block.mlp.c_proj.parameters()):
                p.zero_()
        vit.class_embedding.zero_()
        vit.positional_embedding.zero_()
        vit.positional_embedding[:, 16:] = 3 * torch.randn(17, 16, generator=torch.Generator().manual_seed(0))
        vit.conv1.weight.zero_()
        for c in range(3):
            vit.conv1.weight[c, c] = 1 / 64  # feature c: the 8x8 patch's mean of colour channel c
        vit.proj.zero_()
        vit.proj[:3, :3], vit.proj[16:, 16:] = torch.eye(3), torch.eye(16)
        first, last = tower.predictor.mlp[0], tower.predictor.mlp[-1]
        first.weight.zero_()
        first.bias.zero_()
        first.weight[0, :3] = 1.0  # hidden unit 0: the patch's brightness
        last.weight.zero_()
        if follows_image:  # lit: 20 x GELU(1) - 8 = +8.8, dark: -8 (expected_count keeps the lit patch)
            last.weight[0, 0] = 20.0
            last.bias.fill_(-8.0)
    return task


def lit_patch_images():
    """4 classes x 4 images in class order (as an image-folder evaluation set comes): class c lights
    patch (1, 5, 9, 12)[c] of the 4x4 grid in its own colour; the rest is black."""
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0]])
    data = []
    for c, patch in enumerate((1, 5, 9, 12)):
        image = torch.zeros(3, 32, 32)
        row, col = divmod(patch, 4)
        image[:, 8 * row:8 * row + 8, 8 * col:8 * col + 8] = colours[c][:, None, None]
        data += [(image, c)] * 4
    return data


@pytest.mark.parametrize("follows_image", [False, True])
def test_placement_gain_is_zero_for_image_independent_boundaries_and_positive_for_content_ones(
        follows_image, monkeypatch):
    """eval.placement_control through the real zero-shot loop (batches of 5, 5, 5, 1; the classifier
    stubbed to the class means of the learned embeddings, so learned top-1 is 1). Boundaries that
    ignore the image: swapping them between images changes nothing, gain exactly 0 (the retired
    control, which shuffled the logits over the positions, moved them and reported a gain). Boundaries
    that follow the content: an image scored with another image's is right only when the donor is of
    its class, so the swapped top-1 is the derangement's same-class share, and the gain positive."""
    from fastclip.eval import zeroshot
    from fastclip.models.placement import derangement, placement_control
    task, data = segmentation_reading_task(follows_image), lit_patch_images()
    images, labels = torch.stack([x for x, _ in data]), torch.tensor([y for _, y in data])
    with torch.no_grad():
        emb = task.model.encode_image(images, normalize=True)
    centroids = torch.nn.functional.normalize(torch.stack([emb[labels == c].mean(0) for c in range(4)]), dim=-1)
    monkeypatch.setattr(zeroshot, "build_zero_shot_classifier", lambda *a, **k: centroids.T)

    def top1():
        return zeroshot.zero_shot_eval(task.model, task.tokenizer, data, list("abcd"), ["{}"], CPU, batch_size=5)["top1"]

    learned, swapped = placement_control(task.model.visual, top1)
    assert learned == 1.0
    if follows_image:
        same_class = (labels[derangement(16, seed=0)] == labels).float().mean().item()
        assert swapped == pytest.approx(same_class) and learned - swapped > 0.5
    else:
        assert swapped == learned


def test_placement_control_lends_each_image_another_images_boundaries():
    """eval.placement_control: a pass as learned, then a pass with each image pooled at another
    image's logits (a seeded derangement over the whole set, across batches): every image gets exactly
    its donor's boundaries, so the set keeps its segment counts (as a multiset) and the forced row
    ends; the tower is itself again afterwards; the final eval reports both top-1s' difference."""
    from fastclip.models.boundaries import every_kth
    from fastclip.models.placement import derangement, placement_control
    images = torch.randn(13, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for row_breaks in ("false", "true"):
        task = task_for("boundary=gumbel", "boundary.prior=0.25", "boundary.apply_to=[image]",
                        f"boundary.image_row_breaks={row_breaks}", "eval.placement_control=true")
        tower = task.model.visual.eval()
        passes = []

        def top1(n=13):  # one pass in batches of 5, 5, 3
            outs = [tower(images[i:min(i + 5, n)]) for i in range(0, n, 5)]
            passes.append({k: torch.cat([getattr(out, k) for out in outs]) for k in ("boundaries", "segments")})
            return 0.0
        with torch.no_grad():
            torch.nn.init.normal_(tower.predictor.mlp[-1].weight, std=1.0)  # content-dependent logits
            placement_control(tower, top1, seed=3)
            after = tower(images)
        learned, swapped = passes
        donor = derangement(13, seed=3)
        assert (donor != torch.arange(13)).all()
        assert torch.equal(swapped["boundaries"], learned["boundaries"][donor])
        assert not torch.equal(swapped["boundaries"], learned["boundaries"])
        assert sorted(swapped["segments"].tolist()) == sorted(learned["segments"].tolist())
        assert torch.equal(after.boundaries, learned["boundaries"]) and tower.placement is None
        if row_breaks == "true":
            n, width = swapped["boundaries"].shape[1], tower.vit.grid_size[1]
            assert swapped["boundaries"][:, every_kth(n, width)].all()
    with torch.no_grad():
        with pytest.raises(ValueError, match="needs at least 2, got 1"):
            placement_control(tower, lambda: top1(n=1))
        sizes = iter([10, 13])
        with pytest.raises(RuntimeError, match="are not the learned pass's"):
            placement_control(tower, lambda: top1(n=next(sizes)))
    assert tower.placement is None
    final = task.final_evaluate()
    top1 = task.quality()["zeroshot/top1"]  # the test split's, as the control's
    assert final["zeroshot/top1"] == pytest.approx(top1)
    assert 0 <= final["zeroshot/top1_shuffled_placement"] <= 1
    assert final["zeroshot/top1_placement_gain"] == pytest.approx(top1 - final["zeroshot/top1_shuffled_placement"])
    plain = task_for("boundary=gumbel", "boundary.apply_to=[image]").final_evaluate()
    # the control is off by default (the final evaluation also measures efficiency/* on the test images)
    assert {k for k in plain if k.startswith("zeroshot/")} == {"zeroshot/top1", "zeroshot/top5", "zeroshot/classes"}
    with pytest.raises(ValueError, match="eval.placement_control=true compares learned image boundaries"):
        task_for("boundary=fixed", "boundary.apply_to=[image]", "eval.placement_control=true")


def test_on_grid_share_counts_boundaries_where_fixed_k_puts_them():
    b = torch.zeros(2, 9)
    b[0, [1, 3, 8]] = 1   # index 3 is on a k=4 stride, 1 is not, 8 (the last) is left out
    b[1, [3, 7]] = 1      # both on
    assert on_grid_share(b, 4) == 0.75
    assert on_grid_share(b, 2) == 1.0  # k=2: odd indices, all of them
    assert on_grid_share(b, 3) == 0.0  # k=3: indices 2 and 5, none of them
    assert on_grid_share(torch.zeros(1, 5), 4) == 1.0  # no boundary: nothing off the grid


def test_a_stride_start_tower_logs_its_share_on_its_own_start_grid_beside_fixed_ks_at_its_compression():
    from fastclip.models.boundaries import every_kth
    """image_on_stride measures at k = round(compression); a stride start at k=5 (prior 0.2) whose
    boundaries moved to every 4th patch has left its own grid, which only image_on_start_stride shows."""
    task = task_for("boundary=gumbel", "boundary.prior=0.2", "boundary.apply_to=[image]", "boundary.image_start=stride")
    tower = task.model.visual.eval()
    torch.nn.init.zeros_(tower.predictor.mlp[-1].weight)  # the predictor's content term: 0 at this check
    images, tokens = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), task.tokenizer(["a"] * 8)
    assert tower.stride_k == 5
    at_start = tower_efficiency(task.model, images, tokens, unpadded_samples=0)
    assert at_start["boundary/image_on_start_stride"] == 1.0
    with torch.no_grad():  # the boundaries move to fixed k=4's grid
        n = tower.position_logits.numel()
        tower.position_logits.copy_(torch.where(every_kth(n, 4), 5.0, -5.0))
    moved = tower_efficiency(task.model, images, tokens, unpadded_samples=0)
    assert round(moved["efficiency/compression_image"]) == 4 and moved["boundary/image_on_stride"] == 1.0
    assert moved["boundary/image_on_start_stride"] < 0.3  # every 20th patch is on both grids
    plain = task_for("boundary=gumbel", "boundary.apply_to=[image]").model
    assert "boundary/image_on_start_stride" not in tower_efficiency(plain, images, tokens, unpadded_samples=0)


@pytest.mark.parametrize("boundary", ["fixed", "gumbel"])
def test_packed_text_tower_matches_padded_and_spends_less(boundary):
    """text_layout=packed (the default): the shortened text blocks on every caption's segments end to
    end give the padded layout's embeddings and gradients, an empty caption included, for less work."""
    captions = ["a cat", "", "two red buses parked by a long wall", "dogs"]
    out, flops = {}, {}
    for layout in ("padded", "packed"):
        task = task_for(f"boundary={boundary}", "boundary.apply_to=[text]", f"boundary.text_layout={layout}",
                        "boundary.text_tokens=bytes")
        tower = task.model.text.eval()
        tokens = task.tokenizer(captions)
        tower_out = tower(tokens)
        tower_out.embedding.square().sum().backward()
        out[layout] = (tower_out.embedding, tower_out.segments, tower.embed.weight.grad,
                       tower.short[-1].mlp.c_fc.weight.grad)
        with torch.no_grad():
            flops[layout], _ = count_gflops(tower, tokens)
    assert out["padded"][1].min() == 0 and out["padded"][1].max() > 3
    for a, b in zip(out["padded"], out["packed"]):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert flops["packed"] < flops["padded"]


@pytest.mark.parametrize("tokens,rule", [("bpe", "threshold"), ("bytes", "threshold"), ("bpe", "sample")])
def test_the_unpadded_count_is_each_samples_own_over_the_whole_eval_batch(tokens, rule):
    """efficiency/*_gflops_unpadded: the mean of every eval-batch sample run alone (the samples of
    *_gflops, so the two differ by the padding alone), counting one sample of each (tokens, segments)
    pair: the same number as counting all 64, exactly. eval_rule=sample draws a sample's boundaries
    alone otherwise than in the batch: there every sample is counted."""
    from fastclip.eval.efficiency import tower_efficiency, unpadded_gflops
    task = task_for("boundary=gumbel", f"boundary.text_tokens={tokens}", f"boundary.eval_rule={rule}")
    model = task.model.eval()
    for tower in (model.visual, model.text):  # predictors that fire on some tokens and not on others
        torch.nn.init.normal_(tower.predictor.mlp[-1].weight, std=2.0)
    images, texts = task.eval_batch()
    assert len(images) == 64
    logged = tower_efficiency(model, images, texts)
    with torch.no_grad():
        for name, tower, inputs in (("image", model.visual, images), ("text", model.text, texts)):
            assert len(set(tower(inputs).segments.tolist())) > 1  # samples differ: a real grouping
            every = sum(count_gflops(tower, inputs[i:i + 1])[0] for i in range(64)) / 64
            assert logged[f"efficiency/{name}_gflops_unpadded"] == pytest.approx(every, rel=1e-12)
            assert unpadded_gflops(tower, inputs, 64) == pytest.approx(every, rel=1e-12)
