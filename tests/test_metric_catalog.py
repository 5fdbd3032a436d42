"""The metric catalog (fastclip.eval.names.CATALOG, docs/reference/metrics.md) names every metric a
run logs: real short runs of each kind (CLIP with learned DTP towers and pruning, CLIP over a CSV with
retrieval, quantization, the char LM) log nothing the catalog lacks, and which way is better comes from
it. Every other test's runs are held to the catalog too (conftest.logged_metrics_are_catalogued)."""
import pytest

from conftest import TINY_CLIP, compose_cfg
from datagen import make_csv
from fastclip import tracking
from fastclip.eval.names import CATALOG, catalog_entry, lower_is_better
from fastclip.train import run

STEPS = ["trainer.max_steps=3", "trainer.warmup_steps=1", "tracking.log_every=1", "eval.boundary_picture=false"]
LM = ["task=lm", "encoder.width=32", "encoder.heads=2", "task.context=64", "task.eval_stride=32",
      "trainer.batch_size=8", "trainer.progress=false", "trainer.max_steps=3", "trainer.warmup_steps=1",
      "tracking.log_every=1"]


def kinds(tmp_path):
    csv = make_csv(tmp_path / "csv")
    return {
        "clip gumbel + prune": [*TINY_CLIP, *STEPS, "boundary=gumbel", "compression=prune"],
        "clip csv retrieval + quant": [*TINY_CLIP, *STEPS, "dataset=csv", f"dataset.path={csv}",
                                       "dataset.eval_fraction=0.25", "trainer.batch_size=8", "compression=quant"],
        "lm gumbel": [*LM, "boundary=gumbel"],
    }


@pytest.mark.slow
def test_every_metric_a_run_logs_is_in_the_catalog(tmp_path, monkeypatch):
    logged: dict[str, set[str]] = {}
    real = tracking.Tracker.log_metrics

    def spy(self, metrics, step, flush=True):
        logged.setdefault(current, set()).update(metrics)
        return real(self, metrics, step, flush)
    monkeypatch.setattr(tracking.Tracker, "log_metrics", spy)
    for current, overrides in kinds(tmp_path).items():
        run(compose_cfg([*overrides, f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]), tmp_path / current.replace(" ", "_"))
    missing = {kind: sorted(n for n in names if catalog_entry(n) is None) for kind, names in logged.items()}
    assert not any(missing.values()), f"logged but not in fastclip.eval.names.CATALOG: {missing}"
    everything = set().union(*logged.values())
    # the runs covered what they exist for: retrieval, compression twins, the LM's names, DTP boundary losses
    for name in ("retrieval/i2t_r5", "compression/sparsity", "compression/model_mb_dense", "lm/test_bpc",
                 "train/boundary_loss_image", "compression/model_mb"):
        assert name in everything, name


def test_the_catalog_resolves_placeholders_and_twins_and_says_which_way_is_better():
    assert catalog_entry("retrieval/t2i_r10")[0].name == "retrieval/t2i_r{k}"
    assert catalog_entry("retrieval/t2i_r3") is None  # R@K is logged at 1, 5 and 10 only
    assert catalog_entry("efficiency/image_gflops_dense") == (catalog_entry("efficiency/image_gflops")[0], "_dense")
    assert catalog_entry("zeroshot/top1_before_prune")[1] == "_before_prune"
    assert catalog_entry("made/up") is None and catalog_entry("zeroshot/top1_made_up") is None
    assert [lower_is_better(n) for n in ("lm/test_bpc", "val/bpc", "train/contrastive_loss", "zeroshot/top1",
                                         "val/i2t_r1", "efficiency/train_gflops", "made/up")] == \
        [True, True, True, False, False, True, False]
    assert len({m.name for m in CATALOG}) == len(CATALOG)  # one entry per name
    assert {m.when for m in CATALOG} <= {"step", "eval", "end", "final"}
    assert {m.better for m in CATALOG} <= {"higher", "lower", ""}
