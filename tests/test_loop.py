"""The shared loop's timing: a step's data wait and its compute are told apart, as
open_clip_train's data_time / batch_time, so a slow loader is not read as a slow model."""
import shutil
import time

import pytest
import torch

from conftest import compose_cfg
from fastclip.loop import StepOutput, fit
from fastclip.tasks.protocol import TaskBase


class Batches:
    """An epoch of `n` batches (its len), made afresh by `make()` on each pass."""

    def __init__(self, n: int, make):
        self.n, self.make = n, make

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(self.make())


class SleepyTask(TaskBase):
    """Batches arrive after `load_s`; each loss takes `compute_s`."""

    def __init__(self, load_s: float, compute_s: float, n_batches: int = 6):
        self.model = torch.nn.Linear(2, 1)
        self.load_s, self.compute_s, self.n = load_s, compute_s, n_batches

    def train_batches(self, epoch, start=0):
        def slowly():
            for _ in range(self.n):
                time.sleep(self.load_s)
                yield torch.ones(4, 2)
        return Batches(self.n, slowly)

    def loss(self, batch):
        time.sleep(self.compute_s)
        return StepOutput(self.model(batch).square().mean(), {}, batch.shape[0])

    def evaluate(self):
        return {}


def test_step_time_splits_into_data_wait_and_compute(tmp_path):
    cfg = compose_cfg(["epochs=1", "trainer.progress=false", "trainer.warmup_steps=1"])
    slow_loader = fit(SleepyTask(load_s=0.05, compute_s=0.0), cfg, None, tmp_path / "a", torch.device("cpu"))
    slow_model = fit(SleepyTask(load_s=0.0, compute_s=0.05), cfg, None, tmp_path / "b", torch.device("cpu"))
    for m in (slow_loader, slow_model):
        assert m["time/step_median_s"] >= 0.05
        assert abs(m["time/data_median_s"] + m["time/compute_median_s"] - m["time/step_median_s"]) < 0.02
    assert slow_loader["time/data_median_s"] >= 0.05 > slow_loader["time/compute_median_s"]
    assert slow_model["time/compute_median_s"] >= 0.05 > slow_model["time/data_median_s"]


class EvaluationCounting(SleepyTask):
    """SleepyTask that counts its evaluations."""

    def __init__(self):
        torch.manual_seed(0)  # the same start weights
        super().__init__(0.0, 0.0, n_batches=2)
        self.calls = []

    def evaluate(self):
        self.calls.append("evaluate")
        return {"val/x": 1.0}

    def final_evaluate(self):
        self.calls.append("final_evaluate")
        return {"test/x": 1.0}


def test_fit_without_evaluation_trains_the_same_steps_and_never_calls_the_tasks_evaluations(tmp_path):
    """fit(evaluation=False), bench-overhead's way to time the training alone (it used to replace
    task.evaluate): the same steps and timing summary, no task.evaluate / final_evaluate; a run
    (the default) calls both."""
    cfg = compose_cfg(["epochs=2", "trainer.progress=false", "trainer.warmup_steps=1"])
    plain, bare = EvaluationCounting(), EvaluationCounting()
    with_eval = fit(plain, cfg, None, tmp_path / "a", torch.device("cpu"))
    without = fit(bare, cfg, None, tmp_path / "b", torch.device("cpu"), evaluation=False)
    assert plain.calls == ["evaluate", "evaluate", "final_evaluate"] and bare.calls == []
    assert "val/x" in with_eval and "test/x" in with_eval and not {"val/x", "test/x"} & set(without)
    assert without["time/train_s"] > 0 and "time/eval_s" in without
    torch.testing.assert_close(plain.model.weight, bare.model.weight)

