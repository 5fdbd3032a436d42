"""Command-line mistakes Hydra's own parser reports without naming the argument."""
import re
import subprocess

import pytest

from conftest import PYTHON, compose_cfg
from fastclip.checks import ConfigError, check_config
from fastclip.override_checks import check_override_syntax


def test_an_unquoted_equals_sign_in_a_path_names_the_override_and_how_to_quote_it(tmp_path, cli_env):
    done = subprocess.run([PYTHON, "-m", "fastclip.train", "dataset=csv", "dataset.path=/data/a=b.csv"], cwd=tmp_path,
                          env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "error: the override 'dataset.path=/data/a=b.csv' cannot be read (mismatched input '=' expecting <EOF>): a "
        "value with '=', spaces, braces, commas or quotes needs Hydra's quotes inside the shell's: "
        "\"dataset.path='/data/a=b.csv'\"")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args", [["-m", "trainer.lr=1e-3,5e-4"], ["--cfg", "job", "dataset.path='/d/a=b.csv'"],
                                  ["hydra/launcher=submitit_local", "dataset.train_shards='/d/{000..009}.tar'"]])
def test_overrides_hydra_reads_pass(args):
    check_override_syntax(args)


def test_the_quoting_the_message_suggests_is_itself_readable():
    with pytest.raises(ConfigError) as err:
        check_override_syntax(["trainer.lr=1e-3", "dataset.path=/d/x=y z.csv"])
    suggested = str(err.value).rsplit("shell's: ", 1)[1].strip('"')
    check_override_syntax([suggested])


def test_a_misspelt_key_fails_in_one_line_naming_the_key_meant_and_leaves_no_run_dir(tmp_path, cli_env):
    done = subprocess.run([PYTHON, "-m", "fastclip.train", "trainer.max_step=3"], cwd=tmp_path, env=cli_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith(
        "error: trainer.max_step is not a config key; did you mean trainer.max_steps? (keys of trainer: ")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args, meant", [
    (["trainr.lr=1e-3"], "did you mean trainer.lr?"),
    (["sed=1"], "did you mean seed?"),
    (["boundary=gumbl"], "did you mean boundary=gumbel?"),
    (["-m", "boundary=fixed,gumbl"], "did you mean boundary=gumbel?"),
    (["dataset.val_fracton=0.2"], "did you mean dataset.val_fraction"),
    (["lr=1e-3"], "did you mean trainer.lr?"),  # a group's key without its group
    (["batch_size=8"], "did you mean trainer.batch_size or eval.batch_size?"),
])
def test_misspelt_keys_and_options_get_the_nearest_real_one(args, meant):
    from fastclip.override_checks import check_override_keys
    with pytest.raises(ConfigError, match=meant.replace("?", r"\?")):
        check_override_keys(args)


def _yaml_keys(path, group: str) -> dict[str, object]:
    """The full keys a config file sets, with their values: `group.key`, or for a `_global_` package
    its top keys and their children (`trainer.batch_size`)."""
    from omegaconf import OmegaConf
    node = OmegaConf.to_container(OmegaConf.load(path))
    if "@package _global_" not in path.read_text():
        return {f"{group}.{key}": value for key, value in node.items() if key != "defaults"}
    keys = {}
    for key, value in ((k, v) for k, v in node.items() if k != "defaults"):
        keys |= {f"{key}.{sub}": v for sub, v in value.items()} if isinstance(value, dict) else {str(key): value}
    return keys


