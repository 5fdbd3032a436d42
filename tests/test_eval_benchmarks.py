"""Evaluation orthogonal to the training data: ImageNet-layout zero-shot with a cached
classifier, and retrieval recall with several captions per image."""
import re

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from conftest import TINY_CLIP, compose_cfg
from fastclip.eval.imagenet import imagenet_eval
from fastclip.eval.retrieval import recall_at_k
from fastclip.train import run

N_CLASSES = 1000


class OracleClip(nn.Module):
    """Text: class k's prompts embed to e_k. Image: its pixel spells its class k; the model
    answers k, except for k % 4 == 0 where it answers k + 1 first and k second. So top-1 is
    exactly 0.75 and top-5 exactly 1.0 when the evaluator maps folders, classes and prompts right."""

    def __init__(self):
        super().__init__()
        self.text = nn.Linear(1, 1)  # the weights the classifier cache is keyed on

    def encode_text(self, tokens, normalize=False):
        return nn.functional.one_hot(tokens[:, 0], N_CLASSES).float()

    def encode_image(self, images, normalize=False):
        k = (images[:, 0, 0, 0] * 255).round().long() + 256 * (images[:, 1, 0, 0] * 255).round().long()
        emb = nn.functional.one_hot(k, N_CLASSES).float()
        wrong = k % 4 == 0
        emb[wrong] = 0.5 * emb[wrong] + nn.functional.one_hot((k[wrong] + 1) % N_CLASSES, N_CLASSES).float()
        return nn.functional.normalize(emb, dim=-1) if normalize else emb


def class_tokenizer(texts):
    return torch.tensor([[int(re.search(r"class(\d+)", t).group(1))] for t in texts])


def test_imagenet_evaluator_gives_the_known_accuracy_and_caches_the_classifier(tmp_path):
    root = tmp_path / "val"
    for k in range(N_CLASSES):  # WNID-like folder names whose sorted order is the class index
        (root / f"n{k:08d}").mkdir(parents=True)
        Image.new("RGB", (4, 4), (k % 256, k // 256, 0)).save(root / f"n{k:08d}" / "ILSVRC2012_val.png")
    names = [f"class{k}" for k in range(N_CLASSES)]
    model, cache = OracleClip(), tmp_path / "cache"
    first = imagenet_eval(model, class_tokenizer, root, transforms.ToTensor(), "cpu", "simple", 250,
                          cache_dir=cache, classnames=names)
    assert first["zeroshot/imagenet_top1"] == 0.75 and first["zeroshot/imagenet_top5"] == 1.0
    assert first["zeroshot/imagenet_images"] == N_CLASSES and first["zeroshot/imagenet_classifier_cached"] == 0
    again = imagenet_eval(model, class_tokenizer, root, transforms.ToTensor(), "cpu", "simple", 250,
                          cache_dir=cache, classnames=names)
    assert again["zeroshot/imagenet_classifier_cached"] == 1 and again["zeroshot/imagenet_top1"] == 0.75
    with torch.no_grad():
        model.text.weight.add_(1.0)  # another checkpoint: the cache must miss
    assert imagenet_eval(model, class_tokenizer, root, transforms.ToTensor(), "cpu", "simple", 250,
                         cache_dir=cache, classnames=names)["zeroshot/imagenet_classifier_cached"] == 0
    assert len(list(cache.iterdir())) == 2


def test_imagenet_layout_errors_name_the_path(tmp_path, store):
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"eval.imagenet_val=.*: no image file in its 1 class folders"):
        run(compose_cfg(TINY_CLIP + [f"tracking.uri={store}", f"eval.imagenet_val={tmp_path / 'val'}"]), tmp_path / "run")
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "n01440764" / "x.jpg")
    cfg = compose_cfg(TINY_CLIP + [f"tracking.uri={store}", f"eval.imagenet_val={tmp_path / 'val'}", "trainer.max_steps=1",
                                   "trainer.warmup_steps=1"])
    with pytest.raises(ValueError, match=r"eval.imagenet_val=.*has 1 class folders"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training


def test_recall_at_k_with_several_captions_per_image():
    # 3 images; captions 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2
    caption_image = torch.tensor([0, 0, 1, 2, 2])
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.0, 0.0],   # image 0: its caption 1 ranks first -> i2t hit at 1
                        [0.8, 0.0, 0.7, 0.0, 0.0],   # image 1: its caption 2 ranks second -> hit at 5, not 1
                        [0.0, 0.0, 0.0, 0.3, 0.2]])  # image 2: caption 3 first
    r = recall_at_k(sim, caption_image, ks=(1, 5))
    assert r["retrieval/i2t_r1"] == pytest.approx(2 / 3) and r["retrieval/i2t_r5"] == 1.0
    # t2i: caption 0 -> image 1 scores higher (miss at 1); 1 hit; 2 -> image 0 (0.5) < image 1 (0.7) hit;
    # 3 hit; 4 hit
    assert r["retrieval/t2i_r1"] == pytest.approx(4 / 5) and r["retrieval/t2i_r5"] == 1.0
    flat = recall_at_k(torch.zeros(3, 5), caption_image, ks=(1,))  # ties count against the model
    assert flat["retrieval/i2t_r1"] == 0.0 and flat["retrieval/t2i_r1"] == 0.0


