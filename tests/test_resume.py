"""Resume continues the run it came from: the checkpoint's config is the base, only the command
line's overrides apply on top (checked: a key that cannot change fails before anything is
touched), and the run keeps its run dir and MLflow run."""
import subprocess

import mlflow
import pytest
import torch

from conftest import PYTHON, TINY_CLIP, compose_cfg, load_checkpoint, old_clip_checkpoint, run_killed_at_loss_call
from fastclip.checkpoint import CheckpointError, ResumeError
from fastclip.train import run

COMMON = TINY_CLIP + ["trainer.batch_size=256", "trainer.warmup_steps=3", "eval.boundary_picture=false"]


def finished_run(tmp_path, store, *overrides):
    """A finished 2-epoch run (5 steps an epoch) -> (its run dir, its checkpoint, its metrics)."""
    run_dir = tmp_path / "first"
    metrics = run(compose_cfg(COMMON + [f"tracking.uri={store}", "epochs=2", *overrides]), run_dir)
    return run_dir, run_dir / "checkpoints" / "last.pt", metrics


def snapshot(run_dir):
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_resume_that_changes_the_model_fails_before_touching_the_run(tmp_path, store):
    run_dir, ckpt, first = finished_run(tmp_path, store)
    before = snapshot(run_dir)
    client = mlflow.MlflowClient(tracking_uri=store)
    # an option change leads, the keys it sets named after it
    for overrides, named in ((["boundary=fixed"], r"which a resume cannot: boundary.name: 'none' -> 'fixed' \(and "
                                                  r"what that option sets: boundary.apply_to, boundary.k"),
                             (["encoder.vision.width=64"], "encoder.vision.width: 32 -> 64"),
                             (["seed=3", "trainer.lr=1e-3"], "seed: 0 -> 3"),
                             # the warm-up was resolved to steps when the run started: a resume keeps it
                             (["trainer.warmup_steps=5"], "trainer.warmup_steps: 3 -> 5")):
        with pytest.raises(ResumeError, match=named) as err:
            run(compose_cfg(COMMON + [f"tracking.uri={store}", "epochs=2", f"trainer.resume={ckpt}", *overrides]),
                tmp_path / "second", overrides=[f"trainer.resume={ckpt}", *overrides])
        assert "trainer.lr" not in str(err.value).split("Start a new run")[0]  # a key that may change is not listed
        assert client.get_run(first["mlflow_run_id"]).info.status == "FINISHED"
        assert snapshot(run_dir) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "first", "mlflow.db"]  # nothing new

    # a checkpoint from a newer fastclip, whose config has a key this code does not know: refused, naming it
    newer = load_checkpoint(ckpt)
    newer["config"]["trainer"]["token_budget"] = 96
    from fastclip import checkpoint
    checkpoint.save(tmp_path / "newer" / "checkpoints" / "last.pt", {**newer, "run_dir": str(tmp_path / "newer")})
    with pytest.raises(ResumeError, match=r"has 1 key\(s\) this fastclip does not know \(trainer.token_budget=96\)"):
        run(compose_cfg(COMMON + [f"tracking.uri={store}", f"trainer.resume={tmp_path / 'newer' / 'checkpoints' / 'last.pt'}",
                                  "epochs=3"]), tmp_path / "second", overrides=["epochs=3"])
    assert client.get_run(first["mlflow_run_id"]).info.status == "FINISHED" and snapshot(run_dir) == before

    # one from before the validation split: resumed here, it would train on 10% fewer images mid-run
    older = load_checkpoint(ckpt)
    del older["config"]["dataset"]["val_fraction"], older["config"]["dataset"]["cache_dir"]  # cache_dir: runtime only
    checkpoint.save(tmp_path / "older" / "checkpoints" / "last.pt", {**older, "run_dir": str(tmp_path / "older")})
    with pytest.raises(ResumeError, match=r"predates dataset keys this fastclip reads \(dataset.val_fraction=0.1\)"):
        run(compose_cfg(COMMON + [f"tracking.uri={store}", f"trainer.resume={tmp_path / 'older' / 'checkpoints' / 'last.pt'}",
                                  "epochs=3"]), tmp_path / "second", overrides=["epochs=3"])
    assert client.get_run(first["mlflow_run_id"]).info.status == "FINISHED" and snapshot(run_dir) == before


