"""The DTP character LM: causality for every method, gradients, achieved rates, honest BPC."""
import math

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from fastclip import runtime
from fastclip.data import text8, unigram
from fastclip.eval.bpc import evaluate_bpc, window_plan
from fastclip.models.boundaries import build_boundary_method
from fastclip.models.charlm import HourglassLM
from fastclip.models.outputs import CharLMOutput
from fastclip.tasks.lm import LMTask
from fastclip.train import run

TINY_LM = ["task=lm", "encoder.width=32", "encoder.heads=2", "task.context=64", "task.eval_stride=32",
           "trainer.batch_size=8", "trainer.progress=false"]
METHODS = ["none", "fixed", "whitespace", "gumbel", "entropy_spike", "unigram"]


def tiny_lm(boundary: str, **cfg_overrides):
    cfg = compose_cfg(TINY_LM + [f"boundary={boundary}"] + [f"{k}={v}" for k, v in cfg_overrides.items()])
    method = build_boundary_method(cfg.boundary, space_id=text8.SPACE_ID, causal=True)  # as LMTask builds it
    return HourglassLM(27, 32, 2, 4.0, 1, 2, 1, max_len=64, boundary=method)


@pytest.mark.parametrize("boundary", METHODS)
def test_changing_token_t_plus_1_leaves_outputs_up_to_t_unchanged(boundary):
    torch.manual_seed(0)
    model = tiny_lm(boundary).eval()
    if model.predictor is not None:  # make the predictor fire on some tokens and not on others
        torch.nn.init.normal_(model.predictor.mlp[-1].weight, std=2.0)
        torch.nn.init.zeros_(model.predictor.mlp[-1].bias)
    x = torch.tensor(text8.encode("the quick brown fox jumps over the lazy dog and then the cat ran off"[:64]).astype(np.int64))[None]
    base = model(x)
    if boundary != "none":
        n = int(base.boundaries.sum())
        assert 0 < n < 64, f"{boundary}: {n} boundaries; the test needs a mix"
    for t in (5, 20, 40, 62):
        changed = x.clone()
        changed[0, t + 1:] = (changed[0, t + 1:] + 7) % 27
        out = model(changed)
        torch.testing.assert_close(out.logits[0, :t + 1], base.logits[0, :t + 1], msg=f"{boundary} leaks at t={t}")