def test_overhead_bench_times_two_loops_that_take_the_same_steps(tmp_path):
    """bench-clip's harness overhead compares fastclip.loop.fit with open_clip_train's
    train_one_epoch: same model, data order, param groups, AdamW, clipping and schedule, so from
    one seed both loops must reach the same weights, else the timing compares different work."""
    from conftest import TINY_CLIP
    from fastclip import runtime
    from fastclip.bench.overhead import fastclip_step_s, open_clip_train_step_s
    from fastclip.tasks.clip import ClipTask
    cfg = compose_cfg(TINY_CLIP + ["epochs=2", "trainer.progress=false", "trainer.warmup_steps=2"])
    steps = len(ClipTask(cfg, torch.device("cpu")).train_batches(0))
    assert steps >= 2
    t_theirs, theirs = open_clip_train_step_s(cfg, steps)
    t_ours, t_whole, ours = fastclip_step_s(cfg, tmp_path / "run")
    assert 0 < t_ours <= t_whole and t_theirs > 0
    runtime.seed_everything(cfg.seed)  # the weights both runs started from
    start = ClipTask(cfg, torch.device("cpu")).model
    moved = 0
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), name
        moved += not torch.equal(a, start.state_dict()[name])
    assert moved > 0


def test_gpu_recipe_runs_the_loop_with_its_recorder_and_keeps_every_eval(tmp_path):
    """bench-gpu-recipe hands fit an EvalRecorder instead of the MLflow tracker; it must answer every
    call the loop makes (a missing flush() once broke the GPU run), and keep each eval's top-1
    plus the placement control of a learned row."""
    from conftest import TINY_CLIP
    from fastclip.bench.gpu_recipe import VARIANTS, train_one
    overrides = TINY_CLIP + VARIANTS["gumbel"][1] + ["epochs=2", "trainer.batch_size=512",
                                                     "eval.boundary_picture=false"]
    metrics, evals = train_one(overrides, tmp_path, torch.device("cpu"))
    steps = [e["step"] for e in evals]  # one eval per epoch
    assert len(steps) == 2 and 0 < steps[0] < steps[1]
    assert all(0 <= e["val/zeroshot_top1"] <= 1 for e in evals)  # per-epoch: the validation split's
    assert 0 <= metrics["zeroshot/top1"] <= 1  # the test split's, at the end
    assert "zeroshot/top1_shuffled_placement" in metrics


def test_bench_lm_flags_a_collapsed_row_instead_of_reporting_its_bpc():
    from fastclip.bench.lm import flag_collapsed
    rows = [{"variant": "vanilla (12 full-length layers)", "lm/test_bpc": 3.2, "efficiency/compression_text": 1.0},
            {"variant": "DTP gumbel prior 0.25", "lm/test_bpc": 3.9, "efficiency/compression_text": 256.0},
            {"variant": "DTP whitespace", "lm/test_bpc": 3.3, "efficiency/compression_text": 5.7}]
    flag_collapsed(rows, context=256)
    assert rows[1]["lm/test_bpc"] is None and rows[1]["note"].startswith("collapsed: 256x")
    assert rows[0]["lm/test_bpc"] == 3.2 and rows[2]["lm/test_bpc"] == 3.3 and rows[2]["note"] == ""