def tiny_gumbel_task(*overrides):
    from conftest import TINY_CLIP
    from fastclip import runtime
    from fastclip.tasks.clip import ClipTask
    cfg = compose_cfg(TINY_CLIP + ["boundary=gumbel", "boundary.apply_to=[image]", "epochs=1",
                                   "trainer.max_steps=3", "trainer.batch_size=64"] + list(overrides))
    runtime.seed_everything(0)
    return ClipTask(cfg, torch.device("cpu")), cfg


def trained_weights(tmp_path, *overrides):
    task, cfg = tiny_gumbel_task(*overrides)
    fit(task, cfg, None, tmp_path / "_".join(overrides), torch.device("cpu"))
    return task.model


def assert_same_weights(a, b, atol):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=atol, rtol=0), name


def test_adamw_kernels_take_the_same_steps(tmp_path):
    fused = trained_weights(tmp_path, "trainer.optimizer_impl=fused")
    loop = trained_weights(tmp_path, "trainer.optimizer_impl=for_loop")
    assert_same_weights(fused, loop, atol=1e-5)
    with pytest.raises(ValueError, match="trainer.optimizer_impl='adam8bit'"):
        trained_weights(tmp_path, "trainer.optimizer_impl=adam8bit")


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_blocks_train_like_eager(tmp_path):
    """trainer.compile: every transformer block compiled, DTP's varying segment count included
    (gumbel image tower), and the same training steps as eager up to float reordering."""
    from open_clip.transformer import ResidualAttentionBlock
    from fastclip.models.packed import packed_block
    compiled = trained_weights(tmp_path, "trainer.compile=true")
    eager = trained_weights(tmp_path, "trainer.compile=false")
    blocks = [m for m in compiled.modules() if isinstance(m, ResidualAttentionBlock)]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert compiled.visual.layout_on(torch.device("cpu")) == "packed" and compiled.visual.packed_block is not packed_block
    assert all(m._compiled_call_impl is None for m in eager.modules() if isinstance(m, ResidualAttentionBlock))
    assert_same_weights(compiled, eager, atol=1e-4)


def test_training_steps_read_their_scalars_only_when_the_loop_logs(tmp_path, monkeypatch):
    """On a GPU every tensor -> Python read drains the queue. A step used to make five of them
    (the task's metrics and the NaN check before backward, the loss after); now the loss, lr and
    metrics stay on the device and come over in one transfer per log_every steps."""
    from conftest import TINY_CLIP, count_tensor_reads
    from fastclip import runtime
    from fastclip.tasks.clip import ClipTask
    cfg = compose_cfg(TINY_CLIP + ["epochs=1", "trainer.max_steps=8", "trainer.batch_size=32",
                                   "tracking.log_every=4", "trainer.progress=false"])
    runtime.seed_everything(0)
    task = ClipTask(cfg, torch.device("cpu"))
    task.evaluate = task.final_evaluate = lambda: {}  # evaluation reads its results on purpose; the steps are under test
    loading = {"now": False}
    real_batches = task.train_batches

    def batches(epoch, start=0):  # the loader's own reads (sampler, random crops) happen on the host anyway
        loader = real_batches(epoch, start)

        class Loading:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                it = None
                while True:
                    loading["now"] = True
                    try:
                        it = it or iter(loader)
                        batch = next(it)
                    except StopIteration:
                        return
                    finally:
                        loading["now"] = False
                    yield batch
        return Loading()
    task.train_batches = batches
    reads = count_tensor_reads(monkeypatch, ignore=lambda: loading["now"])
    fit(task, cfg, None, tmp_path / "run", torch.device("cpu"))
    monkeypatch.undo()
    # steps 4 and 8: one transfer each; the epoch's checkpoint: one (are the weights finite?)
    assert reads == {"tolist": 2, "__bool__": 1}