def _as_override(value) -> str:
    """A YAML value in Hydra's override grammar (a required ??? as some string)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(_as_override(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_as_override(v)}" for k, v in value.items()) + "}"
    return "'" + ("x" if value == "???" else value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def test_every_key_the_config_tree_has_passes_the_key_check():
    """The check must never refuse a key Hydra would take: every key of every option's file with that
    option chosen (the shared boundary keys with every boundary option, swept), every experiment's keys
    under it, the cluster profiles' keys, every option of every group, and Hydra's own."""
    from fastclip import CONF_DIR
    from fastclip.override_checks import check_override_keys
    from fastclip.schema import OPTIONS
    check_override_keys(["seed=1", "epochs=2", "device=cpu", "cluster=local", "hydra/launcher=basic", "hydra.run.dir=x",
                         "+new=1", "++trainer.lr=1", "~trainer.max_steps", "trainer.lr=range(1,3)", "-m"]
                        + [f"{group}={','.join(options)}" for group, options in OPTIONS.items()])
    checked = 0
    for path in sorted(CONF_DIR.glob("*/*.yaml")):
        group, option = path.parent.name, path.stem
        if group == "_shared":  # included by every option of the boundary group
            group, chosen = "boundary", ["-m", f"boundary={','.join(OPTIONS['boundary'])}"]
        else:
            chosen = [f"{group}={option}"] if group in OPTIONS or group == "experiment" else []
        keys = [f"{key}={_as_override(value)}" for key, value in _yaml_keys(path, group).items()
                if not key.startswith("hydra")]  # each with its file's value: of the form its schema takes
        check_override_keys(chosen + keys)
        checked += len(keys)
    assert checked > 150  # every file was read


@pytest.mark.parametrize("args, message", [
    (["boundary=tome", "boundary.random_offset=true"],
     "boundary.random_offset is not a key of boundary=tome (chosen on the command line): random_offset is a key of "
     "boundary=fixed, gumbel (keys of boundary=tome: "),
    (["boundary.random_offset=true"], "boundary.random_offset is not a key of boundary=none (the default): "),
    (["-m", "boundary=gumbel,tome", "boundary.random_offset=true,false"],
     "boundary.random_offset is not a key of boundary=tome (chosen on the command line)"),
    (["experiment=seed_coco_rn50", "boundary.r=3"],
     "boundary.r is not a key of boundary=none (chosen by experiment=seed_coco_rn50): r is a key of boundary=tome"),
    (["task=lm", "dataset.holdout_fraction=0.1"],
     "dataset.holdout_fraction is not a key of dataset=text8 (chosen by task=lm): holdout_fraction is a key of "
     "dataset=digits"),
    (["dataset=csv", "dataset.image_colum=img"],
     "dataset.image_colum is not a config key; did you mean dataset.image_column? (keys of dataset=csv: "),
    (["dataset=csv", "dataset.train_shards=x"],
     "dataset.train_shards is not a key of dataset=csv (chosen on the command line): train_shards is a key of "
     "dataset=webdataset"),
    (["-m", "boundary=glob(*)", "boundary.k=3"],  # a glob sweep: the options it matches
     "boundary.k is not a key of boundary=entropy_spike (chosen on the command line): k is a key of boundary=fixed"),
    # experiment is in train.yaml's defaults: Hydra would say "Multiple values for experiment"
    (["+experiment=seed_coco_rn50", "dataset.root=/x"], "+experiment=seed_coco_rn50: experiment is in the run's "
     "defaults list (conf/train.yaml), so it is chosen without +: write experiment=seed_coco_rn50"),
    (["++boundary=gumbel"], "++boundary=gumbel: boundary is in the run's defaults list"),
])
def test_a_key_only_other_options_declare_names_the_chosen_option_and_those_that_declare_it(args, message):
    """Hydra says only "Key 'random_offset' not in 'Tome'" and advises appending it with `+`."""
    from fastclip.override_checks import check_override_keys
    with pytest.raises(ConfigError) as err:
        check_override_keys(args)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("args, message", [
    (["boundary=fixed", "boundary.apply_to=image"], "boundary.apply_to=image: expected a list: write boundary.apply_to=[image]"),
    (["trainer.lr=abc"], "trainer.lr=abc: expected a number"),
    (["-m", "trainer.lr=abc,1e-3"], "trainer.lr=abc,1e-3 (abc): expected a number"),
    (["-m", "trainer.lr=1e-3,'abc'"], "trainer.lr=1e-3,'abc' (abc): expected a number"),  # a quoted sweep item
    (["seed=1.5"], "seed=1.5: expected an integer"),
    (["eval.boundary_picture=maybe"], "eval.boundary_picture=maybe: expected true or false"),
    (["trainer.batch_size=null"], "trainer.batch_size=null: expected a value, not null"),
    # the form first, whatever the order: a rule that reads apply_to read "text" as [t,e,x,t]
    (["boundary=gumbel", "boundary.image_start=stride", "boundary.apply_to=text"],
     "boundary.apply_to=text: expected a list: write boundary.apply_to=[text]"),
    (["task=[lm]", "boundary.image_buckets=4"], "task=[lm]: task takes one option (clip, lm); a grid over options is "
                                                "-m task=a,b"),
])
def test_a_value_of_the_wrong_form_is_named_with_the_form_its_key_takes(args, message):
    """Hydra said "Invalid value assigned: str is not a ListConfig, list or tuple" and pointed at
    HYDRA_FULL_ERROR, naming no fix."""
    from fastclip.override_checks import check_override_keys
    with pytest.raises(ConfigError) as err:
        check_override_keys(args)
    assert str(err.value) == message
    check_override_keys(["trainer.lr=${trainer.weight_decay}", "trainer.max_steps=null", "-m", "trainer.lr=range(1,3)"])
    check_override_keys(["-m", "trainer.lr=1e-3,'${trainer.weight_decay}'"])  # a quoted interpolation: resolved later
    check_override_keys(["task=null", "boundary=gumbel", "boundary.image_order=hilbert"])  # Hydra's to judge


def test_a_multirun_key_the_default_option_lacks_is_refused_with_the_one_value_sweep_that_reaches_every_job():
    """Hydra composes one config for the sweeper with the unswept keys on the default boundary=none, and
    fails there, though every job's option has the key."""
    from fastclip.override_checks import check_override_keys
    args = ["-m", "boundary=gumbel,fixed", "boundary.random_offset=true"]
    with pytest.raises(ConfigError) as err:
        check_override_keys(args)
    assert "composed with boundary=none (the default), which has no random_offset" in str(err.value)
    suggested = str(err.value).rsplit("alone: ", 1)[1].strip("'")  # the shell's quotes
    assert suggested == "boundary.random_offset=choice(true)"
    check_override_keys(args[:2] + [suggested])  # what it suggests passes
    check_override_keys(["-m", "boundary=gumbel", "boundary.image_start=stride",  # not swept: the sweeper's option
                         "boundary.random_offset=true"])
    check_override_keys(["boundary=gumbel", "boundary.image_start=stride", "boundary.random_offset=true"])
    for mode in ("MULTIRUN", "RunMode.MULTIRUN"):
        with pytest.raises(ConfigError, match="composed with boundary=none"):  # multirun by hydra.mode, not -m
            check_override_keys([f"hydra.mode={mode}", *args[1:]])
    check_override_keys(["-m", "boundary=glob(fix*)", "boundary.k=choice(3)"])  # a glob sweep of fixed alone