def test_frontier_reuses_vanillas_finished_run_of_the_same_seed_and_steps(tmp_path, monkeypatch):
    """--vanilla-from: the budget and curve of a part of the frontier come from an earlier store's vanilla
    run of the same seed and steps; an unfinished or other run is never taken, and none is an InputError.
    --collect builds the table from the finished runs, each row named by its run directory."""
    import mlflow
    from fastclip.bench import frontier
    from fastclip.bench.frontier import logged_vanilla, reached_at
    from fastclip.errors import InputError
    root = tmp_path / "frontier-a"
    root.mkdir()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("frontier-cifar10")
    ids = {}
    for name, seed, steps, status in (("vanilla", 0, 1000, "FINISHED"), ("killed", 1, 1000, "KILLED"),
                                      ("short", 1, 300, "FINISHED"), ("gumbel", 1, 1000, "FINISHED")):
        run = client.create_run(experiment)
        for key, value in (("boundary.name", "gumbel" if name == "gumbel" else "none"), ("seed", seed),
                           ("trainer.max_steps", steps)):
            client.log_param(run.info.run_id, key, value)
        for step, (top1, pflops) in enumerate(((0.3, 0.01), (0.5, 0.02), (0.55, 0.03))):
            client.log_metric(run.info.run_id, "val/zeroshot_top1", top1, step=step)
            client.log_metric(run.info.run_id, "efficiency/train_pflops_total", pflops, step=step)
        for key, value in (("zeroshot/top1", 0.5 + seed / 10), ("train/samples", 10.0), ("train/steps", 5.0)):
            client.log_metric(run.info.run_id, key, value)
        key = {"vanilla": "vanilla", "gumbel": "learned"}.get(name, "vanilla")
        client.set_tag(run.info.run_id, "fastclip.run_dir", str(root / "cifar10" / key / f"seed{seed}"))
        client.set_terminated(run.info.run_id, status=status)
        ids[name] = run.info.run_id
    found = logged_vanilla([str(root)], "cifar10", 0, 1000)
    assert found["mlflow_run_id"] == ids["vanilla"] and found["efficiency/train_pflops_total"] == 0.03
    assert found["wall_s"] >= 0 and reached_at(found["store"], found["mlflow_run_id"], 0.5) == 0.02
    with pytest.raises(InputError, match="no finished vanilla run of cifar10 seed 1 at 1000 steps"):
        logged_vanilla([str(root)], "cifar10", 1, 1000)
    with pytest.raises(InputError, match="nowhere/mlflow.db does not exist"):
        logged_vanilla([str(tmp_path / "nowhere")], "cifar10", 0, 1000)
    # --collect: one table from the parts' stores; vanilla's only finished run at 1000 steps is seed 0's
    monkeypatch.setattr(frontier, "rows_for", lambda ds, full_token: {"vanilla": ("vanilla ViT", []),
                                                                      "learned": ("DTP gumbel", []), "tome": ("ToMe", [])})
    table = frontier.collect([str(root)], "cifar10", 1000, 0.1)
    assert "| vanilla ViT (seeds 0) | 0.500 |" in table and "| DTP gumbel (seeds 1) | 0.600 |" in table
    assert "ToMe" not in table  # never run
    assert "| vanilla ViT (seeds 1) |" in frontier.collect([str(root)], "cifar10", 300, 0.1)  # the short one
    with pytest.raises(InputError, match="no finished vanilla run of cifar10 at 500 steps"):
        frontier.collect([str(root)], "cifar10", 500, 0.1)
    # --train-fit: each row's runs scored from their own checkpoints, the gap to their held-out top-1
    from fastclip.eval import train_fit
    with pytest.raises(InputError, match=f"run {ids['vanilla']} .* has no checkpoint"):
        frontier.collect([str(root)], "cifar10", 1000, 0.1, train_fit=True)
    for key, seed in (("vanilla", 0), ("learned", 1)):
        (root / "cifar10" / key / f"seed{seed}" / "checkpoints").mkdir(parents=True)
        (root / "cifar10" / key / f"seed{seed}" / "checkpoints" / "last.pt").write_bytes(b"")
    monkeypatch.setattr(train_fit, "training_top1", lambda checkpoint: 0.9 if "learned" in str(checkpoint) else 0.7)
    table = frontier.collect([str(root)], "cifar10", 1000, 0.1, train_fit=True)
    assert "| top-1 on its training images | gap (training - held-out) |" in table
    assert "| vanilla ViT (seeds 0) | 0.500 | 0.500 | 0.700 | +0.200 |" in table
    assert "| DTP gumbel (seeds 1) | 0.600 | 0.600 | 0.900 | +0.300 |" in table
    with pytest.raises(SystemExit):  # nothing collected, nothing to score: refused, not ignored
        frontier.main(["--train-fit"])
