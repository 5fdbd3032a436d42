"""Every option of every group composes; bad options and keys fail with Hydra's message."""
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError

from fastclip import CONF_DIR
from conftest import compose_cfg
from fastclip.config import compose_train_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra" and not p.name.startswith("_"))


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


APPENDED = {"cluster"}  # groups not in train.yaml's defaults: chosen with +group=option


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_cfg([f"{'+' if group in APPENDED else ''}{group}={option}"])
    assert "epochs" in cfg and "seed" in cfg
    if group in ("task", "dataset", "encoder", "boundary", "compression"):
        assert cfg[group].name == option


def test_a_cluster_profile_chooses_the_slurm_launcher_and_requeues_after_time_limits():
    cfg = compose_train_config(["+cluster=example_gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_ and launcher.account == "my_account"
    assert launcher.max_num_timeout > 0 and cfg.trainer.resume == "auto"


def test_the_local_profile_runs_submitit_jobs_a_few_at_a_time():
    cfg = compose_train_config(["+cluster=local"], return_hydra_config=True)
    assert "LocalLauncher" in cfg.hydra.launcher._target_ and cfg.hydra.sweeper.max_batch_size == 2
    capped = compose_train_config(["+cluster=local", "hydra.sweeper.max_batch_size=3"], return_hydra_config=True)
    assert capped.hydra.sweeper.max_batch_size == 3


@pytest.mark.parametrize("launcher", ["basic", "submitit_local", "submitit_slurm", "slurm"])
def test_launchers_compose(launcher):
    cfg = compose_train_config([f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert launcher.split("_")[-1] in cfg.hydra.launcher._target_.lower()


def test_the_projects_slurm_launcher_composes_with_its_settings():
    """hydra/launcher=slurm is ours (conf/hydra/launcher/slurm.yaml) on top of submitit_slurm."""
    cfg = compose_train_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.timeout_min, launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == (240, 1, 8, 64)
    assert launcher.partition == "gpu" and launcher.submitit_folder.endswith("/.submitit/%j")


def test_defaults_are_the_embedded_digits_run():
    cfg = compose_cfg()
    assert (cfg.task.name, cfg.dataset.name, cfg.encoder.name, cfg.boundary.name) == ("clip", "digits", "vit_tiny", "none")
    assert cfg.tracking.uri is None


def test_unknown_group_option_fails_with_hydra_message():
    with pytest.raises(ConfigCompositionException, match="Could not find 'encoder/vit_huge'"):
        compose_cfg(["encoder=vit_huge"])


def test_unknown_key_fails_with_hydra_message():
    with pytest.raises(ConfigCompositionException, match="trainer.learning_rate"):
        compose_cfg(["trainer.learning_rate=1e-3"])


def test_config_is_struct_so_typos_in_code_fail():
    cfg = compose_cfg()
    with pytest.raises(ConfigAttributeError):
        _ = cfg.trainer.learning_rate


@pytest.mark.parametrize("experiment, data_key", [("seed_coco_rn50", "dataset.root"),
                                                  ("seed_laion_rn50", "dataset.train_shards")])
def test_seed_table_experiments(tmp_path, experiment, data_key):
    """The seed's recipe: RN50 + transformer, batch 128 for 1 epoch else 32, lr 1e-4, wd 0.1, 50
    warm-up steps; its data paths are required keys that fail naming themselves."""
    for epochs, batch in ((1, 128), (10, 32), (30, 32)):
        cfg = compose_cfg([f"experiment={experiment}", f"epochs={epochs}", f"{data_key}=/data/x",
                           "eval.imagenet_val=null"])
        assert cfg.trainer.batch_size == batch
        assert (cfg.encoder.open_clip_name, cfg.boundary.name) == ("RN50", "none")
        assert (cfg.trainer.lr, cfg.trainer.weight_decay, cfg.trainer.warmup_steps) == (1e-4, 0.1, 50)
    from fastclip.train import run
    cfg = compose_cfg([f"experiment={experiment}", "eval.imagenet_val=null", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    with pytest.raises(Exception, match=data_key.split(".")[-1]):
        run(cfg, tmp_path / "run")


PLACEMENT = {"apply_to": "[image]", "image_pre_layers": "2", "text_pre_layers": "2", "image_pool": "mean",
             "image_layout": "padded", "image_buckets": "1", "image_row_breaks": "True",
             "image_start": "stride", "image_order": "hilbert", "text_layout": "padded"}


def test_sweeps_across_boundary_options_can_set_where_they_pool():
    """Hydra checks a multirun's overrides against the default option (boundary=none) before it
    sweeps, so `-m boundary=gumbel,fixed boundary.apply_to=[image]` needs every option, none
    included, to carry the placement keys."""
    for option in options("boundary"):
        cfg = compose_cfg([f"boundary={option}"] + [f"boundary.{k}={v}" for k, v in PLACEMENT.items()])
        assert {k: str(cfg.boundary[k]).replace("'", "") for k in PLACEMENT} == PLACEMENT, option


def test_a_key_given_twice_on_the_command_line_is_an_error():
    """bash expands an unquoted brace pattern into one argument per file; Hydra would keep the last."""
    from fastclip.checks import ConfigError
    from fastclip.override_checks import check_overrides
    check_overrides(["dataset=webdataset", "dataset.train_shards='/d/{0..2}.tar'", "epochs=1,2"])
    with pytest.raises(ConfigError, match=r"dataset.train_shards is given 3 times on the command line.*brace"):
        check_overrides(["dataset=webdataset"] + [f"dataset.train_shards=/d/{i}.tar" for i in range(3)])
    with pytest.raises(ConfigError, match=r"is given 2 times.*brace"):  # expanded in the current directory
        check_overrides(["dataset=webdataset"] + [f"dataset.train_shards=shard-{i}.tar" for i in range(2)])
    # not paths: no guess about bash, the values named and the one Hydra would keep
    with pytest.raises(ConfigError, match=r"trainer.max_steps is given 2 times on the command line \(trainer.max_steps"
                                          r"=60, trainer.max_steps=2\): give it once \(Hydra would silently keep the "
                                          r"last, trainer.max_steps=2\)$"):
        check_overrides(["trainer.max_steps=60", "trainer.max_steps=2"])

