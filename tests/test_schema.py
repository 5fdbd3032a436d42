"""The config tree's typed schema (fastclip/schema): each YAML option and its dataclass hold the same
keys, every key has one resume rule, and types and ranges are refused with the key named."""
import dataclasses
import re
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg
from fastclip import PROJECT_ROOT
from fastclip.checks import ConfigError, check_config
from fastclip.config import flatten
from fastclip.schema import OPTIONS, typed
from fastclip.schema.resume_rules import MUTABLE_KEYS, RUNTIME_KEYS, rule_of
from fastclip.schema.steps import steps_of

CONF = Path(__file__).resolve().parent.parent / "conf"


def option_overrides():
    for group, options in OPTIONS.items():
        for option in options:
            assert (CONF / group / f"{option}.yaml").is_file(), f"{group}/{option}.yaml: a schema without its YAML"
            yield group, option
    for group in OPTIONS:  # and no YAML option without a schema
        for path in (CONF / group).glob("*.yaml"):
            assert path.stem in OPTIONS[group], f"conf/{group}/{path.name} has no schema in fastclip/schema"


@pytest.mark.parametrize("group, option", list(option_overrides()))
def test_each_yaml_option_has_exactly_its_schemas_keys(group, option):
    extra = ["task=lm"] if option.startswith("char_lm") or option == "text8" else []
    cfg = compose_cfg([*extra, f"{group}={option}"] if group not in ("trainer", "eval", "tracking") else extra)
    fields = {f.name for f in dataclasses.fields(OPTIONS[group][option])}
    assert set(cfg[group].keys()) == fields
    assert OmegaConf.get_type(cfg[group]) is OPTIONS[group][option]  # Hydra typed it while composing


def _documented_null_keys():
    """(file, key) for each key whose YAML comment offers null (`captions_per_image: 5  # ...; null: all`)."""
    for path in sorted(CONF.glob("*/*.yaml")):
        for line in path.read_text().splitlines():
            found = re.match(r"^\s*(\w+):\s*[^#\s][^#]*#(.*)$", line)
            if found and re.search(r"\bnull\b", found.group(2)):
                yield path, found.group(1)


def test_every_value_a_config_comment_offers_as_null_is_one_its_schema_takes():
    """A key documented with "null: all" but typed int fails when a user writes the documented value."""
    checked = 0
    for path, key in _documented_null_keys():
        group, option = path.parent.name, path.stem
        schemas = OPTIONS["boundary"].values() if group == "_shared" else [OPTIONS.get(group, {}).get(option)]
        for schema in [s for s in schemas if s is not None and key in {f.name for f in dataclasses.fields(s)}]:
            hint = typing.get_type_hints(schema)[key]
            assert hint is typing.Any or type(None) in typing.get_args(hint), f"conf/{group}/{option}.yaml: {key} offers null, typed {hint}"
            checked += 1
    assert checked >= 15  # every group's comments were read


def test_every_composed_key_has_one_resume_rule_and_the_rules_agree_across_options():
    for overrides in ([], ["task=lm", "boundary=gumbel"], ["compression=prune"], ["dataset=webdataset"]):
        for key in flatten(OmegaConf.to_container(compose_cfg(overrides))):
            assert rule_of(key) in ("frozen", "mutable", "runtime"), key
    for group, options in OPTIONS.items():
        rules = {}
        for schema in options.values():
            for f in dataclasses.fields(schema):
                rules.setdefault(f.name, set()).add(rule_of(f"{group}.{f.name}"))
        assert all(len(r) == 1 for r in rules.values()), (group, rules)
    # the declarations the resume and the report read
    assert {"trainer.lr", "trainer.max_steps", "trainer.grad_clip", "epochs", "eval.every_epochs"} <= MUTABLE_KEYS
    assert {"dataset.cache_dir", "trainer.num_workers", "device", "tracking.uri"} <= RUNTIME_KEYS
    assert not {"trainer.warmup_steps", "trainer.batch_size", "seed", "compression.sparsity"} & MUTABLE_KEYS
    assert rule_of("encoder.vision.width") == "frozen" and rule_of("no.such") is None


