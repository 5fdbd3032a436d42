"""Contrastive gradient accumulation (tasks/accumulation.py) in one process: accum_steps=2 at batch 8
is batch 16's loss and gradients, and a gumbel DTP model draws the same boundaries in the pass
without gradients and the one with them. Two processes: tests/test_distributed.py."""
import pytest
import torch

from conftest import TINY_CLIP
from fastclip import runtime
from fastclip.config import compose_train_config
from fastclip.loop import Trainer
from fastclip.tasks import build_task

CPU = torch.device("cpu")


def _trainer(*overrides: str) -> Trainer:
    cfg = compose_train_config([*TINY_CLIP, *overrides])
    runtime.seed_everything(cfg.seed)
    return Trainer(build_task(cfg, CPU, None), cfg, CPU)


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("boundary", ["none", "fixed"])
def test_accum_2_at_batch_8_gives_the_loss_and_gradients_of_batch_16(boundary):
    whole = _trainer(f"boundary={boundary}", "trainer.batch_size=16")
    one = whole.forward_backward(next(iter(whole.task.train_batches(0))))
    split = _trainer(f"boundary={boundary}", "trainer.batch_size=8", "trainer.accum_steps=2")
    batches = iter(split.task.train_batches(0))
    outs = split.accumulate([next(batches), next(batches)])
    assert [o.samples for o in outs] == [8, 8]
    for out in outs:  # each micro-batch reports the step's contrastive loss (vanilla, fixed k: the whole loss)
        torch.testing.assert_close(out.metrics["contrastive_loss"], one.metrics["contrastive_loss"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.loss.detach(), one.loss.detach(), atol=1e-5, rtol=0)
    expected, got = _grads(whole.model), _grads(split.model)
    assert set(got) == set(expected) == {n for n, p in whole.model.named_parameters() if p.requires_grad}
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=0, msg=name)


def test_gumbel_boundaries_are_the_same_in_both_passes_of_a_micro_batch():
    trainer = _trainer("boundary=gumbel", "trainer.batch_size=8", "trainer.accum_steps=2")
    drawn = []
    trainer.model.register_forward_hook(lambda _m, _i, out: drawn.append(out["image_output"].boundaries.clone()))
    batches = iter(trainer.task.train_batches(0))
    step = [next(batches), next(batches)]
    before = torch.get_rng_state()
    trainer.accumulate(step)
    assert len(drawn) == 4  # without gradients: micro-batch 0, 1; with them: 0, 1
    assert torch.equal(drawn[0], drawn[2]) and torch.equal(drawn[1], drawn[3])
    assert not torch.equal(drawn[0], drawn[1])  # the draws are random (a test that could not fail otherwise)
    # the generators end where one forward per micro-batch leaves them
    after = torch.get_rng_state()
    torch.set_rng_state(before)
    with torch.no_grad():
        for batch in step:
            trainer.model(*trainer.task.device_inputs(batch))
    assert torch.equal(torch.get_rng_state(), after)


def test_the_counted_training_flops_include_the_forward_without_gradients():
    """Honest compute: accumulation's extra forward per micro-batch is counted (train_gflops per sample
    about (3 + 1) / 3 of one batch of 16's: a backward costs about two forwards)."""
    whole = _trainer("trainer.batch_size=16")
    whole.forward_backward(next(iter(whole.task.train_batches(0))))
    whole.step(16)
    split = _trainer("trainer.batch_size=8", "trainer.accum_steps=2")
    batches = iter(split.task.train_batches(0))
    split.accumulate([next(batches), next(batches)])
    split.step(16)
    ratio = split.state.train_gflops / whole.state.train_gflops
    assert 1.2 < ratio < 1.45, ratio