def test_lm_loss_alone_reaches_the_gumbel_predictor():
    torch.manual_seed(0)
    model = tiny_lm("gumbel").train()
    x = torch.tensor(text8.encode("the quick brown fox jumps over the lazy dog " * 2)[:64].astype(np.int64))[None]
    out = model(x)
    lm = torch.nn.functional.cross_entropy(out.logits[0, :-1], x[0, 1:])
    lm.backward()  # no boundary loss in this objective
    grad = model.predictor.mlp[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_task_objective_includes_the_boundary_loss():
    """Failure mode 1: the seed left the boundary loss out of the objective."""
    cfg = compose_cfg(TINY_LM + ["boundary=gumbel"])
    runtime.seed_everything(0)
    task = LMTask(cfg, torch.device("cpu"))
    batch = next(iter(task.train_batches(0)))
    runtime.seed_everything(1)
    total, extras, _ = task.loss(batch)
    weight = cfg.boundary.loss_weight
    assert weight > 0
    assert total.item() == pytest.approx(float(extras["bpc"]) * math.log(2) + weight * float(extras["boundary_loss"]),
                                         rel=1e-4)


def test_gumbel_achieved_rate_follows_the_prior_after_short_training():
    cfg = compose_cfg(TINY_LM + ["boundary=gumbel", "boundary.prior=0.2"])
    runtime.seed_everything(0)
    task = LMTask(cfg, torch.device("cpu"))
    opt = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    for i, batch in enumerate(task.train_batches(0)):
        loss, extras, _ = task.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 250:
            break
    task.model.eval()
    with torch.no_grad():
        x = torch.from_numpy(task.ids["valid"][:64 * 16].astype(np.int64)).view(16, 64)
        rate = task.model(x).boundaries.mean().item()
    assert abs(rate - 0.2) <= 0.25 * 0.2, rate


def test_fixed_k_reports_exactly_k_times_compression():
    """Failure mode 3: runs were labelled with the target rate, not the achieved one."""
    cfg = compose_cfg(TINY_LM + ["boundary=fixed", "boundary.k=4"])
    task = LMTask(cfg, torch.device("cpu"))
    assert task.evaluate()["efficiency/compression_text"] == pytest.approx(4.0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_encoder_dropout_reaches_every_transformer_block_as_the_papers_dropout_and_dropatt(dropout):
    """encoder.dropout once reached only the embeddings and the predictor: char_lm_paper's 12 blocks ran
    without the paper's dropout 0.1 and dropatt 0.1."""
    torch.manual_seed(0)
    model = HourglassLM(27, 32, 2, 4.0, 1, 2, 1, max_len=64, dropout=dropout)
    model.drop = torch.nn.Identity()  # the embeddings' dropout aside: what varies now is the blocks'
    tokens = torch.randint(0, 27, (2, 64))
    blocks = [*model.pre, *model.short, *model.post]
    assert [b.attn.dropout for b in blocks] == [dropout] * 4
    differs = not torch.equal(model.train()(tokens).logits, model(tokens).logits)
    assert differs == (dropout > 0)
    assert torch.equal(model.eval()(tokens).logits, model(tokens).logits)


def test_a_checkpoint_written_before_block_dropout_resumes_without_it(tmp_path):
    """A char_lm_paper run checkpointed before dropout reached the blocks: its config lacks
    encoder.block_dropout, and resuming it keeps its blocks dropout-free (the legacy value), so the run
    continues as it was trained; today's runs get it."""
    from omegaconf import OmegaConf
    from fastclip import checkpoint, resume
    cfg = compose_cfg(TINY_LM + ["boundary=fixed", "encoder.dropout=0.1"])
    assert cfg.encoder.block_dropout is True
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    del config["encoder"]["block_dropout"]
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    checkpoint.save(path, {"model": {}, "config": config, "train_state": {"step": 3, "epoch": 0},
                           "run_dir": str(path.parent.parent)})
    again = compose_cfg(TINY_LM + ["boundary=fixed", "encoder.dropout=0.1", f"trainer.resume={path}"])
    resumed = resume.prepare(again, [f"trainer.resume={path}"])
    assert resumed.config.encoder.block_dropout is False and not resumed.changes
    old, new = (LMTask(c, torch.device("cpu")).model for c in (resumed.config, cfg))
    assert [b.attn.dropout for b in old.pre] == [0.0] and [b.attn.dropout for b in new.pre] == [0.1]
    # a checkpoint from 9e98074 up to the key ran with it: the legacy value is a guess, a resume may say so
    stated = resume.prepare(again, [f"trainer.resume={path}", "encoder.block_dropout=true"])
    assert stated.config.encoder.block_dropout is True
    with pytest.raises(resume.ResumeError, match="encoder.dropout"):  # a frozen key still refuses a change
        resume.prepare(again, [f"trainer.resume={path}", "encoder.block_dropout=true", "encoder.dropout=0.2"])


def test_an_evaluation_whose_segments_collapsed_says_so(caplog):
    """An untrained gumbel predictor (as after a 20-step first try) thresholds to no boundary at
    evaluation: val/bpc then measures a model that hardly uses its shortened layers, and the run said
    nothing (efficiency/compression_text 64x beside train/compression ~4)."""
    import logging
    with caplog.at_level(logging.WARNING, logger="fastclip.tasks.lm"):
        untrained = LMTask(compose_cfg(TINY_LM + ["boundary=gumbel"]), torch.device("cpu")).evaluate()
    assert untrained["efficiency/compression_text"] >= 32
    assert "left ~1.0 segments per 64-char window at evaluation" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastclip.tasks.lm"):
        LMTask(compose_cfg(TINY_LM + ["boundary=fixed", "boundary.k=4"]), torch.device("cpu")).evaluate()
        LMTask(compose_cfg(TINY_LM + ["boundary=fixed", "boundary.k=64"]), torch.device("cpu")).evaluate()
    assert "segments per" not in caplog.text  # fixed k=64 gives 1 segment a window by design: no predictor to blame


def test_window_plan_scores_every_target_once_with_context():
    for n, context, stride in [(1000, 64, 32), (1000, 64, 64), (130, 64, 16), (50, 64, 32)]:
        seen = np.zeros(n, dtype=int)
        length = min(context, n)
        for start, first in window_plan(n, length, min(stride, length)):
            seen[start + first:start + length] += 1
            if start > 0:
                assert first >= length - stride  # at least context - stride chars of history
        assert (seen == 1).all()


def test_bpc_covers_the_whole_split_and_is_repeatable():
    cfg = compose_cfg(TINY_LM + ["boundary=gumbel"])
    task = LMTask(cfg, torch.device("cpu"))
    first = evaluate_bpc(task.model, task.ids["test"], 64, 32, torch.device("cpu"))
    second = evaluate_bpc(task.model, task.ids["test"], 64, 32, torch.device("cpu"))
    assert first == second
    assert first["chars"] == len(task.ids["test"]) - 1


def test_uniform_model_scores_log2_27_bits():
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return CharLMOutput(torch.zeros(*x.shape, 27), segments=torch.full((x.shape[0],), x.shape[1]))
    r = evaluate_bpc(Uniform(), text8.encode("hello world " * 50), 64, 16, torch.device("cpu"))
    assert r["bpc"] == pytest.approx(math.log2(27)) and r["compression"] == 1.0


def test_out_of_vocabulary_character_is_named_with_its_position(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("hello world and Then more")
    with pytest.raises(ValueError, match=r"character 'T' at position 16"):
        text8.load_text(str(bad))
    text, _ = text8.load_text(str(bad), clean=True)
    assert text == "hello world and then more"


def test_missing_dataset_path_is_named(tmp_path):
    cfg = compose_cfg(TINY_LM + [f"dataset.path={tmp_path}/nope.txt"])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        LMTask(cfg, torch.device("cpu"))


def test_text8_rule_and_dtp_split_proportions():
    assert text8.clean_to_text8("It's 42, Mr. Smith!") == "it s four two mr smith"
    train, valid, test = text8.split("a" * 1000, (0.9, 0.05, 0.05))
    assert (len(train), len(valid), len(test)) == (900, 50, 50)


def test_unigram_boundaries_are_piece_ends_and_cached(tmp_path):
    text = text8.default_text()[:60000]
    sp = unigram.train_or_load(text, 300, tmp_path)
    cached = list((tmp_path / "unigram").glob("*.model"))
    assert len(cached) == 1
    b = unigram.piece_end_boundaries(sp, text[:500])
    pieces = sp.encode(text[:500], out_type=str)
    ends = np.cumsum([len(p) for p in pieces]) - 1
    assert np.flatnonzero(b).tolist() == ends.tolist()
    assert 1.5 < len(b) / b.sum() < 10  # pieces are longer than chars and shorter than sentences
    mtime = cached[0].stat().st_mtime
    unigram.train_or_load(text, 300, tmp_path)
    assert cached[0].stat().st_mtime == mtime


def test_lm_run_logs_bpc_on_valid_and_whole_test(tmp_path, store):
    cfg = compose_cfg(TINY_LM + ["boundary=whitespace", f"tracking.uri={store}", "epochs=1",
                                 "trainer.max_steps=5", "trainer.warmup_steps=2"])
    metrics = run(cfg, tmp_path / "run")
    for key in ("val/bpc", "lm/test_bpc", "efficiency/compression_text", "throughput/train_samples_per_s"):
        assert key in metrics
    assert "lm/bpc" not in metrics  # per-epoch evaluation reads valid, under val/
    assert metrics["lm/test_chars"] == len(LMTask(cfg, torch.device("cpu")).ids["test"]) - 1
    assert 3.0 < metrics["efficiency/compression_text"] < 8.0  # words of English
    # eval.boundary_picture: the valid text as segmented, '|' after each space (whitespace boundaries)
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=store)
    assert [a.path for a in client.list_artifacts(metrics["mlflow_run_id"], "boundaries")] == ["boundaries/eval_001.txt"]
    text = (tmp_path / "run" / "boundaries" / "eval_001.txt").read_text().rstrip("\n")
    window = text8.decode(LMTask(cfg, torch.device("cpu")).ids["valid"][:64])
    assert text.replace("|", "") == window and text.count("|") == window.count(" ")
    assert all(text[i - 1] == " " for i, ch in enumerate(text) if ch == "|")


def test_lm_segmented_text_marks_where_each_segment_closes():
    task = LMTask(compose_cfg(TINY_LM + ["boundary=fixed", "boundary.k=4"]), torch.device("cpu"))
    window = text8.decode(task.ids["valid"][:64])
    assert task.segmented_text() == "|".join(window[i:i + 4] for i in range(0, 64, 4)) + "|"


def test_lm_warm_up_is_a_fraction_of_the_run_as_clips():
    """task=lm's warm-up scales with the run, as CLIP's: a 20-step try runs (an absolute 30-step
    warm-up failed it), and the default run on the built-in text keeps its 30 warm-up steps."""
    from fastclip.checks import check_config
    from fastclip.optim import warmup_steps
    from fastclip.tasks.lm import RandomWindows
    short = compose_cfg(["task=lm", "trainer.max_steps=20"])
    check_config(short)
    assert warmup_steps(short.trainer.warmup_steps, 20) == 2
    default = compose_cfg(["task=lm"])
    train, _, _ = text8.split(text8.load_text(None)[0], default.dataset.split)
    steps = RandomWindows.batches_in(len(train), default.task.context, default.trainer.batch_size) * default.epochs
    assert (steps, warmup_steps(default.trainer.warmup_steps, steps)) == (255, 30)