def test_step_log_keeps_order_reads_plain_numbers_and_stops_at_the_first_non_finite_loss(tmp_path):
    from fastclip.loop import StepLog, TrainingDiverged, TrainState
    steps = StepLog(None, 10, None, tmp_path / "last.pt")
    state = TrainState(step=1)
    steps.add(state, torch.tensor(2.5), torch.tensor(True), 0.1, {})
    state.step = 2
    nan = torch.tensor(float("nan"))
    steps.add(state, nan, torch.isfinite(nan), 0.2, {"n": torch.tensor(3, dtype=torch.long)})
    rows = steps.fetch()
    assert [(s, e, f) for s, e, f, _ in rows] == [(0, 0, True), (1, 0, False)]
    assert rows[0][3] == {"train/loss": 2.5, "train/lr": 0.1}
    assert rows[1][3]["train/lr"] == 0.2 and rows[1][3]["train/n"] == 3.0 and rows[1][3]["train/loss"] != rows[1][3]["train/loss"]
    assert steps.fetch() == []
    # a step whose last micro-batch loss is finite but an earlier one was not is caught too
    steps.add(state, torch.tensor(1.0), torch.tensor(False), 0.2, {})
    with pytest.raises(TrainingDiverged, match=r"a micro-batch loss of step 1 \(epoch 1\) is not finite; .* no checkpoint written yet"):
        steps.drain()


