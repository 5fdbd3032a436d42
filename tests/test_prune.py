"""compression=prune: the sparsity reached, masks that hold through optimizer steps and act where the
weights are read (MultiheadAttention's in_proj_weight and out_proj.weight included), structured pruning
that really shrinks the matrices and still trains, the schedules, resume, and the run's metrics."""
import mlflow
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY_CLIP, compose_cfg
from fastclip.checks import ConfigError, check_config
from fastclip.compression.attention import ProjectedAttention
from fastclip.compression.prune import Pruner
from fastclip.compression.prune_masks import (blocks, prunable_weights, shrunk_copy, structured_masks,
                                              unstructured_masks, weight_sparsity)
from test_compression import tiny


def prune_cfg(**kw):
    base = dict(name="prune", sparsity=0.5, structure="unstructured", schedule="oneshot", finetune_steps=0,
                start_step=None, prune_every=None)
    return OmegaConf.create({**base, **kw})


def batch(tokenizer, n=6):
    texts = ["a red square", "a blue one", "the digit seven", "a cat", "two dogs", "nothing at all"][:n]
    return torch.randn(n, 3, 32, 32), tokenizer(texts)


def clip_loss(out):
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("boundary", ["none", "fixed"])
def test_unstructured_pruning_reaches_the_target_and_its_zeros_hold_through_optimizer_steps(boundary):
    torch.manual_seed(0)
    model, tokenizer = tiny(boundary)
    model.train()
    pruner = Pruner(model, prune_cfg(sparsity=0.5), total_steps=4, warmup_steps=0)
    pruner.after_step(4)  # the oneshot point: finetune_steps=0 prunes after the last step
    assert weight_sparsity(model) == pytest.approx(0.5, abs=0.01)
    names = set(pruner.masks)
    assert any(n.endswith("attn.in_proj_weight") for n in names) and any(n.endswith("out_proj.weight") for n in names)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    params = dict(model.named_parameters())
    for _ in range(3):
        images, tokens = batch(tokenizer)
        clip_loss(model(images, tokens)).backward()
        optimizer.step()
        moved = sum(int(params[n][~m].ne(0).sum()) for n, m in pruner.masks.items())
        assert moved > 0  # the optimizer does move pruned weights (momentum, their gradients) ...
        optimizer.zero_grad()
        pruner.after_step(4)
        for name, mask in pruner.masks.items():  # ... and the masks put them back to zero
            assert params[name][~mask].eq(0).all(), name
    assert weight_sparsity(model) == pytest.approx(0.5, abs=0.01)