def test_a_resume_with_a_new_lr_applies_and_records_it(tmp_path, store, caplog):
    caplog.set_level("INFO", logger="fastclip")
    run_dir, ckpt, first = finished_run(tmp_path, store, "trainer.max_steps=6", "trainer.warmup_steps=0.5")
    assert load_checkpoint(ckpt)["train_state"]["step"] == 6
    assert "from step 0: warm-up 3 steps (to step 3), then cosine to 0 at step 6;" in caplog.text
    caplog.clear()
    changes = [f"trainer.resume={ckpt}", "trainer.lr=5e-3", "trainer.max_steps=8"]
    metrics = run(compose_cfg(COMMON + [f"tracking.uri={store}", *changes]), tmp_path / "second", overrides=changes)
    # no second warm-up (0.5 of 8 steps would be 4), said so
    assert ("from step 6: warm-up done (3 steps), cosine to 0 at step 8 from 0.25 x trainer.lr at step 6 "
            "(re-planned on resume);") in caplog.text
    assert metrics["mlflow_run_id"] == first["mlflow_run_id"]
    state = load_checkpoint(ckpt)
    assert state["train_state"]["step"] == 8
    assert state["config"]["trainer"]["lr"] == 5e-3 and state["config"]["epochs"] == 2  # epochs: the checkpoint's
    # the schedule goes on from step 6 at the new peak lr: base lr x10 for every parameter group
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [5e-3] * len(state["optimizer"]["param_groups"])
    client = mlflow.MlflowClient(tracking_uri=store)
    logged = client.get_run(first["mlflow_run_id"])
    assert logged.info.status == "FINISHED"
    assert logged.data.params["trainer.lr"] == "0.0005"  # MLflow params are the run's first config...
    tags = logged.data.tags  # ...each resume's changes are recorded, from which step, with which code
    assert "trainer.lr: 0.0005 -> 0.005" in tags["fastclip.resume.1.changes"]
    assert "trainer.max_steps: 6 -> 8" in tags["fastclip.resume.1.changes"]
    assert (tags["fastclip.resume.1.from_step"], tags["fastclip.resumes"]) == ("6", "1")
    assert tags["fastclip.resume.1.git_commit"] == tags["mlflow.source.git.commit"]
    assert tags["fastclip.resume.1.git_dirty"] == tags["fastclip.git_dirty"]
    # the values in effect, where the report reads them: each resume's, and the params' values now
    assert (tags["fastclip.resume.1.set.trainer.lr"], tags["fastclip.resume.1.set.trainer.max_steps"]) == ("0.005", "8")
    assert (tags["fastclip.effective.trainer.lr"], tags["fastclip.effective.trainer.max_steps"]) == ("0.005", "8")
    lrs = {m.step: m.value for m in client.get_metric_history(first["mlflow_run_id"], "train/lr")}
    # train/lr at step s: update s's lr (its factor: _cosine(s - 1, ...))
    assert lrs[6] == pytest.approx(5e-4 * _cosine(5, 6, 3)) == 5e-4 * 0.25  # the first part's 6 steps end at 0.25x
    assert lrs[7] == pytest.approx(5e-3 * 0.25)  # from step 6 on: the last update's factor at the new lr ...
    assert lrs[8] == pytest.approx(5e-3 * 0.25 / 2)  # ... down a cosine to 0 at step 8 (halfway at its last update)
    history = (run_dir / "resumes.yaml").read_text()
    assert "from_step: 6" in history and "trainer.lr" in history and "git_dirty:" in history
    assert "lr: 0.005" in (run_dir / "config.yaml").read_text()


def _cosine(step, total, warmup):
    from fastclip.optim import warmup_cosine
    return warmup_cosine(warmup, total)(step)


