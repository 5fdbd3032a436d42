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
    the training process 8 - 7 = 1 thread. Keys task=lm would not read are refused."""
    cfg = check_config(compose_cfg(["task=lm"]))
    assert loader_workers(cfg) == 0 and loader_workers(cfg, "eval.num_workers") == 0
    for key, value in (("num_workers", 3), ("loader_timeout_s", 30)):
        with pytest.raises(ConfigError, match=rf"trainer.{key}={value} with task=lm: the char LM reads its windows"):
            check_config(compose_cfg(["task=lm", f"trainer.{key}={value}"]))
    check_config(compose_cfg(["task=lm", "trainer.num_workers=0"]))  # what auto is for it


OTHER_THAN_DEFAULT = {"batch_size": "64", "num_workers": "2", "imagenet_val": "/d/val", "imagenet_templates": "simple",
                      "classifier_cache_dir": "/d/cache", "placement_control": "true", "overlap": "fail",
                      "lm_batch_size": "8"}


@pytest.mark.parametrize("key", list(OTHER_THAN_DEFAULT))
def test_an_eval_key_only_the_other_task_reads_is_refused_when_set(eight_cpus, key):
    """eval.boundary_picture once did nothing under task=lm, silently: each eval key one task alone
    reads (schema Eval.READ_BY), set apart from its default under the other task, is refused."""
    from fastclip.schema.run import Eval
    assert set(OTHER_THAN_DEFAULT) == set(Eval.READ_BY)  # a new task-only key gets a case here
    reader = Eval.READ_BY[key]
    other = "lm" if reader == "clip" else "clip"
    value = OTHER_THAN_DEFAULT[key]
    with pytest.raises(ConfigError, match=rf"^eval.{key}={value} with task={other}: only task={reader} reads it"):
        check_config(compose_cfg([f"task={other}", f"eval.{key}={value}"]))
    check_config(compose_cfg([f"task={other}"]))  # its default passes
    if key not in ("imagenet_val", "placement_control"):  # these need a data set or a tower that reads them
        check_config(compose_cfg([f"task={reader}", f"eval.{key}={value}"]))


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