def test_the_masks_act_where_multihead_attention_reads_its_weights():
    """pytorch#69353: MultiheadAttention reads out_proj.weight (and in_proj_weight) directly, so a
    torch.nn.utils.prune hook on out_proj never runs; the pruned model's attention must compute with
    the pruned weights."""
    torch.manual_seed(0)
    model, _ = tiny("none")
    attn = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    dense_in, dense_out = attn.in_proj_weight.detach().clone(), attn.out_proj.weight.detach().clone()
    pruner = Pruner(model, prune_cfg(sparsity=0.6), total_steps=1, warmup_steps=0)
    pruner.after_step(1)
    name = next(n for n, m in model.named_modules() if m is attn)
    in_mask, out_mask = pruner.masks[f"{name}.in_proj_weight"], pruner.masks[f"{name}.out_proj.weight"]
    assert (~in_mask).any() and (~out_mask).any()
    x = torch.randn(2, 5, attn.embed_dim)

    def attention(w_in, w_out):
        return F.multi_head_attention_forward(
            x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), attn.embed_dim, attn.num_heads, w_in,
            attn.in_proj_bias, None, None, False, 0.0, w_out, attn.out_proj.bias, training=False,
            need_weights=False)[0].transpose(0, 1)
    with torch.no_grad():
        got = attn(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(got, attention(dense_in * in_mask, dense_out * out_mask), atol=1e-6, rtol=0)
        assert not torch.allclose(got, attention(dense_in, dense_out), atol=1e-3)


def test_structured_pruning_removes_heads_and_channels_and_the_shrunk_model_computes_the_same_and_trains():
    torch.manual_seed(0)
    model, tokenizer = tiny("none")  # image blocks: 4 heads of 32; text blocks: 2 heads of 64; MLP 512
    pruner = Pruner(model, prune_cfg(sparsity=0.5, structure="structured"), total_steps=1, warmup_steps=0)
    pruner.after_step(1)
    shrunk = shrunk_copy(model).eval()
    model.eval()
    heads = {}
    for name, block in blocks(model).items():
        h, hd = block.attn.num_heads, block.attn.embed_dim // block.attn.num_heads
        heads[name] = h
        heads_alive = block.attn.in_proj_weight.view(3, h, hd, -1).ne(0).flatten(2).any(-1).any(0)
        assert int(heads_alive.sum()) == h - h // 2  # half the heads pruned
        assert int(block.mlp.c_fc.weight.ne(0).any(1).sum()) == 256  # and half the channels
    small = {name: block for name, block in blocks(shrunk).items()} or {
        n: m for n, m in shrunk.named_modules() if hasattr(m, "attn") and hasattr(m, "mlp")}
    assert set(small) == set(heads)
    for name, block in small.items():
        a = block.attn
        assert isinstance(a, ProjectedAttention) and a.num_heads == heads[name] // 2
        assert a.in_proj.weight.shape == (3 * 64, 128) and a.out_proj.weight.shape == (128, 64)  # half of 384, 128
        assert block.mlp.c_fc.weight.shape == (256, 128) and block.mlp.c_proj.weight.shape == (128, 256)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(p.numel() for p in model.parameters())
    images, tokens = batch(tokenizer)
    with torch.no_grad():
        masked, small = model(images, tokens), shrunk(images, tokens)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(small[key], masked[key], atol=1e-5, rtol=0)
    shrunk.train()
    optimizer = torch.optim.AdamW(shrunk.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):  # the same batch: a model that trains fits it
        loss = clip_loss(shrunk(images, tokens))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_shrunk_copy_is_built_on_the_gpu():
    model, tokenizer = tiny("fixed")
    model.cuda()
    Pruner(model, prune_cfg(sparsity=0.5, structure="structured"), total_steps=1, warmup_steps=0).after_step(1)
    images, tokens = batch(tokenizer, 4)
    with torch.no_grad():
        out = shrunk_copy(model).eval()(images.cuda(), tokens.cuda())
    assert out["image_features"].is_cuda


@pytest.mark.parametrize("boundary", [["fixed"], ["gumbel", "boundary.text_layout=padded",
                                                  "boundary.image_layout=padded"], ["tome"]])
def test_the_shrunk_model_computes_the_masked_ones_results_through_dtp_and_tome(boundary):
    """DTP's packed rows read the attention weights directly; its padded rows' masks and ToMe's size
    bias are built per head (the text tower's for the head count it was built with)."""
    torch.manual_seed(0)
    model, tokenizer = tiny(*boundary)
    Pruner(model, prune_cfg(sparsity=0.5, structure="structured"), total_steps=1, warmup_steps=0).after_step(1)
    model.eval()
    images, tokens = batch(tokenizer, 4)
    with torch.no_grad():
        masked, small = model(images, tokens), shrunk_copy(model).eval()(images, tokens)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(small[key], masked[key], atol=1e-5, rtol=0)


def test_unstructured_masks_prune_exactly_the_smallest_magnitudes_over_the_whole_model():
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(12.).view(3, 4) - 5.5)  # |w|: 5.5 4.5 ... 0.5 ... 5.5
        model[1].weight.copy_(torch.tensor([[0.25, -9.0, 1.0], [7.0, -0.75, 3.0]]))
    masks = unstructured_masks(model, 5 / 18)
    weights = prunable_weights(model)
    kept = torch.cat([w[masks[n]].abs() for n, w in weights.items()])
    pruned = torch.cat([w[~masks[n]].abs() for n, w in weights.items()])
    assert len(pruned) == 5 and pruned.max() < kept.min()
    assert sorted(pruned.tolist()) == [0.25, 0.5, 0.5, 0.75, 1.0]


