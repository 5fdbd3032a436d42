"""Training compute, counted (fastclip/loop/compute.py): efficiency/train_gflops from real training steps
with the boundaries the model drew, efficiency/train_pflops_total, and trainer.max_pflops budgets."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY_CLIP, compose_cfg
from fastclip import runtime
from fastclip.checks import ConfigError, check_config
from fastclip.eval.efficiency import CPU_ATTENTION_FLOPS
from fastclip.loop import Trainer, fit
from fastclip.tasks import build_task

CPU = torch.device("cpu")
QUIET = [*TINY_CLIP, "eval.boundary_picture=false", "trainer.batch_size=64"]


def task_and_trainer(*overrides):
    cfg = compose_cfg([*QUIET, *overrides])
    runtime.seed_everything(0)
    task = build_task(cfg, CPU, None)
    return task, Trainer(task, cfg, CPU)


def counted_step_gflops(boundary: list[str]) -> tuple[float, float]:
    """(the Trainer's count of its first step, an independent FlopCounterMode pass over the same batch
    with the same random draws), GFLOPs per sample."""
    task, trainer = task_and_trainer(*boundary)
    batch = next(iter(task.train_batches(0)))
    with runtime.preserved_rng():
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as independent:
            out = task.loss(batch)
            out.loss.backward()
    task.model.zero_grad(set_to_none=True)
    assert trainer.compute.plan(trainer.state)  # the run's first step is always counted
    out = trainer.forward_backward(batch)
    trainer.step(out.samples)
    return trainer.state.train_gflops, independent.get_total_flops() / out.samples / 1e9


@pytest.mark.parametrize("boundary", [["boundary=none"], ["boundary=gumbel"]])
def test_a_counted_training_step_equals_an_independent_count_of_its_forward_and_backward(boundary):
    counted, independent = counted_step_gflops(boundary)
    assert counted == pytest.approx(independent, rel=1e-9) and counted > 0


def test_the_counted_training_compute_grows_with_the_segments_the_towers_keep():
    counts = [counted_step_gflops(["boundary=fixed", f"boundary.k={k}", "boundary.apply_to=[image]"])[0] for k in (8, 4, 2)]
    vanilla = counted_step_gflops(["boundary=none"])[0]
    assert counts[0] < counts[1] < counts[2]  # fewer tokens pooled away, more segments: more FLOPs
    assert counts[0] < vanilla


def short_run(tmp_path, name, *overrides):
    cfg = compose_cfg([*QUIET, "epochs=2", *overrides])
    runtime.seed_everything(0)
    task = build_task(cfg, CPU, tmp_path / name)
    trainer = Trainer(task, cfg, CPU)
    logged = []

    class Recorder:
        def log_metrics(self, metrics, step, flush=True):
            logged.append((step, dict(metrics)))

        def log_artifact(self, *args, **kwargs):
            pass

        def flush(self):
            pass
    metrics = fit(task, cfg, Recorder(), tmp_path / name, CPU, trainer)
    return metrics, trainer, logged


@pytest.mark.slow
def test_the_running_total_is_within_two_percent_of_counting_every_step_and_is_logged_with_the_loss(tmp_path):
    """Learned boundaries move while training: the total from a count per epoch stays within 2% of the
    total from a count of every step; both are logged beside train/loss at every step."""
    every, trainer, logged = short_run(tmp_path, "every", "boundary=gumbel", "trainer.count_flops_every=1")
    sampled, _, sampled_log = short_run(tmp_path, "sampled", "boundary=gumbel")
    steps = trainer.state.step
    assert steps == 2 * trainer.steps_per_epoch
    per_step = [m["efficiency/train_gflops"] for _, m in logged if "train/loss" in m]
    assert len(per_step) == steps  # every step counted in the first run
    samples = trainer.state.samples_seen / steps
    assert every["efficiency/train_pflops_total"] == pytest.approx(sum(per_step) * samples / 1e6, rel=1e-9)
    assert sampled["efficiency/train_pflops_total"] == pytest.approx(every["efficiency/train_pflops_total"], rel=0.02)
    counted = [step for step, m in sampled_log if "efficiency/train_gflops" in m and "train/loss" in m]
    assert counted == [1, trainer.steps_per_epoch + 1]  # the run's first step and each epoch's
    totals = [m["efficiency/train_pflops_total"] for _, m in sampled_log if "train/loss" in m]
    assert len(totals) == steps and totals == sorted(totals) and totals[0] > 0


@pytest.mark.slow
def test_a_run_under_max_pflops_stops_within_one_step_of_its_budget_whatever_its_epochs(tmp_path):
    """boundary=fixed costs the same every step: the budget of 13.5 steps' compute buys 14 steps, past
    the one epoch (10 steps) `epochs` would have given, and the run stops at the step that reaches it."""
    gflops, _ = counted_step_gflops(["boundary=fixed"])
    step_pflops = gflops * 64 / 1e6
    budget = 13.5 * step_pflops
    metrics, trainer, _ = short_run(tmp_path, "budget", "boundary=fixed", "epochs=1", f"trainer.max_pflops={budget!r}")
    assert trainer.total_steps == 14 and trainer.state.step == 14
    total = metrics["efficiency/train_pflops_total"]
    assert budget <= total < budget + step_pflops * 1.0001
    assert trainer.schedule.total == 14  # warm-up and cosine planned over the steps the budget buys


def test_the_budget_probe_prices_an_accumulated_step_as_the_step_counts_it(tmp_path):
    """trainer.max_pflops plans the run from a probe of its first step. Under accum_steps a contrastive
    step also embeds every micro-batch without gradients first; the probe once ran one micro-batch's
    loss and backward, under-pricing each step (1.34x at accum 2: more steps planned than the budget
    buys, the cosine cut short). It runs the step's own accumulate now: the count the step logs."""
    from fastclip.loop import probe_gflops
    cfg = compose_cfg([*QUIET, "boundary=fixed", "trainer.accum_steps=2", "trainer.batch_size=32", "epochs=1",
                       "trainer.max_steps=1", "trainer.warmup_steps=0"])
    runtime.seed_everything(0)
    task = build_task(cfg, CPU, tmp_path)
    trainer = Trainer(task, cfg, CPU)
    step, one_micro_batch = probe_gflops(task, None, CPU, 2), probe_gflops(task, None, CPU, 1)
    metrics = fit(task, cfg, None, tmp_path, CPU, trainer)
    assert step == pytest.approx(metrics["efficiency/train_gflops"], rel=1e-9)
    assert step > 1.2 * one_micro_batch