def test_resume_from_the_command_line_continues_the_run_it_came_from(tmp_path, store, cli_env, monkeypatch):
    """The README's command alone (`trainer.resume=<run dir>`, the original epochs=4 not repeated) goes
    on under the original schedule, into the original run dir and MLflow run, and leaves no job dir of
    its own behind."""
    killed = run_killed_at_loss_call(compose_cfg(COMMON + [f"tracking.uri={store}", "epochs=4"]), tmp_path / "run",
                                     monkeypatch, call=8)
    assert killed["train_state"]["step"] == 5
    odd = tmp_path / "epoch=1"  # a path with '=' needs Hydra's quotes: the README says so
    (tmp_path / "run").rename(odd)
    resumed = subprocess.run([PYTHON, "-m", "fastclip.train", f"trainer.resume='{odd}'",
                              f"hydra.run.dir={tmp_path / 'resume'}"],
                             cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = load_checkpoint(odd / "checkpoints" / "last.pt")
    assert state["config"]["epochs"] == 4 and state["train_state"]["step"] == 20  # 4 epochs x 5 steps
    assert state["config"]["encoder"]["vision"]["width"] == 32  # the checkpoint's model, not the defaults
    assert not (tmp_path / "resume").exists()
    client = mlflow.MlflowClient(tracking_uri=store)
    (only,) = client.search_runs([client.get_experiment_by_name("fastclip").experiment_id])
    assert only.info.run_id == killed["mlflow_run_id"] and only.info.status == "FINISHED"
    lrs = [m.value for m in sorted(client.get_metric_history(only.info.run_id, "train/lr"), key=lambda m: m.step)]
    assert lrs == pytest.approx([5e-4 * _cosine(s, 20, 3) for s in range(20)])  # as one 20-step run
    assert "resuming" in (odd / "train.log").read_text()  # the resumed part logs into the run dir
    assert "run dir " + str(odd) in resumed.stderr + resumed.stdout  # and says where things are


class _Pickled:
    """Anything torch.load(weights_only=True) will not unpickle."""


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, store):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pt: not a PyTorch checkpoint"):
        run(compose_cfg(COMMON + [f"tracking.uri={store}", f"trainer.resume={bad}"]), tmp_path / "r")
    import torch
    torch.save({"model": _Pickled()}, tmp_path / "pickled.pt")  # a zip whose pickle weights_only refuses
    with pytest.raises(CheckpointError, match=r"pickled.pt: not a readable fastclip checkpoint \(torch.load\(weights_only"
                                              r"=True\) refused it: UnpicklingError; a fastclip checkpoint holds only"):
        run(compose_cfg(COMMON + [f"tracking.uri={store}", f"trainer.resume={tmp_path / 'pickled.pt'}"]), tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="nowhere.pt: no such checkpoint file"):
        run(compose_cfg(COMMON + [f"tracking.uri={store}", f"trainer.resume={tmp_path / 'nowhere.pt'}"]), tmp_path / "r")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: not a fastclip checkpoint"):
        run(compose_cfg(COMMON + [f"tracking.uri={store}", f"trainer.resume={tmp_path / 'other.pt'}"]), tmp_path / "r")


@pytest.mark.parametrize("workers, kill_at", [(0, 7), (0, 9), (1, 7), (1, 9)])
def test_resume_is_exact_with_learned_boundaries_random_crops_and_loader_workers(tmp_path, store, monkeypatch,
                                                                                 workers, kill_at):
    """gumbel noise, random crops, evaluations between epochs, loader workers: a run killed mid-epoch
    (call 7: epoch 1's third step) or at an epoch's start (call 9, after the evaluation) and resumed
    lands on the very weights of an uninterrupted one."""
    from datagen import make_csv
    csv = make_csv(tmp_path / "csv", textured=True)  # 24 images x 2 captions; 18 train: 4 steps of 8 an epoch
    common = COMMON + [f"tracking.uri={store}", "dataset=csv", f"dataset.path={csv}", "dataset.eval_fraction=0.25",
                       "boundary=gumbel", "boundary.apply_to=[image]", "trainer.batch_size=8", "epochs=3",
                       "trainer.ckpt_every_steps=1", "trainer.warmup_steps=1", f"trainer.num_workers={workers}"]
    run(compose_cfg(common), tmp_path / "full")
    run_killed_at_loss_call(compose_cfg(common), tmp_path / "killed", monkeypatch, call=kill_at)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.pt"
    run(compose_cfg(common + [f"trainer.resume={ckpt}"]), tmp_path / "killed")
    end, ref = load_checkpoint(ckpt), load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    assert end["train_state"]["step"] == ref["train_state"]["step"] == 12
    for key, value in ref["model"].items():
        assert torch.equal(end["model"][key], value), key