def test_predictors_are_not_pruned():
    model, _ = tiny("gumbel")
    names = set(prunable_weights(model))
    assert names and not any("predictor" in n for n in names)
    assert any("predictor" in n for n, _ in model.named_parameters())
    assert not any("predictor" in n for n in structured_masks(model, 0.5))


def test_the_gradual_schedule_is_zhu_and_guptas_cubic_ramp():
    model, _ = tiny("none")
    pruner = Pruner(model, prune_cfg(sparsity=0.8, schedule="gradual", finetune_steps=20, prune_every=10),
                    total_steps=120, warmup_steps=0)
    assert (pruner.start, pruner.end) == (0, 100)
    for step in (0, 9, 10, 55, 99):
        t = step // 10 * 10
        assert pruner.target(step) == pytest.approx(0.8 * (1 - (1 - t / 100) ** 3))
    assert pruner.target(100) == pruner.target(120) == 0.8
    targets = [pruner.target(s) for s in range(121)]
    assert all(a <= b for a, b in zip(targets, targets[1:]))
    oneshot = Pruner(model, prune_cfg(sparsity=0.8, finetune_steps=0.25), total_steps=120, warmup_steps=10)
    assert [oneshot.target(s) for s in (0, 89, 90, 120)] == [0.0, 0.0, 0.8, 0.8]


def test_a_resumed_run_holds_the_same_masks_and_clipping_ignores_pruned_gradients(tmp_path, monkeypatch):
    """Through the Trainer's checkpoint round trip: the masks come back, and they act on weights that
    an optimizer step moved (the loaded pruned entries are zeroed again)."""
    from fastclip.loop import Trainer
    from fastclip.tasks.clip import ClipTask
    cfg = compose_cfg([*TINY_CLIP, "compression=prune", "compression.structure=unstructured", "trainer.max_steps=3",
                       "compression.finetune_steps=2", "trainer.warmup_steps=0", "trainer.batch_size=16"])
    task = ClipTask(cfg, torch.device("cpu"), tmp_path)
    trainer = Trainer(task, cfg, torch.device("cpu"))
    batch = next(iter(task.train_batches(0)))
    trainer.forward_backward(batch)
    trainer.step(16)  # step 1 = total - finetune_steps: pruned here
    assert trainer.compression.pruner.applied == 0.5
    norms = []  # the clipping sees no pruned weight's gradient (it would scale down the surviving ones; a structured
    # pruning gives them none anyway: a removed head or channel has no path to the loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, c: norms.append(
        [p.grad.clone() for p in dict(task.model.named_parameters()).values()]) or torch.tensor(0.0))
    trainer.forward_backward(batch)
    trainer.step(16)
    grads = dict(zip(dict(task.model.named_parameters()), norms[0]))
    assert all(grads[name][~mask].eq(0).all() for name, mask in trainer.compression.pruner.masks.items())
    state = trainer.state_dict()
    moved = {k: v + 0.01 for k, v in state["model"].items()}  # pruned entries no longer zero
    again = Trainer(ClipTask(cfg, torch.device("cpu"), tmp_path), cfg, torch.device("cpu"))
    again.load_state_dict({**state, "model": moved, "config": state.get("config") or {"trainer": {"lr": cfg.trainer.lr}}})
    assert again.compression.pruner.applied == 0.5 and set(again.compression.pruner.masks) == set(trainer.compression.pruner.masks)
    params = dict(again.model.named_parameters())
    for name, mask in trainer.compression.pruner.masks.items():
        assert torch.equal(again.compression.pruner.masks[name], mask)
        assert params[name][~mask].eq(0).all() and params[name][mask].ne(0).all(), name