@pytest.mark.parametrize("args, refused", [
    (["boundary=fixed", "boundary.loss_weight=2.0"], "boundary=fixed"),
    (["task=lm", "boundary=whitespace", "boundary.loss_weight=1"], "boundary=whitespace"),
    (["-m", "boundary=tome,fixed", "boundary.loss_weight=choice(2.0)"], "boundary=tome,fixed"),
    (["boundary=gumbel", "boundary.loss_weight=2.0"], None),
    (["boundary=fixed", "boundary.loss_weight=0"], None),
    (["-m", "boundary=gumbel,fixed", "boundary.loss_weight=choice(2.0)"], None),  # the fixed job ignores it
])
def test_a_loss_weight_is_refused_where_no_job_has_an_auxiliary_loss_to_weigh(args, refused):
    """fixed, whitespace and the peers declare boundary.loss_weight so that a multirun across options sets
    it; alone, a nonzero value would be logged as if it did something. The schema accepts it (a run
    written before the refusal still resumes): the command-line check refuses it."""
    from fastclip.override_checks import check_override_keys
    if refused:
        with pytest.raises(ConfigError, match=rf"{refused} has no auxiliary loss to weigh"):
            check_override_keys(args)
    else:
        check_override_keys(args)
    if "-m" not in args:
        assert check_config(compose_cfg(args)).boundary.loss_weight == float(args[-1].split("=")[1])


