"""trainer.full_token_steps: the run's last steps train with every token reduction off, counted in its
compute, and the model just before the phase is measured as <name>_reduced (fastclip/loop/full_tokens.py)."""
import pytest
import torch

from conftest import TINY_CLIP, compose_cfg
from fastclip import runtime
from fastclip.checks import ConfigError, check_config
from fastclip.eval.efficiency import count_gflops
from fastclip.loop import Trainer, fit
from fastclip.models.clip import build_clip
from fastclip.tasks import build_task

CPU = torch.device("cpu")
REDUCTIONS = [["boundary=fixed"], ["boundary=gumbel"], ["boundary=entropy_spike"], ["boundary=patch_dropout"],
              ["boundary=tome"], ["boundary=evit"], ["boundary=lowres"]]


def model_for(*overrides):
    cfg = compose_cfg([*TINY_CLIP, *overrides, "boundary.apply_to=[image]"])
    torch.manual_seed(0)
    model, _ = build_clip(cfg.encoder, cfg.boundary)
    return model


@pytest.mark.parametrize("boundary", REDUCTIONS)
def test_the_full_token_phase_turns_each_image_reduction_off_at_the_vanilla_towers_cost(boundary):
    images = torch.randn(4, 3, 32, 32)
    model, vanilla = model_for(*boundary), model_for("boundary=none")
    model.train()
    reduced = model.visual(images)
    assert (reduced.segments < reduced.tokens).all() or boundary == ["boundary=gumbel"]  # (gumbel: a draw)
    model.set_full_tokens(True)
    assert model.full_tokens
    full = model.visual(images)
    assert torch.equal(full.segments, full.tokens) and full.tokens[0] == 16  # every patch of the 4 x 4 grid
    assert count_gflops(model.visual, images)[0] == pytest.approx(count_gflops(vanilla.visual, images)[0], rel=1e-12)
    # the same weights as the vanilla ViT they wrap, on every patch (open_clip's forward, in eval mode
    # where its patch dropout keeps every patch)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.visual(images).embedding, model.visual.vit(images), atol=1e-5)
    model.set_full_tokens(False)
    assert not model.full_tokens


@pytest.mark.parametrize("text_tokens, counts", [("bytes", [5.0, 13.0]), ("bpe", [4.0, 5.0])])
def test_a_dtp_text_tower_makes_every_token_its_own_segment(text_tokens, counts):
    """bytes: every byte; bpe: every BPE token (with start and end of text)."""
    cfg = compose_cfg([*TINY_CLIP, "boundary=gumbel", "boundary.apply_to=[text]", f"boundary.text_tokens={text_tokens}"]
                      + (["encoder.tokenizer=char"] if text_tokens == "bytes" else []))
    model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
    tokens = tokenizer(["a cat", "two red buses"])
    model.train()
    assert not torch.equal(model.text(tokens).segments, model.text(tokens).tokens)  # reduced: fewer segments
    model.set_full_tokens(True)
    out = model.text(tokens)
    assert torch.equal(out.segments, out.tokens) and out.tokens.tolist() == counts