def test_predictor_lr_scale_speeds_up_the_boundary_predictors_only(tmp_path):
    """trainer.predictor_lr_scale: one AdamW step moves every boundary-deciding parameter (both
    towers' predictors, the stride start's position logits) by that factor more and leaves every
    other step unchanged; weight decay still follows the parameter's shape."""
    from fastclip.optim import boundary_decision_parameters, param_groups
    both_towers = ["boundary.apply_to=[image,text]", "boundary.image_start=stride", "trainer.max_steps=1",
                   "trainer.warmup_steps=1"]
    start = tiny_gumbel_task(*both_towers)[0].model
    base = trained_weights(tmp_path, *both_towers)
    fast = trained_weights(tmp_path, *both_towers, "trainer.predictor_lr_scale=10")
    deciding = boundary_decision_parameters(start)
    names = {n for n, p in start.named_parameters() if id(p) in deciding}
    assert "visual.position_logits" in names
    assert {n.split(".predictor.")[0] for n in names if ".predictor." in n} == {"visual", "text"}
    s0, s1, s10 = start.state_dict(), base.state_dict(), fast.state_dict()
    for name in s0:
        if name in names:
            # summed: single tiny steps lose their ratio to float rounding against the weight
            step1, step10 = (s1[name] - s0[name]).abs().sum(), (s10[name] - s0[name]).abs().sum()
            assert step1 > 0 and abs(step10 / step1 - 10) < 0.5, (name, step10 / step1)
        else:
            assert torch.equal(s1[name], s10[name]), name

    groups = param_groups(start, weight_decay=0.1, lr=1e-3, predictor_lr_scale=10)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in start.parameters())
    for g in groups:
        fast_group = {id(p) in deciding for p in g["params"]}
        assert len(fast_group) == 1 and g["lr"] == (1e-2 if fast_group.pop() else 1e-3)
        assert g["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    with pytest.raises(ValueError, match="trainer.predictor_lr_scale=0"):
        param_groups(start, 0.1, 1e-3, predictor_lr_scale=0)


class CountingTask(TaskBase):
    """A linear model on fixed batches: batch i of epoch e is x = e + i (2 features) and target 0;
    `bad` lists (epoch, i) whose every sample is bad. Records the batches each loss saw."""

    def __init__(self, n_batches: int, bad=()):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(2, 1, bias=False)
        self.n, self.bad, self.seen, self.kill_at = n_batches, set(bad), [], None

    def batch(self, epoch, i):
        return epoch, i, torch.full((4, 2), float(epoch + 1 + i) / 10)

    def train_batches(self, epoch, start=0):
        return Batches(self.n, lambda: (self.batch(epoch, i) for i in range(start, self.n)))

    def loss(self, batch):
        epoch, i, x = batch
        if len(self.seen) == self.kill_at:
            raise KeyboardInterrupt
        self.seen.append((epoch, i))
        if (epoch, i) in self.bad:
            return StepOutput(None, skipped={"bad sample": 4})
        return StepOutput(self.model(x).square().mean(), {}, 4)

    def evaluate(self):
        return {}


def steps_applied(trainer):
    """Records (weights, gradient) at each optimizer step."""
    applied = []
    trainer.optimizer.register_step_pre_hook(lambda *_: applied.append(
        (trainer.model.weight.detach().clone(), trainer.model.weight.grad.clone())))
    return applied


@pytest.mark.parametrize("n, bad, steps", [
    # 5 batches: two steps of (0, 1) and (2, 3); batch 4 would not fill a step and is left out
    (5, set(), [(0, (0, 1)), (0, (2, 3)), (1, (0, 1)), (1, (2, 3))]),
    # 4 batches, batch 1 all bad: (0, 2) fill the first step, batch 3 is left alone at the end
    (4, {(0, 1)}, [(0, (0, 2)), (1, (0, 1)), (1, (2, 3))]),
])
def test_accumulation_never_carries_leftover_micro_batches_into_the_next_epoch(tmp_path, n, bad, steps):
    """accum_steps=2: each optimizer step applies exactly the mean gradient of its own two
    micro-batches; none of an epoch's leftover reaches the next epoch's first step."""
    from fastclip.loop import Trainer
    cfg = compose_cfg(["epochs=2", "trainer.progress=false", "trainer.warmup_steps=0", "trainer.accum_steps=2",
                       "trainer.grad_clip=null"])
    task = CountingTask(n, bad)
    trainer = Trainer(task, cfg, torch.device("cpu"))
    applied = steps_applied(trainer)
    fit(task, cfg, None, tmp_path, torch.device("cpu"), trainer)
    assert len(applied) == len(steps)
    for (weights, grad), (epoch, pair) in zip(applied, steps):
        w = weights.clone().requires_grad_(True)
        expected = sum((task.batch(epoch, i)[2] @ w.T).square().mean() for i in pair) / 2
        torch.testing.assert_close(grad, torch.autograd.grad(expected, w)[0])


class MetricTracker:
    """Records everything fit logs, by MLflow step."""

    def __init__(self):
        self.logged: dict[int, dict] = {}

    def log_metrics(self, values, step, flush=True):
        self.logged.setdefault(step, {}).update(values)

    def flush(self):
        pass


class MicroMetricsTask(CountingTask):
    """CountingTask whose micro-batch i also reports a ratio (compression_image = i), a count
    (boundaries/dropped_image = 10 i) and a time (time/teacher_ms = 100 i)."""

    def loss(self, batch):
        out = super().loss(batch)
        if out.loss is not None:
            i = batch[1]
            out.metrics.update({"compression_image": torch.tensor(float(i)), "boundaries/dropped_image": 10.0 * i,
                                "time/teacher_ms": 100.0 * i})
        return out


def test_an_accumulated_steps_logged_loss_and_metrics_cover_all_its_micro_batches_not_the_last(tmp_path):
    """accum_steps=2: train/loss is the mean of the micro-batch losses (the objective the update took),
    a ratio their mean, a count and a time their sum; they were the last micro-batch's alone."""
    cfg = compose_cfg(["epochs=1", "trainer.progress=false", "trainer.warmup_steps=0", "trainer.accum_steps=2",
                       "tracking.log_every=1"])
    task, tracker = MicroMetricsTask(4), MetricTracker()
    start = task.model.weight.detach().clone()
    fit(task, cfg, tracker, tmp_path, torch.device("cpu"))
    first = tracker.logged[1]  # batches 0 and 1, on the starting weights
    losses = [(task.batch(0, i)[2] @ start.T).square().mean().item() for i in (0, 1)]
    assert first["train/loss"] == pytest.approx(sum(losses) / 2) and losses[0] != pytest.approx(losses[1])
    assert first["train/compression_image"] == pytest.approx(0.5)
    assert first["boundaries/dropped_image"] == 10.0 and first["time/teacher_ms"] == 100.0
    assert tracker.logged[2]["boundaries/dropped_image"] == 50.0  # batches 2 and 3


def test_a_resume_after_a_batch_whose_every_sample_was_bad_starts_at_the_right_batch(tmp_path):
    """accum_steps=2 with batch 1 all bad: the first step is made of batches 0 and 2. A checkpoint
    after it must resume at batch 3 (it used to count steps x accum = batch 2: trained twice)."""
    from fastclip import checkpoint
    from fastclip.loop import Trainer
    cfg = compose_cfg(["epochs=1", "trainer.progress=false", "trainer.warmup_steps=0", "trainer.accum_steps=2",
                       "trainer.ckpt_every_steps=1"])
    full = CountingTask(8, bad={(0, 1)})
    fit(full, cfg, None, tmp_path / "full", torch.device("cpu"))
    killed = CountingTask(8, bad={(0, 1)})
    killed.kill_at = 4  # dies in the second step (batches 3, 4), after the checkpoint of the first
    with pytest.raises(KeyboardInterrupt):
        fit(killed, cfg, None, tmp_path / "killed", torch.device("cpu"))
    state = checkpoint.load(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert (state["train_state"]["step"], state["train_state"]["batch_in_epoch"]) == (1, 3)
    assert state["train_state"]["skipped"] == {"bad sample": 4}
    resumed = CountingTask(8, bad={(0, 1)})
    trainer = Trainer(resumed, cfg, torch.device("cpu"))
    trainer.load_state_dict(state)
    fit(resumed, cfg, None, tmp_path / "killed", torch.device("cpu"), trainer)
    assert resumed.seen == [(0, i) for i in range(3, 8)]
    torch.testing.assert_close(resumed.model.weight, full.model.weight)


def test_an_epoch_that_trains_on_no_sample_fails_naming_why(tmp_path):
    from fastclip.loop import NoTrainingData
    cfg = compose_cfg(["epochs=2", "trainer.progress=false", "trainer.warmup_steps=0"])
    task = CountingTask(3, bad={(0, i) for i in range(3)})
    with pytest.raises(NoTrainingData, match=r"epoch 1 trained on no sample.*12 bad sample"):
        fit(task, cfg, None, tmp_path, torch.device("cpu"))
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_ctrl_c_stops_after_the_step_in_progress_with_its_checkpoint_and_the_run_resumes_exactly(tmp_path):
    """SIGINT during a step: the step finishes, its checkpoint is written, RunInterrupted names it; a
    resume from there lands on the uninterrupted run's weights."""
    import os
    import signal
    from fastclip import checkpoint
    from fastclip.loop import RunInterrupted, Trainer
    cfg = compose_cfg(["epochs=2", "trainer.progress=false", "trainer.warmup_steps=0"])
    full = CountingTask(6)
    fit(full, cfg, None, tmp_path / "full", torch.device("cpu"))

    class Interrupted(CountingTask):
        def loss(self, batch):
            if len(self.seen) == 3:
                os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of step 4 (batch 3)
            return super().loss(batch)
    task = Interrupted(6)
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN under `nohup ... &`
    with pytest.raises(RunInterrupted, match=r"SIGINT: stopped after step 4; its checkpoint is .*last.pt"):
        fit(task, cfg, None, tmp_path / "run", torch.device("cpu"))
    assert signal.getsignal(signal.SIGINT) is before  # restored
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["train_state"]["step"], state["train_state"]["batch_in_epoch"]) == (4, 4)
    resumed = CountingTask(6)
    trainer = Trainer(resumed, cfg, torch.device("cpu"))
    trainer.load_state_dict(state)
    fit(resumed, cfg, None, tmp_path / "run", torch.device("cpu"), trainer)
    assert resumed.seen[0] == (0, 4)
    torch.testing.assert_close(resumed.model.weight, full.model.weight, rtol=0, atol=0)


def test_sigusr2_stops_after_the_step_with_its_checkpoint_then_goes_on_to_submitits_handler(tmp_path):
    """Submitit asks SLURM for SIGUSR2 before a time limit, and its handler requeues the job and exits.
    fit() takes the signal first: the step finishes, its checkpoint is written, then the handler that
    was installed before fit (here a stand-in for Submitit's) gets it, once, even after a SIGTERM."""
    import os
    import signal
    from fastclip import checkpoint
    from fastclip.loop import RunInterrupted
    cfg = compose_cfg(["epochs=2", "trainer.progress=false", "trainer.warmup_steps=0"])
    handed = []

    def submitits(signum, frame):  # requeue + sys.exit(-1), as submitit's checkpoint_and_try_requeue
        handed.append((signum, (tmp_path / "run" / "checkpoints" / "last.pt").is_file()))
        raise SystemExit(-1)

    class Noticed(CountingTask):
        def loss(self, batch):
            if len(self.seen) == 2:  # in the middle of step 3: SLURM's SIGTERM, then the USR2 notice
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGUSR2)  # a second signal, not a Ctrl-C: not an immediate stop
            return super().loss(batch)
    before = signal.signal(signal.SIGUSR2, submitits)
    try:
        fit(Noticed(6), cfg, None, tmp_path / "run", torch.device("cpu"))
        ended = "finished"
    except SystemExit:
        ended = "exited in Submitit's handler"
    except RunInterrupted:  # a KeyboardInterrupt: caught here, or pytest would stop the whole session
        ended = "RunInterrupted"
    except KeyboardInterrupt:  # an immediate stop, without the step's checkpoint
        ended = "KeyboardInterrupt"
    finally:
        restored = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, before)
    assert ended == "exited in Submitit's handler" and restored is submitits
    assert handed == [(signal.SIGUSR2, True)]  # after the checkpoint, once
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["train_state"]["step"] == 3