@pytest.mark.parametrize("args, refused", [
    # a peer runs its own method on the whole ViT: every placement key but apply_to is unread
    (["boundary=tome", "boundary.image_order=hilbert"], "boundary=tome runs its own method"),
    (["boundary=patch_dropout", "boundary.image_pre_layers=2"], "boundary=patch_dropout runs its own method"),
    (["boundary=evit", "boundary.image_layout=padded"], "boundary=evit runs its own method"),
    (["boundary=lowres", "boundary.text_tokens=bytes"], "boundary=lowres runs its own method"),
    (["boundary=none", "boundary.apply_to=[image]"], "boundary=none pools nothing"),
    (["boundary.image_pool=mean"], "boundary=none pools nothing"),  # the default option
    # gumbel's own keys, learned boundaries' budget
    (["boundary=fixed", "boundary.image_start=stride"], "only boundary=gumbel reads it, not boundary=fixed"),
    (["boundary=entropy_spike", "boundary.image_row_breaks=true"], "only boundary=gumbel reads it"),
    (["boundary=fixed", "boundary.image_token_budget=0.5"], "only learned boundaries read it, not boundary=fixed"),
    # a tower apply_to leaves unpooled (the option's default, or the command line's)
    (["boundary=whitespace", "boundary.image_pool=mean"], r"boundary=whitespace with apply_to=\[text\] leaves the image"),
    (["boundary=gumbel", "boundary.apply_to=[image]", "boundary.text_pre_layers=2"], "leaves the text tower unpooled"),
    (["task=lm", "boundary=gumbel", "boundary.image_order=hilbert"], "task=lm reads no placement key"),
    (["-m", "boundary=tome,evit", "boundary.image_order=hilbert"], "boundary=tome runs .*; boundary=evit runs"),
    # a key another key's value leaves unread (layout, order), and fixed's grid, which has no layout to choose
    (["boundary=gumbel", "boundary.image_layout=packed", "boundary.image_buckets=4"], "packed rows have no padding"),
    (["boundary=gumbel", "boundary.image_layout=padded", "boundary.image_token_budget=0.3"], "sizes the packed layout"),
    (["boundary=gumbel", "boundary.image_order=hilbert", "boundary.image_row_breaks=true"], "never wrap across rows"),
    # read by some job: passes
    (["boundary=tome", "boundary.apply_to=[image]"], None),
    (["boundary=tome", "boundary.image_order=raster"], None),  # its default: nothing set
    (["boundary=gumbel", "boundary.image_start=stride"], None),
    (["boundary=entropy_spike", "boundary.image_token_budget=0.5"], None),
    (["-m", "boundary=fixed,gumbel", "boundary.image_start=stride"], None),  # the fixed job ignores it
    (["-m", "boundary=tome,fixed", "boundary.image_order=hilbert"], None),
    (["-m", "boundary=gumbel", "boundary.apply_to=[text],[image]", "boundary.image_pre_layers=2"], None),
    (["-m", "task=lm,clip", "boundary=gumbel", "boundary.image_order=hilbert"], None),
    (["boundary=fixed", "boundary.apply_to=${oc.env:TOWERS}", "boundary.image_pool=mean"], None),  # unread here
    (["boundary=tome", "boundary.image_order=${oc.env:ORDER,raster}"], None),  # known once resolved
    (["-m", "boundary=gumbel", "boundary.image_layout=padded,packed", "boundary.image_buckets=4"], None),
    (["-m", "boundary=gumbel", "boundary.image_layout=padded,packed", "boundary.image_token_budget=0.3"], None),
    (["-m", "boundary=gumbel", "boundary.image_order=raster,hilbert", "boundary.image_row_breaks=true"], None),
    (["boundary=gumbel", "boundary.image_buckets=4"], None),  # image_layout=auto: padded on CUDA
    # fixed reads its layout: with random_offset its rows differ, and a block the packed path cannot run
    # needs padded (the builder's own error says to set it)
    (["boundary=fixed", "boundary.random_offset=true", "boundary.image_layout=padded"], None),
    (["boundary=fixed", "boundary.image_layout=padded"], None),
    # a condition set with ++ is the value the job gets; a default spelled another way is the default
    (["boundary=gumbel", "++boundary.image_layout=packed", "boundary.image_buckets=4"], "packed rows have no padding"),
    (["boundary=tome", "boundary.image_row_breaks=0"], None),
    (["boundary=tome", "boundary.image_row_breaks=no"], None),
])
def test_a_placement_key_is_refused_where_no_job_reads_it(args, refused):
    """`boundary=tome boundary.image_order=hilbert` trained plain ToMe, silently, and
    `-m boundary=fixed,gumbel boundary.image_start=stride` failed its fixed job after the gumbel one had
    trained. Every option declares the placement keys (so a multirun across options sets them); one rule,
    schema.model.placement_unread (the option, the task, the towers apply_to pools), says which a job
    reads: the builder runs an unread one off, the command line refuses one no job reads."""
    from fastclip.override_checks import check_override_keys
    if refused:
        with pytest.raises(ConfigError, match=rf"^{re.escape(args[-1])}: no job reads it \(.*{refused}"):
            check_override_keys(args)
    else:
        check_override_keys(args)


def test_a_job_whose_option_does_not_read_a_placement_key_runs_it_off():
    """The fixed job of `-m boundary=fixed,gumbel boundary.image_start=stride ...` builds and runs on its
    grid, as loss_weight is ignored where there is no auxiliary loss; the off values are the shared file's
    defaults."""
    from omegaconf import OmegaConf

    from fastclip import CONF_DIR
    from fastclip.models.clip import build_clip
    from fastclip.schema.model import PLACEMENT_OFF
    shared = OmegaConf.load(CONF_DIR / "_shared" / "boundary_placement.yaml")
    assert PLACEMENT_OFF == {key: shared[key] for key in PLACEMENT_OFF}
    cfg = check_config(compose_cfg(["boundary=fixed", "boundary.apply_to=[image]", "boundary.image_start=stride",
                                    "boundary.image_row_breaks=true", "boundary.image_token_budget=0.5"]))
    model, _ = build_clip(cfg.encoder, cfg.boundary)
    tower = model.visual
    assert tower.stride_k is None and tower.budget is None and not tower.row_breaks
    gumbel = check_config(compose_cfg(["boundary=gumbel", "boundary.apply_to=[image]", "boundary.prior=0.25",
                                       "boundary.image_start=stride", "boundary.image_token_budget=0.5"]))
    tower = build_clip(gumbel.encoder, gumbel.boundary)[0].visual
    assert tower.stride_k == 4 and tower.budget is not None  # the reader reads them