def test_max_pflops_is_refused_with_max_steps_and_when_not_positive():
    with pytest.raises(ConfigError, match="trainer.max_pflops=1.0 with trainer.max_steps=5: the budget decides"):
        check_config(compose_cfg(["trainer.max_pflops=1", "trainer.max_steps=5"]))
    with pytest.raises(ConfigError, match="trainer.max_pflops=0.0: expected a budget > 0"):
        check_config(compose_cfg(["trainer.max_pflops=0"]))


@pytest.mark.parametrize("encoder", ["vit_tiny", "vit_b32"])
def test_the_bpe_text_tower_runs_at_the_longest_caption_and_gives_the_padded_towers_embeddings(encoder):
    """The padding after EOT changes nothing under the causal mask: the tower trims it (exact within
    1e-5 of open_clip's padded forward) and its FLOPs follow the captions' lengths, not context_length."""
    from fastclip.eval.efficiency import count_gflops
    from fastclip.models.clip import build_clip
    cfg = compose_cfg([f"encoder={encoder}"])
    torch.manual_seed(0)
    model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
    model.eval()
    short = tokenizer(["a cat", "two dogs", "x"])
    longer = tokenizer(["a cat", "two red buses on a rainy street at night", "x"])
    for tokens in (short, longer):
        with torch.no_grad():
            assert torch.allclose(model.text(tokens).embedding, model.text.text(tokens), atol=1e-5)
        assert torch.equal(model.text(tokens).tokens, (tokens != 0).sum(1).float())
    trimmed_short, trimmed_long = count_gflops(model.text, short)[0], count_gflops(model.text, longer)[0]
    padded = count_gflops(model.text.text, short)[0]
    assert trimmed_short < trimmed_long <= padded
    if encoder == "vit_b32":  # 77 tokens of context, captions of a few: most of the padded cost was padding
        assert trimmed_short < 0.2 * padded