@pytest.mark.parametrize("key, value, message", [
    ("trainer.batch_size", 0, "trainer.batch_size=0: expected >= 1"),
    ("trainer.precision", "fp8", "trainer.precision='fp8': expected one of auto, fp32, bf16, fp16"),
    ("trainer.warmup_steps", -3, r"trainer.warmup_steps=-3: expected steps >= 0 or a fraction"),
    ("eval.overlap", "keep", "eval.overlap='keep': expected drop or fail"),
    ("trainer.lr", "fast", "trainer.lr: Value 'fast' of type 'str' could not be converted to Float"),
    # boundary keys are checked under boundary=none too (the default), where no tower reads them
    ("boundary.apply_to", ["imgae"], "boundary.apply_to='imgae': expected image or text"),
    ("boundary.apply_to", ["image", "image"], r"boundary.apply_to=\['image', 'image'\]: a tower is named twice"),
    ("boundary.image_order", "zigzag", "boundary.image_order='zigzag': expected raster or hilbert"),
    ("boundary.image_pool", "max", "boundary.image_pool='max': expected mean or cls"),
    ("encoder.tokenizer", "sentencepiece", "encoder.tokenizer='sentencepiece': expected bpe or char"),
    # counts where 0 or less was a silent no-op (max_steps=0 read as unset: the whole default run trained)
    ("trainer.max_steps", 0, r"trainer.max_steps=0: expected >= 1, or null \(epochs decide\)"),
    ("trainer.max_steps", -5, r"trainer.max_steps=-5: expected >= 1"),
    ("epochs", 0, "epochs=0: expected >= 1"),
    ("eval.batch_size", 0, "eval.batch_size=0: expected >= 1"),
    ("eval.lm_batch_size", 0, "eval.lm_batch_size=0: expected >= 1"),
    ("trainer.ckpt_every_steps", 0, "trainer.ckpt_every_steps=0: expected >= 1"),
    ("trainer.torch_threads", 0, "trainer.torch_threads=0: expected >= 1"),
    ("trainer.loader_timeout_s", -1, "trainer.loader_timeout_s=-1: expected >= 0"),
    ("eval.imagenet_templates", "simpel", "eval.imagenet_templates='simpel': expected openai or simple"),
])
def test_a_config_built_without_hydra_is_typed_and_ranged_by_the_same_schema(key, value, message):
    """A resumed run's config is rebuilt from its checkpoint's keys, not composed by Hydra: check_config
    applies the same schema to it."""
    cfg = OmegaConf.create(OmegaConf.to_container(compose_cfg()))
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
    assert typed(compose_cfg()).trainer.lr == 5e-4


@pytest.mark.parametrize("option", sorted(p.stem for p in (PROJECT_ROOT / "conf" / "boundary").glob("*.yaml")))
def test_every_boundary_option_checks_the_shared_placement_keys(option):
    """An option's own checks add to the placement keys' (boundary=lowres once replaced them: a typo in
    image_order passed under it)."""
    with pytest.raises(ConfigError, match="boundary.image_order='zigzag': expected raster or hilbert"):
        check_config(compose_cfg([f"boundary={option}", "boundary.image_order=zigzag"]))


@pytest.mark.parametrize("option, value, message", [
    ("gumbel", 0, "boundary.predictor_ratio=0: expected auto or an integer >= 1"),
    ("gumbel", "wide", "boundary.predictor_ratio='wide': expected auto or an integer >= 1"),
    ("entropy_spike", 0, r"boundary.predictor_ratio=0: expected an integer >= 1"),
    ("unigram", -2, r"boundary.predictor_ratio=-2: expected an integer >= 1"),
])
def test_the_predictor_ratio_is_checked_before_a_model_is_built(option, value, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_cfg([f"boundary={option}", f"boundary.predictor_ratio={value}"]))


def test_steps_or_a_fraction_of_the_run_is_parsed_in_one_place():
    assert steps_of(0.1, 150) == 15 and steps_of(20, 150) == 20 and steps_of(0, 150) == 0
    for bad in (-1, None, "ten", True):
        with pytest.raises(ConfigError, match=f"compression.finetune_steps={bad}: expected steps >= 0"):
            steps_of(bad, 100, "compression.finetune_steps")


def test_predictor_ratio_auto_is_the_papers_4_for_the_lm_and_1_for_clip_towers():
    from fastclip.models.boundaries import build_boundary_method
    cfg = compose_cfg(["boundary=gumbel"])
    assert cfg.boundary.predictor_ratio == "auto"
    assert build_boundary_method(cfg.boundary, space_id=1, causal=True, task="lm").predictor_ratio == 4
    assert build_boundary_method(cfg.boundary).predictor_ratio == 1
    lm = compose_cfg(["task=lm", "boundary=gumbel"])
    assert lm.boundary.predictor_ratio == "auto"
    named = compose_cfg(["boundary=gumbel", "boundary.predictor_ratio=2"])
    assert build_boundary_method(named.boundary, task="lm").predictor_ratio == 2


def test_coco_retrieval_images_null_is_refused_only_where_it_would_leave_no_validation_images():
    """Without a split file null takes every val2014 image for retrieval (validation then has none and the
    build failed); with one it is ignored, as runs that wrote it expect on resume."""
    coco = ["dataset=coco2014", "dataset.root=/x", "dataset.retrieval_images=null"]
    with pytest.raises(ConfigError, match="dataset.retrieval_images=null takes every val2014 image"):
        check_config(compose_cfg(coco))
    assert check_config(compose_cfg(coco + ["dataset.split_file=/s.json"])).dataset.retrieval_images is None


def test_the_schemas_imagenet_template_sets_are_those_evaluation_has():
    from fastclip.eval.imagenet import TEMPLATE_SETS
    from fastclip.schema.run import IMAGENET_TEMPLATES
    assert tuple(TEMPLATE_SETS) == IMAGENET_TEMPLATES