def test_resuming_a_copy_of_a_run_dir_whose_original_exists_is_refused(tmp_path, store):
    import shutil
    run_dir, ckpt, first = finished_run(tmp_path, store)
    shutil.copytree(run_dir, tmp_path / "copy")
    with pytest.raises(ResumeError, match=r"was written by the run in .*first, which still exists"):
        run(compose_cfg(COMMON + [f"tracking.uri={store}", f"trainer.resume={tmp_path / 'copy' / 'checkpoints' / 'last.pt'}"]),
            tmp_path / "r")
    shutil.rmtree(run_dir)  # moved, not copied: the run goes on from its new place
    metrics = run(compose_cfg(COMMON + [f"tracking.uri={store}", f"trainer.resume={tmp_path / 'copy' / 'checkpoints' / 'last.pt'}",
                                        "epochs=3"]), tmp_path / "r")
    assert metrics["mlflow_run_id"] == first["mlflow_run_id"]
    assert load_checkpoint(tmp_path / "copy" / "checkpoints" / "last.pt")["train_state"]["step"] == 15



def test_a_resume_that_would_rewind_or_end_its_run_before_where_it_is_is_refused(tmp_path, store):
    import shutil
    run_dir, ckpt, first = finished_run(tmp_path, store)  # 2 epochs: step 10
    kept = tmp_path / "kept" / "last.pt"  # a checkpoint kept aside at step 10 ...
    kept.parent.mkdir()
    shutil.copy(ckpt, kept)
    run(compose_cfg(COMMON + [f"tracking.uri={store}", f"trainer.resume={ckpt}", "epochs=3"]), run_dir)  # ... the run: 15
    with pytest.raises(ResumeError, match=r"this checkpoint is at step 10, but the run it belongs to .* is already at "
                                          r"step 15: resuming it would rewind that run"):
        run(compose_cfg(COMMON + [f"tracking.uri={store}", f"trainer.resume={kept}", "epochs=4"]), run_dir)
    with pytest.raises(ResumeError, match=r"is at step 15, beyond this run's 5 steps \(epochs=1"):
        run(compose_cfg(COMMON + [f"tracking.uri={store}", f"trainer.resume={ckpt}", "epochs=1"]), run_dir)
    assert load_checkpoint(ckpt)["train_state"]["step"] == 15


class VisibleGPUs:
    """torch.cuda as a process sees it with `count` visible devices, each with its own generator
    state; an index beyond them raises IndexError, as torch's device lookup does."""

    def __init__(self, monkeypatch, states: list, current: int = 0):
        self.states, self.current = states, current
        for name in ("is_available", "device_count", "current_device", "get_rng_state", "set_rng_state",
                     "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))

    def is_available(self):
        return True

    def device_count(self):
        return len(self.states)

    def current_device(self):
        return self.current

    def _index(self, device):
        index = device.index if isinstance(device, torch.device) else int(device)
        if index >= len(self.states):
            raise IndexError(f"cuda:{index}: only {len(self.states)} visible")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(self.current if device == "cuda" else device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self._index(self.current if device == "cuda" else device)] = state.clone()

    def get_rng_state_all(self):
        return [self.get_rng_state(i) for i in range(len(self.states))]

    def set_rng_state_all(self, states):
        for i, state in enumerate(states):
            self.set_rng_state(state, i)


def test_a_cuda_rng_state_resumes_where_fewer_devices_are_visible(monkeypatch):
    """A checkpoint keeps its process's own device's CUDA generator, restored into the device the
    resumed process runs on: saved on cuda:1 of 2, resumed on the one device a job now sees. A list
    (every visible device's, as checkpoints were written before) gives its current device's entry."""
    from fastclip import runtime
    mine, other, fresh = (torch.full((8,), v, dtype=torch.uint8) for v in (1, 2, 0))
    VisibleGPUs(monkeypatch, [other, mine], current=1)
    saved = runtime.rng_state()
    assert torch.equal(saved["cuda"], mine)  # this process's device alone
    now = VisibleGPUs(monkeypatch, [fresh.clone()], current=0)
    runtime.set_rng_state(saved)
    assert torch.equal(now.states[0], mine)
    runtime.set_rng_state({**saved, "cuda": [other, mine]})  # an older checkpoint's list: cuda:0's entry
    assert torch.equal(now.states[0], other)
    two = VisibleGPUs(monkeypatch, [fresh.clone(), fresh.clone()], current=1)
    runtime.set_rng_state({**saved, "cuda": [other, mine]})  # on cuda:1: its own, and nothing else touched
    assert torch.equal(two.states[1], mine) and torch.equal(two.states[0], fresh)
    runtime.set_rng_state({**saved, "cuda": [other]})  # saved by a process that saw one device
    assert torch.equal(two.states[1], other)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert runtime.pick_device("cuda:1") == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]