def test_a_run_names_the_values_it_does_not_read_and_a_shipped_config_has_none():
    """What a multirun's job ignores (fastclip.schema.unread, the command-line check's rules on the composed
    config) goes to its MLflow run as fastclip.unread_keys; every option and experiment as shipped has none."""
    from pathlib import Path

    from fastclip import CONF_DIR
    from fastclip.schema import OPTIONS
    from fastclip.schema.unread import unread_keys
    job = compose_cfg(["task=lm", "boundary=fixed", "boundary.image_order=hilbert", "boundary.loss_weight=2",
                       "eval.batch_size=64", "trainer.num_workers=0"])
    assert unread_keys(job) == {
        "boundary.image_order=hilbert": "task=lm reads no placement key: the char LM's depth is encoder.pre_layers",
        "boundary.loss_weight=2.0": "boundary=fixed has no auxiliary loss to weigh",
        "eval.batch_size=64": "only task=clip reads it (the char LM slices its text windows in memory and scores "
                              "bits per character: no images, no loader)"}  # num_workers=0: what auto is there
    shipped = [[f"{group}={option}"] for group, options in OPTIONS.items() for option in options]
    shipped += [[f"experiment={p.stem}"] for p in sorted(Path(CONF_DIR / "experiment").glob("*.yaml"))]
    assert {" ".join(args): unread_keys(compose_cfg(args)) for args in shipped} == {" ".join(a): {} for a in shipped}


def test_a_data_error_is_one_line_leaves_no_run_dir_and_shows_its_traceback_when_asked(tmp_path, cli_env):
    args = [PYTHON, "-m", "fastclip.train", "dataset=image_folder", f"dataset.path={tmp_path / 'nowhere'}"]
    done = subprocess.run(args, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [f"error: dataset.path='{tmp_path / 'nowhere'}': no such directory"]
    assert list((tmp_path / "outputs").rglob("*")) == [tmp_path / "outputs" / "runs"]  # no run's dir left
    shown = subprocess.run(args, cwd=tmp_path, env={**cli_env, "FASTCLIP_TRACEBACK": "1"}, capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode != 0 and "Traceback" in shown.stderr and "image_folder.py" in shown.stderr


def test_help_lists_the_groups_and_options_a_user_chooses_not_the_internal_ones(tmp_path, cli_env):
    from fastclip.schema import OPTIONS
    done = subprocess.run([PYTHON, "-m", "fastclip.train", "--help"], cwd=tmp_path, env=cli_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "_shared" not in text and "schema/" not in text and "== Config ==" not in text  # Hydra's dump
    for group, options in OPTIONS.items():
        assert f"\n  {group}:\n" in text
        assert all(f" {option} " in text for option in options), group
    assert "* digits        Embedded default" in text and "+cluster=" in text
    assert not (tmp_path / "outputs").exists()
    from fastclip.override_checks import check_override_keys
    import re
    for sign, group, options in re.findall(r"^  (\+?)(\w+)=  .*?: (.*)$", text, re.MULTILINE):  # written as it says
        check_override_keys([f"{sign}{group}={options.split(', ')[0]}"])  # +experiment= once said so, and failed
    assert "\n  experiment=  " in text


def test_a_tracking_store_that_cannot_be_written_fails_train_in_one_line_naming_the_uri(tmp_path, cli_env):
    """A store error is an input error like any other (it printed Hydra's traceback before)."""
    (tmp_path / "a_file").write_text("")
    uri = f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"
    done = subprocess.run([PYTHON, "-m", "fastclip.train", f"tracking.uri={uri}", "trainer.max_steps=1"], cwd=tmp_path,
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == f"error: tracking.uri='{uri}': cannot write the MLflow store at {tmp_path / 'a_file'}: " \
                        f"{tmp_path / 'a_file'} is not a directory", done.stderr[-2000:]
    assert "Traceback" not in done.stderr