class LrTracker:
    """Records what fit logs as train/lr, by MLflow step."""

    def __init__(self):
        self.lr: dict[int, float] = {}

    def log_metrics(self, values, step, flush=True):
        if "train/lr" in values:
            self.lr[step] = values["train/lr"]

    def flush(self):
        pass


def lrs_used(trainer) -> list[float]:
    """Records the lr of each optimizer update, as the update reads it."""
    used = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    return used


def test_train_lr_logged_at_a_step_is_the_lr_that_steps_update_used(tmp_path):
    """MLflow step s carries the count after the step: train/lr there is update s's lr (it was
    update s+1's, read after the scheduler had moved on)."""
    from fastclip.loop import Trainer
    cfg = compose_cfg(["epochs=2", "trainer.progress=false", "trainer.warmup_steps=3", "tracking.log_every=1"])
    task, tracker = CountingTask(5), LrTracker()
    trainer = Trainer(task, cfg, torch.device("cpu"))
    used = lrs_used(trainer)
    fit(task, cfg, tracker, tmp_path, torch.device("cpu"), trainer)
    assert len(used) == 10 and used[:3] == pytest.approx([5e-4 / 3, 2 * 5e-4 / 3, 5e-4])  # the warm-up's
    assert [tracker.lr[s] for s in range(1, 11)] == used