def test_a_oneshot_prunes_twin_is_the_model_at_its_pruning_step_and_the_console_says_so():
    """The zero-shot before a oneshot pruning is of a model that trained `finetune_steps` fewer steps
    than the run: it is kept as *_before_prune with its step, never as a dense twin, and the console
    names the step (a pruned model that fine-tuned past it reads as no gain from pruning)."""
    from fastclip.compression.prune import Pruning
    from fastclip.train import final_line
    model, _ = tiny("none")
    asked = []
    pruner = Pruner(model, prune_cfg(finetune_steps=2), total_steps=10, warmup_steps=0,
                    quality_before=lambda: asked.append(1) or {"zeroshot/top1": 0.137})
    for step in range(1, 11):
        pruner.after_step(step)
    assert asked == [1] and pruner.before_prune == {"zeroshot/top1": 0.137} and pruner.before_prune_step == 8
    again = Pruner(model, prune_cfg(finetune_steps=2), total_steps=10, warmup_steps=0)
    again.load_state_dict(pruner.state_dict())
    assert (again.before_prune, again.before_prune_step) == ({"zeroshot/top1": 0.137}, 8)
    old = {k: v for k, v in pruner.state_dict().items() if not k.startswith("before_prune")}
    again.load_state_dict({**old, "dense": {"zeroshot/top1": 0.2}})  # a checkpoint from before the rename
    assert (again.before_prune, again.before_prune_step) == ({"zeroshot/top1": 0.2}, None)
    metrics = {"zeroshot/top1": 0.178, "zeroshot/top1_before_prune": 0.137, "compression/before_prune_step": 8.0,
               "compression/sparsity": 0.5}
    assert final_line("zeroshot/top1", metrics) == "final zeroshot/top1 = 0.1780 (before pruning, at step 8: 0.1370)"
    summary = Pruning(prune_cfg(), None).summary(metrics)
    assert "zeroshot/top1 0.178 (before pruning, at step 8: 0.137)" in summary and "dense" not in summary


def test_each_evaluation_of_a_structured_prune_counts_the_flops_of_the_layout_its_summary_reports(tmp_path):
    """Once heads and channels are pruned, every evaluation's efficiency/*_gflops is the shrunk
    layout's, as the final summary's is, with the dense layout's beside it as *_gflops_dense (before
    pruning, the two are the same)."""
    from fastclip.compression.prune import compress
    from fastclip.loop import Trainer
    from fastclip.tasks.clip import ClipTask
    cfg = compose_cfg([*TINY_CLIP, "compression=prune", "compression.structure=structured", "trainer.max_steps=3",
                       "compression.finetune_steps=2", "trainer.warmup_steps=0", "trainer.batch_size=16",
                       "eval.boundary_picture=false"])
    task = ClipTask(cfg, torch.device("cpu"), tmp_path)
    trainer = Trainer(task, cfg, torch.device("cpu"))
    before = task.evaluate()
    assert before["efficiency/image_gflops"] == pytest.approx(before["efficiency/image_gflops_dense"], rel=1e-6)
    assert before["efficiency/text_gflops"] == pytest.approx(before["efficiency/text_gflops_dense"], rel=1e-6)
    batch = next(iter(task.train_batches(0)))
    trainer.forward_backward(batch)
    trainer.step(16)  # step 1 = total - finetune_steps: pruned here
    assert trainer.compression.pruner.applied == 0.5
    after = task.evaluate()
    for tower in ("image", "text"):
        assert after[f"efficiency/{tower}_gflops"] < 0.9 * after[f"efficiency/{tower}_gflops_dense"], tower
        assert after[f"efficiency/{tower}_gflops_dense"] == pytest.approx(before[f"efficiency/{tower}_gflops"])
    summary = compress(task, cfg, trainer.compression.pruner, after, trainer.state.step)
    for key in ("efficiency/image_gflops", "efficiency/text_gflops", "efficiency/image_gflops_dense",
                "efficiency/text_gflops_dense"):
        assert after[key] == pytest.approx(summary[key], rel=1e-9), key
    assert task.model.training  # the evaluation's shrunk copy leaves the model's mode as it was


