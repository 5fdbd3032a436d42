"""trainer.num_workers / eval.num_workers: "auto" is this process's CPUs (affinity, shared among local
ranks) less one, 0 for the in-memory digits; a count above the CPUs is refused before training."""
import pytest

from conftest import compose_cfg
from fastclip.checks import ConfigError, check_config
from fastclip.schema import workers
from fastclip.schema.workers import loader_workers, resolve_workers


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def test_auto_is_the_affinity_cpus_shared_among_local_ranks_less_one(eight_cpus, monkeypatch):
    assert resolve_workers("trainer.num_workers", "auto") == 7
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_workers("trainer.num_workers", "auto") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resolve_workers("trainer.num_workers", "auto") == 0  # one CPU a rank: the rank itself
    assert resolve_workers("trainer.num_workers", "auto", in_memory=True) == 0


def test_defaults_are_auto_and_digits_trains_in_process(eight_cpus):
    cfg = check_config(compose_cfg())
    assert cfg.trainer.num_workers == "auto" and cfg.eval.num_workers == "auto"
    assert loader_workers(cfg) == 0  # the embedded default: digits, decoded in memory
    assert loader_workers(cfg, "eval.num_workers") == 0
    assert loader_workers(check_config(compose_cfg(["dataset=csv", "dataset.path=x.csv"]))) == 7
    assert loader_workers(check_config(compose_cfg(["trainer.num_workers=3"]))) == 3


def test_the_char_lm_has_no_loader_so_its_training_process_keeps_every_core(eight_cpus):
    """auto once resolved to 7 workers for task=lm, which has no DataLoader: set_torch_threads then left
    the training process 8 - 7 = 1 thread. Keys task=lm would not read are refused (the next test)."""
    cfg = check_config(compose_cfg(["task=lm"]))
    assert loader_workers(cfg) == 0 and loader_workers(cfg, "eval.num_workers") == 0


OTHER_THAN_DEFAULT = {"eval.batch_size": "64", "eval.num_workers": "2", "eval.imagenet_val": "/d/val",
                      "eval.imagenet_templates": "simple", "eval.classifier_cache_dir": "/d/cache",
                      "eval.placement_control": "true", "eval.overlap": "fail", "eval.lm_batch_size": "8",
                      "trainer.num_workers": "3", "trainer.loader_timeout_s": "30"}


@pytest.mark.parametrize("key", list(OTHER_THAN_DEFAULT))
def test_a_key_only_the_other_task_reads_is_refused_when_set(eight_cpus, key):
    """eval.boundary_picture once did nothing under task=lm, silently: each key one task alone reads
    (schema READ_BY), set apart from its default on a command line whose jobs all run the other task, is
    refused; a multirun over both tasks passes (the other task's jobs ignore it). On the command line,
    not the composed config: a resumed run keeps what it was started with."""
    from fastclip.override_checks import check_override_keys
    from fastclip.schema.run import Eval, Trainer
    assert set(OTHER_THAN_DEFAULT) == {f"eval.{k}" for k in Eval.READ_BY} | {f"trainer.{k}" for k in Trainer.READ_BY}
    group, field = key.split(".")
    reader = {"eval": Eval, "trainer": Trainer}[group].READ_BY[field]
    other = "lm" if reader == "clip" else "clip"
    value = OTHER_THAN_DEFAULT[key]
    with pytest.raises(ConfigError, match=rf"^{key}={value} with task={other}: only task={reader} reads it"):
        check_override_keys([f"task={other}", f"{key}={value}"])
    check_override_keys([f"task={reader}", f"{key}={value}"])
    check_override_keys(["-m", "task=clip,lm", f"{key}={value}"])
    check_config(compose_cfg([f"task={other}", f"{key}={value}"]) if key != "eval.placement_control" else
                 compose_cfg(["task=lm"]))  # the composed config is not judged on it (a resume's)
    if field == "num_workers" and other == "lm":
        check_override_keys(["task=lm", f"{key}=0"])  # what auto is there


@pytest.mark.parametrize("key", ["trainer.num_workers", "eval.num_workers"])
def test_more_workers_than_cpus_fails_before_training_naming_key_and_value(eight_cpus, key):
    with pytest.raises(ConfigError, match=rf"{key}=9: more loader workers than the 8 CPUs"):
        check_config(compose_cfg([f"{key}=9"]))
    with pytest.raises(ConfigError, match=rf"{key}='many': expected a worker count >= 0 or auto"):
        check_config(compose_cfg([f"{key}=many"]))
    with pytest.raises(ConfigError, match=rf"{key}=-1: expected a worker count"):
        check_config(compose_cfg([f"{key}=-1"]))


def test_torch_threads_are_the_affinity_cpus_left_after_the_workers(eight_cpus, monkeypatch):
    """On CPU the training process's intra-op threads come from the same CPUs as the workers: its cpuset
    (a SLURM job's share of a 64-core node), not the machine's core count."""
    import torch
    from fastclip import runtime
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 64)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    assert runtime.set_torch_threads(None, 3, torch.device("cpu")) == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert runtime.set_torch_threads(None, 3, torch.device("cpu")) == 1  # 4 CPUs a rank, 3 of them workers
    assert runtime.set_torch_threads(2, 3, torch.device("cpu")) == 2  # trainer.torch_threads, as asked
    assert chosen == [5, 1, 2]