def trained(tmp_path, epochs: int, start=None, killed_after=None) -> tuple[list[float], object]:
    """CountingTask (5 steps an epoch, warm-up 0.3) trained for `epochs`, from the checkpoint `start`
    if given, killed after `killed_after` steps (its last checkpoint: the step's) if given
    -> (each update's lr, the trainer)."""
    from fastclip.loop import Trainer
    cfg = compose_cfg([f"epochs={epochs}", "trainer.progress=false", "trainer.warmup_steps=0.3",
                       "trainer.ckpt_every_steps=1"])
    task = CountingTask(5)
    trainer = Trainer(task, cfg, torch.device("cpu"))
    if start is not None:
        trainer.load_state_dict(start)
    used = lrs_used(trainer)
    task.kill_at = killed_after
    try:
        fit(task, cfg, None, tmp_path, torch.device("cpu"), trainer)
    except KeyboardInterrupt:
        assert killed_after is not None and len(used) == killed_after
    return used, trainer


@pytest.mark.parametrize("stop", [5, 10])  # mid-run (an epoch's checkpoint), and a finished run
def test_a_longer_schedule_resumes_with_no_second_warm_up_and_no_lr_jump(tmp_path, stop):
    """A 10-step run (warm-up 0.3: 3 steps) resumed at `stop` as a 20-step one: the warm-up keeps its
    3 steps (0.3 of 20 would be 6), and the cosine goes on from the last update's lr down to 0 at
    step 20: the first resumed update repeats the last lr, every later one is smaller."""
    from fastclip import checkpoint
    from fastclip.optim import warmup_cosine
    first, _ = trained(tmp_path, epochs=2, killed_after=stop if stop < 10 else None)
    assert first == pytest.approx([5e-4 * warmup_cosine(3, 10)(s) for s in range(stop)])  # the 10-step plan
    ckpt = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["scheduler"]["lr_lambdas"][0] == {"warmup": 3, "total": 10, "start": 3, "peak": 1.0}
    then, trainer = trained(tmp_path, epochs=4, start=ckpt)
    assert trainer.warmup_steps == 3 and len(then) == 20 - stop
    assert then[0] == pytest.approx(first[-1])  # no jump up ...
    assert all(b < a for a, b in zip(then, then[1:])) and then[-1] > 0  # ... nor a warm-up: falling to 0 at 20
    assert trainer.schedule.describe(stop).startswith("warm-up done (3 steps), cosine to 0 at step 20 from")
    again = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["scheduler"]["lr_lambdas"][0]
    assert again == {"warmup": 3, "total": 20, "start": stop, "peak": pytest.approx(first[-1] / 5e-4)}