def test_gradual_masks_only_grow_and_reach_the_target():
    torch.manual_seed(0)
    model, tokenizer = tiny("none")
    pruner = Pruner(model, prune_cfg(sparsity=0.6, schedule="gradual", finetune_steps=2, prune_every=2),
                    total_steps=10, warmup_steps=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    previous = {}
    for step in range(1, 11):
        images, tokens = batch(tokenizer)
        clip_loss(model(images, tokens)).backward()
        pruner.mask_gradients()
        optimizer.step()
        optimizer.zero_grad()
        pruner.after_step(step)
        for name, mask in previous.items():  # what was pruned stays pruned as the ramp climbs
            assert not (pruner.masks[name] & ~mask).any(), (step, name)
        previous = {k: v.clone() for k, v in pruner.masks.items()}
        assert weight_sparsity(model) == pytest.approx(pruner.target(step), abs=0.01)
    assert weight_sparsity(model) == pytest.approx(0.6, abs=0.01)


def test_prune_options_are_checked_before_training():
    for value in ("1.0", "-0.1", "1.5"):
        with pytest.raises(ConfigError, match=f"compression.sparsity={value}"):
            check_config(compose_cfg(["compression=prune", f"compression.sparsity={value}"]))
    with pytest.raises(ConfigError, match="compression.structure='channels'"):
        check_config(compose_cfg(["compression=prune", "compression.structure=channels"]))
    with pytest.raises(ConfigError, match="compression.schedule='cubic'"):
        check_config(compose_cfg(["compression=prune", "compression.schedule=cubic"]))
    with pytest.raises(ConfigError, match="compression=prune with task=lm"):
        check_config(compose_cfg(["task=lm", "compression=prune"]))
    model, _ = tiny("none")
    with pytest.raises(ConfigError, match="compression.finetune_steps=50 leaves no steps"):
        Pruner(model, prune_cfg(finetune_steps=50), total_steps=50, warmup_steps=0)
    for key, value in (("prune_every", "0"), ("finetune_steps", "-1"), ("finetune_steps", "many"), ("start_step", "-2")):
        with pytest.raises(ConfigError, match=f"compression.{key}={value}"):
            check_config(compose_cfg(["compression=prune", f"compression.{key}={value}"]))
    for value in (50, 60):  # known before the data
        with pytest.raises(ConfigError, match=f"compression.finetune_steps={value} leaves no steps"):
            check_config(compose_cfg(["compression=prune", f"compression.finetune_steps={value}", "trainer.max_steps=50"]))
    # a gradual ramp with no steps is named by the key that leaves it none, before the data
    gradual = ["compression=prune", "compression.schedule=gradual", "trainer.max_steps=10"]
    with pytest.raises(ConfigError, match=r"compression.start_step=0.9 leaves the gradual ramp no steps: it would "
                                          r"start at step 9 \(start_step\) and end at step 8 of 10"):
        check_config(compose_cfg([*gradual, "compression.start_step=0.9"]))
    with pytest.raises(ConfigError, match=r"compression.prune_every=50 is at least the ramp's 7 steps \(from step 1 "
                                          r"to 8\): the gradual schedule would prune once"):
        check_config(compose_cfg([*gradual, "compression.prune_every=50"]))
    check_config(compose_cfg([*gradual, "compression.prune_every=3"]))
    # gradual's own keys under oneshot do nothing: refused on the command line unless a job is gradual
    from fastclip.override_checks import check_override_keys
    for key in ("start_step=0.3", "prune_every=5"):
        with pytest.raises(ConfigError, match=rf"compression.{key}: no job reads it \(only compression.schedule="
                                              rf"gradual reads it, not compression.schedule=oneshot\)"):
            check_override_keys(["compression=prune", f"compression.{key}"])
        check_override_keys(["-m", "compression=prune", "compression.schedule=oneshot,gradual", f"compression.{key}"])
    check_override_keys(["compression=prune", "compression.prune_every=${oc.env:EVERY,null}"])  # known once resolved
    check_override_keys(["compression=prune", "compression.schedule=${oc.env:S}", "compression.prune_every=5"])
    from fastclip.schema.unread import unread_keys  # the oneshot job of that multirun names it
    assert unread_keys(compose_cfg(["compression=prune", "compression.prune_every=5"])) == {
        "compression.prune_every=5": "only compression.schedule=gradual reads it, not compression.schedule=oneshot"}


def test_a_resume_that_lengthens_a_pruned_run_keeps_its_masks_and_its_before_prune_numbers():
    """Lengthening re-plans `end` later, where the schedule's target is lower than what the checkpoint's
    steps pruned (a oneshot: 0): the masks once went, the weights grew back for the steps between, and
    the grown-back model was measured again as "before pruning". The masks never fall below those held."""
    model, _ = tiny("none")
    measured = []
    quality = lambda: measured.append(1) or {"zeroshot/top1": 0.25 * len(measured)}  # noqa: E731
    short = Pruner(model, prune_cfg(finetune_steps=0.2), total_steps=20, warmup_steps=0, quality_before=quality)
    short.after_step(16)
    assert short.applied == 0.5 and short.before_prune_step == 16 and len(measured) == 1
    state = short.state_dict()
    for schedule in ("oneshot", "gradual"):
        longer = Pruner(model, prune_cfg(finetune_steps=0.2, schedule=schedule), total_steps=40, warmup_steps=0,
                        quality_before=quality)
        longer.load_state_dict(state)
        assert longer.end == 32 and longer.target(20) < 0.5
        for step in (20, 32, 40):
            longer.after_step(step)
            assert longer.applied == 0.5 and all(torch.equal(longer.masks[k], state["masks"][k]) for k in state["masks"])
        assert longer.before_prune == {"zeroshot/top1": 0.25} and longer.before_prune_step == 16 and len(measured) == 1


@pytest.mark.slow
@pytest.mark.parametrize("structure", ["unstructured", "structured", "late"])
def test_a_prune_run_logs_the_sparsity_it_reached_beside_the_dense_numbers(tmp_path, structure, monkeypatch):
    """late: the run ends at step 3, before its pruning step (4: a budget or the data ended it); the final
    masks are applied then, unfine-tuned, and its checkpoint holds them (it once kept the dense weights
    while the run reported 50% sparsity)."""
    from fastclip.loop import Trainer
    from fastclip.train import run
    late = structure == "late"
    if late:
        structure = "unstructured"
        monkeypatch.setattr(Trainer, "finished", lambda self: self.state.step >= 3)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_cfg([*TINY_CLIP, "compression=prune", f"compression.structure={structure}", "trainer.max_steps=6",
                       "compression.finetune_steps=2", "eval.boundary_picture=false", f"tracking.uri={store}"])
    metrics = run(cfg, tmp_path / "run")
    for key in ("zeroshot/top1", "zeroshot/top1_before_prune", "compression/before_prune_step", "compression/sparsity",
                "compression/params_nonzero", "compression/model_mb", "time/eval_batch_ms", "time/eval_batch_ms_dense"):
        assert key in metrics, key
    if structure == "unstructured":
        assert metrics["compression/sparsity"] == pytest.approx(0.5, abs=0.01)
        assert metrics["compression/model_mb"] == metrics["compression/model_mb_dense"]  # stored dense: no smaller
    else:  # 2 heads per block: round(0.5 x 2) = 1 pruned, so half the attention; half the MLP
        assert metrics["compression/sparsity"] >= 0.5
        assert metrics["compression/model_mb"] < metrics["compression/model_mb_dense"]
    assert metrics["compression/params_nonzero"] < metrics["compression/params_nonzero_dense"]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert "zeroshot/top1_dense" not in metrics  # the model before pruning trained 2 steps fewer: no dense twin
    assert metrics["compression/pruned_at_end"] == float(late)
    if late:  # the checkpoint's weights are the pruned ones the numbers are of
        from fastclip.inference import load
        assert weight_sparsity(load(tmp_path / "run" / "checkpoints" / "last.pt")[0]) == pytest.approx(
            metrics["compression/sparsity"]) == pytest.approx(0.5, abs=0.01)
        assert checkpoint["compression"]["applied"] == 0.5
        assert metrics["compression/before_prune_step"] == 3  # where it was pruned: the run's end, not step 4
        return
    assert metrics["compression/before_prune_step"] == 4
    assert checkpoint["compression"]["applied"] == 0.5 and checkpoint["compression"]["before_prune"]["zeroshot/top1"] == \
        pytest.approx(metrics["zeroshot/top1_before_prune"])
    run_data = mlflow.tracking.MlflowClient(store).get_run(metrics["mlflow_run_id"]).data
    assert run_data.metrics["compression/sparsity"] == pytest.approx(metrics["compression/sparsity"])


def test_a_lengthened_gradual_resume_ramps_from_the_checkpoints_warm_up_end_and_reads_a_version_2_checkpoint(tmp_path):
    """A gradual pruning ramp starts at the warm-up's end. A resume that lengthens the run keeps the
    checkpoint's warm-up (optim.Schedule.replanned), so the ramp keeps its start too (the option is
    re-planned on the resumed schedule), not one re-derived from the longer run. A version-2
    checkpoint, which kept the pruning state under `pruner`, resumes with its masks."""
    from fastclip import checkpoint
    from fastclip.loop import Trainer
    from fastclip.tasks.clip import ClipTask
    common = [*TINY_CLIP, "compression=prune", "compression.schedule=gradual", "compression.finetune_steps=0.2",
              "trainer.warmup_steps=0.1", "trainer.batch_size=16"]
    short = compose_cfg([*common, "trainer.max_steps=20"])
    trainer = Trainer(ClipTask(short, torch.device("cpu"), tmp_path), short, torch.device("cpu"))
    assert (trainer.warmup_steps, trainer.compression.pruner.start) == (2, 2)
    trainer.compression.pruner.after_step(16)  # the ramp's end: the target sparsity
    state = {**trainer.state_dict(), "config": {"trainer": {"lr": short.trainer.lr}}}
    longer = compose_cfg([*common, "trainer.max_steps=40"])
    again = Trainer(ClipTask(longer, torch.device("cpu"), tmp_path), longer, torch.device("cpu"))
    assert again.compression.pruner.start == 4  # before the checkpoint: planned from the longer run
    again.load_state_dict(state)
    assert again.warmup_steps == 2 and again.compression.pruner.start == 2 and again.compression.pruner.end == 32
    assert again.compression.pruner.applied == 0.5
    # a version-2 file: the same state under "pruner"
    legacy = {k: v for k, v in state.items() if k != "compression"} | {"pruner": state["compression"], "version": 2,
                                                                       "format": checkpoint.FORMAT}
    torch.save(legacy, tmp_path / "v2.pt")
    loaded = checkpoint.load(tmp_path / "v2.pt")
    assert "pruner" not in loaded and loaded["compression"]["applied"] == 0.5
    third = Trainer(ClipTask(short, torch.device("cpu"), tmp_path), short, torch.device("cpu"))
    third.load_state_dict(loaded)
    assert third.compression.pruner.applied == 0.5 and set(third.compression.pruner.masks) == set(state["compression"]["masks"])