def test_a_finished_run_reopened_from_a_read_only_folder_fails_first_and_stays_finished(tmp_path, store, cli_env,
                                                                                         monkeypatch):
    """Re-evaluating a FINISHED run whose run dir is read-only (a real read-only bind mount, in a mount
    namespace of its own) fails before the MLflow run is reopened, naming the dir; a failure after it
    is reopened, before a step is trained, leaves the run FINISHED too."""
    import shutil
    run_dir, ckpt, first = finished_run(tmp_path, store)
    client = mlflow.MlflowClient(tracking_uri=store)
    ended = client.get_run(first["mlflow_run_id"]).info.end_time
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare")
    command = (f"mount --bind {run_dir} {run_dir} && mount -o remount,bind,ro {run_dir} && exec {PYTHON} -m "
               f"fastclip.train {' '.join({o.split('=')[0]: o for o in COMMON}.values())} epochs=2 tracking.uri={store} trainer.resume={ckpt}")
    done = subprocess.run(["unshare", "-m", "sh", "-c", command], cwd=tmp_path, env=cli_env, capture_output=True,
                          text=True, timeout=300)
    if "mount:" in done.stderr or "unshare:" in done.stderr:
        pytest.skip(f"no read-only bind mount here (needs root): {done.stderr.strip()[:200]}")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (f"error: {run_dir}: the run dir is not writable (Read-only file "
                                                    f"system): a run writes its lock, config, checkpoints and logs there")
    after = client.get_run(first["mlflow_run_id"]).info
    assert after.status == "FINISHED" and after.end_time == ended  # never reopened

    from fastclip import tracking

    def store_refuses_the_artifact(self, path):
        raise OSError(f"{path}: the artifact store went away")
    monkeypatch.setattr(tracking.Tracker, "log_artifact", store_refuses_the_artifact)
    with pytest.raises(OSError, match="artifact store went away"):
        run(compose_cfg(COMMON + [f"tracking.uri={store}", "epochs=2", f"trainer.resume={ckpt}"]), tmp_path / "r")
    after = client.get_run(first["mlflow_run_id"])
    assert after.info.status == "FINISHED" and "went away" in after.data.tags["fastclip.reopen_failed"]


def gumbel_checkpoint(tmp_path, ratio):
    """A checkpoint of a gumbel CLIP written when boundary=gumbel's predictor_ratio default was 4: its
    config says ratio (None: a run from before the key existed, whose config lacks it)."""
    return old_clip_checkpoint(tmp_path, ["boundary=gumbel", "boundary.predictor_ratio=4"],
                               ["boundary.predictor_ratio"] if ratio is None else [])


@pytest.mark.parametrize("written", [4, None])
def test_a_default_changed_since_the_checkpoint_keeps_the_runs_value_under_its_own_command_line(tmp_path, written):
    """boundary=gumbel's predictor_ratio default went from 4 to auto (1 for CLIP): a requeued job re-running
    `boundary=gumbel ...` resumes its run's ratio-4 predictor rather than being refused (or building a
    model its weights do not fit); naming the key still counts as a change."""
    import fastclip
    from fastclip import resume
    path = gumbel_checkpoint(tmp_path, written)
    cfg = compose_cfg(TINY_CLIP + ["boundary=gumbel", f"trainer.resume={path}"])
    for overrides in ([f"trainer.resume={path}"], ["boundary=gumbel", f"trainer.resume={path}"]):
        resumed = resume.prepare(cfg, overrides)
        assert resumed.config.boundary.predictor_ratio == 4 and not resumed.changes, overrides
    with pytest.raises(ResumeError, match=r"boundary.predictor_ratio: 4 -> 1"):
        resume.prepare(cfg, ["boundary=gumbel", "boundary.predictor_ratio=1", f"trainer.resume={path}"])
    model, _, _ = fastclip.load(path)
    assert model.visual.predictor.mlp[0].out_features == 4 * model.visual.predictor.mlp[0].in_features