def test_a_resume_during_the_warm_up_finishes_it_and_a_checkpoint_without_a_saved_schedule_still_resumes(tmp_path):
    """Resumed at step 2 of a 3-step warm-up, 10 steps made 20: the warm-up ends at step 3 as planned,
    then the cosine runs from the peak to step 20. A checkpoint written before the schedule was saved
    (its lr_lambdas None) gets it from its own config: the same lrs."""
    from fastclip import checkpoint
    from fastclip.optim import warmup_cosine
    trained(tmp_path / "a", epochs=2, killed_after=2)
    ckpt = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")
    assert ckpt["train_state"]["step"] == 2
    then, _ = trained(tmp_path / "a", epochs=4, start=ckpt)
    assert then == pytest.approx([5e-4 * warmup_cosine(3, 20)(s) for s in range(2, 20)])
    assert then[0] == pytest.approx(5e-4)  # the warm-up's last step
    ckpt["scheduler"]["lr_lambdas"] = [None] * len(ckpt["scheduler"]["lr_lambdas"])
    old, _ = trained(tmp_path / "b", epochs=4, start=ckpt)
    assert old == pytest.approx(then)


def test_schedule_replans_only_a_changed_length_and_never_before_its_warm_up_ends():
    from fastclip.optim import Schedule
    planned = Schedule(10, 100)
    assert planned.replanned(40, 100) is planned  # an exact resume
    assert planned.replanned(40, 200)(40) == pytest.approx(planned(39))
    assert planned.replanned(40, 200).replanned(40, 300)(40) == pytest.approx(planned(39))  # resumed twice at 40
    assert planned.describe(0) == "warm-up 10 steps (to step 10), then cosine to 0 at step 100"
    with pytest.raises(ValueError, match="warm-up is 10 steps .* a schedule of 8 steps would end before it"):
        planned.replanned(5, 8)