def test_the_longest_caption_is_the_same_read_on_the_cpu_and_on_a_device(monkeypatch):
    """CUDA's path (one device read) against the CPU's numpy path; one read where there were three."""
    from conftest import count_tensor_reads
    from fastclip.models.text import longest_caption, longest_caption_read
    for rows in ([[5, 3, 0, 0], [1, 0, 0, 0]], [[0, 0, 0]], [[1, 2, 3, 4]], [[0, 0, 7, 0], [0, 0, 0, 0]]):
        tokens = torch.tensor(rows)
        assert longest_caption_read(tokens) == longest_caption(tokens)
    reads = count_tensor_reads(monkeypatch)
    longest_caption_read(torch.tensor([[5, 3, 0, 0]]))
    assert sum(reads.values()) == 1, reads


@pytest.mark.parametrize("method,mode", [("fixed", "eval"), ("whitespace", "train"), ("gumbel", "eval"),
                                         ("entropy_spike", "train"), ("entropy_spike", "eval")])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_the_byte_text_tower_runs_at_the_longest_caption_and_gives_the_padded_towers_outputs(method, mode, layout,
                                                                                              monkeypatch):
    """boundary.text_tokens=bytes: the bytes after the longest caption change nothing (causal pre-layers,
    no boundary or segment on padding), so the tower trims them: embedding, boundaries, segment counts,
    entropy-spike targets and its next-byte loss equal the untrimmed run's within 1e-5, and the FLOPs
    follow the captions' lengths."""
    import fastclip.models.text as text_towers
    from fastclip.eval.efficiency import count_gflops
    from fastclip.models.clip import build_clip
    cfg = compose_cfg(TINY_CLIP + [f"boundary={method}", "boundary.apply_to=[text]", "boundary.text_tokens=bytes",
                                   f"boundary.text_layout={layout}", "encoder.text.context_length=64"])
    torch.manual_seed(0)
    model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
    tower = model.text.train(mode == "train")
    if tower.predictor is not None:  # a predictor that fires on some bytes and not on others
        torch.nn.init.normal_(tower.predictor.mlp[-1].weight, std=2.0)
        torch.nn.init.zeros_(tower.predictor.mlp[-1].bias)
    tokens = tokenizer(["a cat on a mat", "a red bus parked near the house", "x"])
    longest = 31
    assert int((tokens != 0).sum(1).max()) == longest < tokens.shape[1]
    with torch.no_grad():
        trimmed = tower(tokens)
        gflops_trimmed = count_gflops(tower, tokens)[0]
        monkeypatch.setattr(text_towers, "longest_caption", lambda rows, pad_id: rows.shape[1])  # as it ran before
        padded = tower(tokens)
        gflops_padded = count_gflops(tower, tokens)[0]
    assert trimmed.boundaries.shape == (3, longest) and padded.boundaries.shape == (3, 64)
    assert torch.equal(trimmed.boundaries, padded.boundaries[:, :longest]) and not padded.boundaries[:, longest:].any()
    assert torch.equal(trimmed.segments, padded.segments) and (trimmed.segments < trimmed.tokens).any()
    torch.testing.assert_close(trimmed.embedding, padded.embedding, atol=1e-5, rtol=1e-5)
    if method == "entropy_spike" and mode == "eval":  # a training objective: evaluation runs no next-byte head
        assert trimmed.boundary_targets is None and trimmed.auxiliary_loss is None
    elif method == "entropy_spike":
        assert torch.equal(trimmed.boundary_targets, padded.boundary_targets[:, :longest])
        assert not padded.boundary_targets[:, longest:].any()
        assert trimmed.boundary_targets[1, -1] == 1, "the longest caption's last byte: a spike with this init"
        torch.testing.assert_close(trimmed.auxiliary_loss, padded.auxiliary_loss, atol=1e-5, rtol=1e-5)
    assert gflops_trimmed < 0.6 * gflops_padded
    monkeypatch.undo()  # the trimming tower again
    full = tokenizer(["a caption much longer than the sixty-four bytes of context this tower reads at most"])
    with torch.no_grad():
        out = tower(full)  # nothing to trim: the context's last byte has no next byte in view
    assert out.boundaries.shape == (1, 64)
    if method == "entropy_spike" and mode == "train":
        assert not out.boundary_targets[:, -1].any()