@pytest.mark.slow
def test_a_run_ends_with_a_full_token_phase_counted_in_its_compute_and_logs_the_reduced_model(tmp_path):
    overrides = [*TINY_CLIP, "eval.boundary_picture=false", "trainer.batch_size=64", "trainer.max_steps=8"]
    runs = {}
    for name, extra in (("phase", ["boundary=fixed", "boundary.apply_to=[image]", "trainer.full_token_steps=3"]),
                        ("vanilla", ["boundary=none", "trainer.count_flops_every=1"])):
        cfg = compose_cfg([*overrides, *extra])
        check_config(cfg)
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
        runs[name] = (metrics, trainer, {step: m["efficiency/train_gflops"] for step, m in logged
                                         if "train/loss" in m and "efficiency/train_gflops" in m})
    metrics, trainer, per_step = runs["phase"]
    vanilla = runs["vanilla"][2]
    assert trainer.phase.start == 5 and task_model_full(trainer)
    from fastclip.run_lines import _phase_plan
    assert _phase_plan(trainer) == "; the last 3 steps at full tokens (trainer.full_token_steps), from step 5"
    assert _phase_plan(runs["vanilla"][1]) == ""
    assert sorted(per_step) == [1, 6]  # the run's first step, and the phase's: its cost changed, counted again
    assert per_step[1] < vanilla[1]  # reduced: cheaper than vanilla
    assert per_step[6] == pytest.approx(vanilla[6], rel=1e-12)  # the phase: vanilla's cost
    assert metrics["efficiency/train_pflops_total"] == pytest.approx((5 * per_step[1] + 3 * per_step[6]) * 64 / 1e6,
                                                                     rel=1e-9)
    # the run's cost a sample, where runs are compared: the mean over its steps, not the phase's last count
    assert metrics["efficiency/train_gflops_mean"] == pytest.approx((5 * per_step[1] + 3 * per_step[6]) / 8, rel=1e-9)
    assert metrics["efficiency/train_gflops"] == per_step[6] > metrics["efficiency/train_gflops_mean"]
    assert 0 <= metrics["zeroshot/top1_reduced"] <= 1 and "zeroshot/top1" in metrics
    assert metrics["efficiency/compression_image"] == 1.0  # the final evaluation at full tokens
    loaded_as_its_run_ended(tmp_path / "phase", metrics, runs["phase"][1])


def loaded_as_its_run_ended(run_dir, metrics, trainer):
    """fastclip.load of a run that ended in the phase gives the model at full tokens, as its final
    zeroshot/top1 was measured (the distillation teacher and fastclip.infer load through it); the
    train-fit score reads that model on the run's own training split, with the evaluation templates."""
    from fastclip.data.splits import ClipData
    from fastclip.eval.train_fit import training_images, training_top1
    from fastclip.eval.zeroshot import zero_shot_eval
    from fastclip.tasks.clip import build_clip_data
    from fastclip.infer import trained_on
    run, train = training_images(run_dir)
    assert run.model.full_tokens and "ended with a full-token fine-tune" in trained_on(run)
    data: ClipData = build_clip_data(run.config, run.preprocess, run.preprocess, run.tokenizer)
    test = data.zeroshot
    again = zero_shot_eval(run.model, run.tokenizer, test.images, test.classnames, test.templates, CPU,
                           run.config.eval.batch_size)
    assert again["top1"] == metrics["zeroshot/top1"]
    with torch.no_grad():  # the weights the run trained last, at full tokens (not the reduced model)
        x = test.images[0][0].unsqueeze(0)
        trainer.model.eval()
        assert torch.allclose(run.model.encode_image(x), trainer.model.encode_image(x), atol=1e-6)
    trained = trainer.task.data.train  # the images the run trained on (after its overlap checks)
    assert len(train.images) == len(trained) and (train.images.labels == trained.labels).all()
    assert all(a is b or a == b for a, b in zip(train.images.images, trained.images))
    assert train.templates == list(run.config.dataset.eval_templates) == test.templates
    assert training_top1(run_dir) == zero_shot_eval(run.model, run.tokenizer, train.images, train.classnames,
                                                     train.templates, CPU, run.config.eval.batch_size)["top1"]


def test_train_fit_refuses_a_run_without_class_labels(tmp_path, monkeypatch):
    """Zero-shot top-1 on the training images needs a class per image: a csv run's checkpoint is an
    InputError naming the dataset, before any image is read."""
    from fastclip import inference
    from fastclip.errors import InputError
    from fastclip.eval.train_fit import training_images

    class Loaded:
        config = compose_cfg([*TINY_CLIP, "dataset=csv", "dataset.path=captions.csv"])
    monkeypatch.setattr(inference, "load_run", lambda checkpoint, device: Loaded())
    with pytest.raises(InputError, match="dataset=csv has no class labels"):
        training_images(tmp_path / "last.pt")


