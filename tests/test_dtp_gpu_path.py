"""The learned DTP image tower's GPU path (issue 32, item 9): one-to-one packed index maps, a token
budget with static shapes and no host read, image_layout=auto. Checked on CPU: what a GPU would
serialize (duplicate indices) or wait for (host reads) is observed at the dispatcher."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY_CLIP, compose_cfg
from fastclip import runtime
from fastclip.models.packed import PackedRows
from fastclip.tasks.clip import ClipTask

CPU = torch.device("cpu")
aten = torch.ops.aten

INDEX_OPS = {aten.index.Tensor: 1, aten.index_select.default: 2, aten.index_copy.default: 2,
             aten.index_add.default: 2, aten.index_put.default: 1, aten.index_put_.default: 1,
             aten._index_put_impl_.default: 1}


class IndexRecorder(TorchDispatchMode):
    """Records every index tensor an indexing op (forward or backward) receives."""

    def __init__(self):
        super().__init__()
        self.indices: list[tuple[str, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in INDEX_OPS:
            index = args[INDEX_OPS[func]]
            for idx in (index if isinstance(index, (list, tuple)) else [index]):
                if isinstance(idx, torch.Tensor) and idx.dtype in (torch.long, torch.int):
                    self.indices.append((str(func), idx.detach().clone()))
        return func(*args, **(kwargs or {}))


class NoHostRead(TorchDispatchMode):
    """Raises on every op that brings a tensor's value to the host (item, tolist, bool(), int(), a
    data-sized nonzero): on CUDA each one waits for the GPU queue to drain."""
    READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
             aten.equal.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))


def forbid_tensor_reads(monkeypatch):
    """tolist reads values without the dispatcher: forbidden at the Python level too."""
    def refuse(self, *a, **k):
        raise AssertionError("host read: Tensor.tolist")
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)


def zero_row_reference(rows: PackedRows, padded: torch.Tensor, fn):
    """The old maps: pack gathers, unpack gathers from one zero row appended (every padding slot
    the same index)."""
    B, L = rows.batch, rows.length
    lengths = rows.key_mask.flatten(1).sum(1)
    pos = torch.arange(L)
    valid = pos[None, :] < lengths[:, None]
    dest = torch.where(valid, (lengths.cumsum(0) - lengths)[:, None] + pos[None, :], rows.size).flatten()
    src = torch.nonzero_static(valid.flatten(), size=rows.size).squeeze(1)
    packed = padded.flatten(0, 1)[src]
    out = fn(packed)
    with_zero = torch.cat([out, out.new_zeros(1, *out.shape[1:])])
    return with_zero[dest].unflatten(0, (B, L))


def task_for(*overrides):
    runtime.seed_everything(0)
    return ClipTask(compose_cfg(TINY_CLIP + ["boundary=gumbel", "boundary.apply_to=[image]"] + list(overrides)), CPU)


def sharpened(tower):
    """Predictor weights scaled up so that images get different segment counts."""
    with torch.no_grad():
        tower.predictor.mlp[-1].weight.mul_(20)
    return tower


IMAGES = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_packed_maps_are_one_to_one_and_give_the_zero_row_paths_values_and_gradients():
    lengths = torch.tensor([3, 1, 4, 2])
    rows = PackedRows.from_lengths(lengths, 4, int(lengths.sum()))
    weight = torch.randn(5, 5)
    results = []
    for path in ("new", "reference"):
        padded = torch.randn(4, 4, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
        with IndexRecorder() as rec:
            if path == "new":
                out = rows.unpack(rows.pack(padded) @ weight)
            else:
                out = zero_row_reference(rows, padded, lambda p: p @ weight)
            (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), padded.grad, rec.indices))
    (new, new_grad, new_idx), (ref, ref_grad, ref_idx) = results
    torch.testing.assert_close(new, ref)
    torch.testing.assert_close(new_grad, ref_grad)
    assert new_idx, "no index op seen"
    for op, idx in new_idx:
        assert idx.unique().numel() == idx.numel(), f"{op} got a repeated index: {idx.tolist()}"
    # the reference path does repeat: the check above would see it
    assert any(idx.unique().numel() < idx.numel() for _, idx in ref_idx)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_packed_tower_forward_and_backward_index_no_row_twice(pool):
    """The whole packed tower, forward and backward: no index op repeats an index, and the result
    equals the padded layout's (embeddings and gradients)."""
    out = {}
    for layout in ("packed", "padded"):
        tower = sharpened(task_for(f"boundary.image_layout={layout}", "boundary.image_buckets=1",
                                   f"boundary.image_pool={pool}").model.visual.eval())
        with IndexRecorder() as rec:
            res = tower(IMAGES)
            res.embedding.square().sum().backward()
        out[layout] = (res.embedding, tower.predictor.mlp[0].weight.grad, tower.vit.conv1.weight.grad, rec.indices)
        assert res.segments.min() < res.segments.max()
    for a, b in zip(out["packed"][:3], out["padded"][:3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for op, idx in out["packed"][3]:
        assert idx.unique().numel() == idx.numel(), f"{op}: a repeated index"


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_token_budget_forward_and_backward_make_no_host_read(pool, monkeypatch):
    tower = sharpened(task_for("boundary.image_token_budget=0.25", f"boundary.image_pool={pool}").model.visual)
    tower.train()
    forbid_tensor_reads(monkeypatch)
    with NoHostRead():
        res = tower(IMAGES)
        (res.embedding.square().sum() + res.boundary_logits.sum()).backward()
    monkeypatch.undo()
    assert torch.isfinite(res.embedding).all() and tower.predictor.mlp[0].weight.grad.abs().sum() > 0
    # without a budget the same forward reads the step's sizes back (the check above would catch it)
    free = sharpened(task_for(f"boundary.image_pool={pool}").model.visual)
    forbid_tensor_reads(monkeypatch)
    with pytest.raises(AssertionError, match="host read"), NoHostRead():
        free(IMAGES)


def test_token_budget_drops_beyond_it_counts_the_drops_and_changes_nothing_within_it():
    """16 patches a 32 px image at patch 8. A budget of every patch drops nothing: the packed
    tower's result. A budget of 2 segments an image holds at most 24 in this batch of 12, and
    every boundary beyond it is counted in TowerOutput.dropped and the step's metric."""
    ref = sharpened(task_for("boundary.image_layout=packed").model.visual.eval())
    full = sharpened(task_for("boundary.image_token_budget=16").model.visual.eval())
    with torch.no_grad():
        a, b = ref(IMAGES), full(IMAGES)
    torch.testing.assert_close(a.embedding, b.embedding, rtol=1e-4, atol=1e-5)
    assert b.dropped.sum() == 0 and torch.equal(a.segments, b.segments)

    tight = sharpened(task_for("boundary.image_token_budget=2").model.visual.eval())
    mlp_rows = []
    tight.vit.transformer.resblocks[-1].mlp.register_forward_hook(lambda m, inp, _: mlp_rows.append(inp[0].shape[0]))
    with torch.no_grad():
        c = tight(IMAGES)
    assert mlp_rows == [12 * (1 + 2)]  # the budget's static size, class tokens included
    assert c.segments.sum() <= 24 and (c.segments >= 1).all()
    torch.testing.assert_close(c.segments + c.dropped, a.segments)
    assert c.dropped.sum() == a.segments.sum() - c.segments.sum() > 0
    # the predictor's own boundaries stay for its loss (the prior counts what it decided)
    torch.testing.assert_close(c.boundaries, a.boundaries)


def test_the_dropped_boundaries_are_a_logged_metric():
    task = task_for("boundary.image_token_budget=1", "trainer.batch_size=8")
    step = task.loss(next(iter(task.train_batches(0))))
    # untrained, ~0.2 x 16 patches closes ~3 segments an image; a budget of 1 keeps one
    assert step.metrics["boundaries/dropped_image"] > 0
    assert "boundaries/dropped_image" not in task_for().loss(next(iter(task.train_batches(0)))).metrics


@pytest.mark.parametrize("budget,match", [("0", "boundary.image_token_budget=0"),
                                          ("-0.5", "boundary.image_token_budget=-0.5"),
                                          ("1.5", "boundary.image_token_budget=1.5"),
                                          ("17", "boundary.image_token_budget=17: a count"),
                                          ("many", "boundary.image_token_budget='many'")])
def test_bad_token_budgets_fail_before_training_naming_key_and_value(budget, match):
    with pytest.raises(ValueError, match=match):
        task_for(f"boundary.image_token_budget={budget}")


def test_token_budget_refuses_layouts_and_rules_it_cannot_size():
    from fastclip.models.vision import DTPImageTower
    padded = task_for("boundary.image_token_budget=4", "boundary.image_layout=padded").model
    assert padded.visual.budget is None  # a grid's key a padded job does not read: run off (placement_unread)
    with pytest.raises(ValueError, match="boundary.image_token_budget=4 .* boundary.image_layout=padded"):
        DTPImageTower(padded.visual.vit, padded.image_method, 1, layout="padded", token_budget=4)
    for offset in ("false", "true"):  # whatever mode the tower is built in
        fixed = task_for("boundary=fixed", f"boundary.random_offset={offset}", "boundary.image_token_budget=8")
        assert fixed.model.visual.budget is None  # the config's: a multirun's key fixed does not read, run off
        with pytest.raises(ValueError, match="boundary=fixed"):  # the tower's, for a direct caller
            DTPImageTower(fixed.model.visual.vit, fixed.model.image_method, 1, token_budget=8)
    with pytest.raises(ValueError, match="boundary.random_offset=true with boundary.k=1"):
        task_for("boundary=fixed", "boundary.random_offset=true", "boundary.k=1")


def test_image_layout_auto_follows_the_device_and_changes_no_result():
    tower = task_for("boundary.image_layout=auto").model.visual
    assert tower.layout_on(torch.device("cpu")) == "packed" and tower.layout_on(torch.device("cuda")) == "padded"
    assert task_for("boundary.image_layout=packed").model.visual.layout_on(torch.device("cuda")) == "packed"