def task_model_full(trainer) -> bool:
    return trainer.model.full_tokens


def test_a_full_token_phase_longer_than_the_run_or_outside_clip_is_refused():
    with pytest.raises(ConfigError, match=r"trainer.full_token_steps=20 is longer than the run \(trainer.max_steps=10\)"):
        check_config(compose_cfg(["boundary=fixed", "trainer.full_token_steps=20", "trainer.max_steps=10"]))
    with pytest.raises(ConfigError, match="trainer.full_token_steps=0.1 with task=lm"):
        check_config(compose_cfg(["task=lm", "trainer.full_token_steps=0.1"]))
    with pytest.raises(ConfigError, match="trainer.full_token_steps=-1: expected steps >= 0"):
        check_config(compose_cfg(["trainer.full_token_steps=-1"]))
    cfg = compose_cfg([*TINY_CLIP, "boundary=fixed", "trainer.full_token_steps=500", "epochs=1"])
    runtime.seed_everything(0)
    with pytest.raises(ConfigError, match="trainer.full_token_steps=500 is longer than the run"):
        Trainer(build_task(cfg, CPU, None), cfg, CPU)  # the run's length known once the data is read


@pytest.mark.parametrize("boundary", [["boundary=gumbel"], ["boundary=entropy_spike"]])
def test_in_the_phase_every_trained_parameter_still_gets_a_gradient_as_ddp_expects(boundary):
    """Data-parallel, DDP (find_unused_parameters=false) fails on a step where a parameter it was built
    with gets no gradient: the idle predictors and heads stay in the graph with a zero one."""
    cfg = compose_cfg([*TINY_CLIP, *boundary, "eval.boundary_picture=false", "trainer.batch_size=16"])
    runtime.seed_everything(0)
    task = build_task(cfg, CPU, None)
    task.model.set_full_tokens(True)
    out = task.loss(next(iter(task.train_batches(0))))
    out.loss.backward()
    missing = [name for name, p in task.model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    idle = [p for name, p in task.model.named_parameters() if "predictor" in name.split(".")]
    assert idle and all(p.grad.abs().sum() == 0 for p in idle)


@pytest.mark.slow
def test_a_run_resumed_inside_the_phase_ends_as_the_uninterrupted_one(tmp_path):
    """Stopped at step 6 of 8 (inside a 3-step phase) and resumed: the same compute, the same reduced
    measurement, the same final top-1 as the run that never stopped."""
    overrides = [*TINY_CLIP, "eval.boundary_picture=false", "trainer.batch_size=64", "trainer.max_steps=8",
                 "boundary=fixed", "boundary.apply_to=[image]", "trainer.full_token_steps=3"]
    cfg = compose_cfg(overrides)

    def trained(steps: int, state=None, run="whole"):
        runtime.seed_everything(0)
        task = build_task(cfg, CPU, tmp_path / run)
        trainer = Trainer(task, cfg, CPU)
        if state is not None:
            trainer.load_state_dict(state)
        trainer.total_steps_saved = trainer.total_steps
        if steps < trainer.total_steps:
            trainer.total_steps = steps  # stop early, as a SIGTERM after step `steps` would
            fit(task, cfg, None, tmp_path / run, CPU, trainer)
            trainer.total_steps = trainer.total_steps_saved
            return {**trainer.state_dict(), "config": {"trainer": {"lr": cfg.trainer.lr}}}
        return fit(task, cfg, None, tmp_path / run, CPU, trainer)
    whole = trained(8)
    part = trained(8, trained(6, run="first"), run="second")
    for key in ("efficiency/train_pflops_total", "zeroshot/top1_reduced", "zeroshot/top1"):
        assert part[key] == pytest.approx(whole[key], rel=1e-9), key
