"""Unit inference from a checkpoint trained here for a few steps: fastclip.infer prints
probabilities that sum to 1 and equal the model's own softmax; fastclip.load rebuilds the model
from the checkpoint alone; bad checkpoints are named."""
import re

import mlflow
import pytest
import torch
import torch.nn.functional as F
from open_clip import SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

import fastclip
from conftest import TINY_CLIP, compose_cfg
from fastclip.checkpoint import CheckpointError
from fastclip.infer import main
from fastclip.train import run

FEW = TINY_CLIP + ["eval.boundary_picture=false", "trainer.batch_size=8", "trainer.max_steps=3",
                   "trainer.warmup_steps=1"]
TEXTS = ["a photo of the number 3.", "a photo of the number 7.", "a blurry zero"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{name: (checkpoint, store uri, MLflow run id)} for a vanilla CLIP and two DTP ones (gumbel and
    unigram boundaries on both towers: unigram's sentencepiece model only trains, never loads)."""
    home = tmp_path_factory.mktemp("infer")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    out = {}
    bytes_ = ["boundary.text_tokens=bytes"]  # the byte-level text tower (tests/test_bpe_dtp.py loads a BPE one)
    for name, extra in (("vanilla", []), ("dtp", ["boundary=gumbel", *bytes_]), ("unigram", ["boundary=unigram", *bytes_])):
        run(compose_cfg(FEW + extra + [f"tracking.uri={uri}"]), home / name)
        run_id = mlflow.MlflowClient(tracking_uri=uri).search_runs(
            [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("fastclip").experiment_id],
            filter_string=f"tags.`fastclip.run_dir` = '{(home / name).resolve()}'")[0].info.run_id
        out[name] = (home / name / "checkpoints" / "last.pt", uri, run_id)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, colour in enumerate([(250, 250, 250), (20, 20, 20)]):
        im = Image.new("RGB", (40, 30), colour)
        im.paste((200, 30, 30), (5 + 10 * i, 5, 20 + 10 * i, 25))
        paths.append(folder / f"image {i}.png")
        im.save(paths[-1])
    return paths


def printed_probabilities(out: str, n_images: int, n_texts: int) -> torch.Tensor:
    values = [float(v) for v in re.findall(r"^  (\d\.\d{4})  ", out, flags=re.M)]
    assert len(values) == n_images * n_texts, out
    return torch.tensor(values).view(n_images, n_texts)


@pytest.mark.parametrize("name", ["vanilla", "dtp"])
def test_infer_prints_the_models_own_softmax(trained, images, name, capsys):
    checkpoint = trained[name][0]
    args = ["--checkpoint", str(checkpoint)]
    for path in images:
        args += ["--image", str(path)]
    for text in TEXTS:
        args += ["--text", text]
    main(args)
    out = capsys.readouterr().out
    probs = printed_probabilities(out, len(images), len(TEXTS))
    torch.testing.assert_close(probs.sum(1), torch.ones(len(images)), atol=2e-4, rtol=0)
    # the same numbers from the model itself: its forward, its learned temperature
    model, preprocess, tokenizer = fastclip.load(checkpoint)
    assert not model.training
    batch = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        forward = model(batch, tokenizer(TEXTS))
    expected = (forward["logit_scale"] * forward["image_features"] @ forward["text_features"].T).softmax(-1)
    torch.testing.assert_close(probs, expected, atol=6e-5, rtol=0)
    kept = re.findall(r"(image|text) tower kept (\d+) of (\d+) tokens", out)
    if name == "vanilla":
        assert kept == []
    else:  # per image and per text: what the towers kept, from their own counts
        assert [k[0] for k in kept] == ["image"] * len(images) + ["text"] * len(TEXTS)
        text_lengths = [int(n) for kind, _, n in kept if kind == "text"]
        assert text_lengths == [len(t.encode()) for t in TEXTS]  # a DTP text tower reads bytes
        assert all(0 < int(k) <= int(n) for _, k, n in kept)


@pytest.mark.parametrize("name", ["dtp", "unigram"])
def test_the_loaded_model_matches_the_checkpoint_weights(trained, name):
    checkpoint = trained[name][0]
    model, _, _ = fastclip.load(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_classes_give_the_top_5_of_the_zero_shot_classifier(trained, images, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    names = ["zero", "one", "two", "three", "four", "five", "six"]
    classes.write_text("\n".join(names) + "\n\n")
    checkpoint, uri, run_id = trained["dtp"]
    main(["--checkpoint", f"runs:/{run_id}", "--uri", uri, "--image", str(images[0]), "--classes", str(classes),
          "--templates", "simple"])
    out = capsys.readouterr().out
    ranked = re.findall(r"^  (\d)\. (\d\.\d{4})  (\w+)$", out, flags=re.M)
    assert [int(r[0]) for r in ranked] == [1, 2, 3, 4, 5]
    # the same ranking from the model: class embeddings over open_clip's simple templates, its temperature
    model, preprocess, tokenizer = fastclip.load(checkpoint)
    with torch.no_grad():
        prompts = [[t(c) for t in SIMPLE_IMAGENET_TEMPLATES] for c in names]
        classes_emb = torch.stack([F.normalize(F.normalize(model.encode_text(tokenizer(p)), dim=-1).mean(0), dim=0)
                                   for p in prompts])
        image = preprocess(Image.open(images[0]).convert("RGB"))[None]
        probs = (model.logit_scale.exp() * model.encode_image(image, normalize=True) @ classes_emb.T).softmax(-1)[0]
    top = probs.topk(5)
    assert [r[2] for r in ranked] == [names[i] for i in top.indices.tolist()]
    torch.testing.assert_close(torch.tensor([float(r[1]) for r in ranked]), top.values, atol=6e-5, rtol=0)
    assert "image tower kept" in out


def test_bad_checkpoints_and_inputs_are_named(trained, images, tmp_path):
    image = ["--image", str(images[0]), "--text", "a", "--text", "b"]
    with pytest.raises(SystemExit, match="nowhere.pt: no such checkpoint file"):
        main(["--checkpoint", str(tmp_path / "nowhere.pt"), *image])
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(SystemExit, match="other.pt: not a fastclip checkpoint"):
        main(["--checkpoint", str(other), *image])
    with pytest.raises(SystemExit, match="no MLflow run 'abc'"):
        main(["--checkpoint", "runs:/abc", "--uri", trained["dtp"][1], *image])
    with pytest.raises(SystemExit, match="runs:/abc/best.pt: runs:/<run id> names a run's last checkpoint"):
        main(["--checkpoint", "runs:/abc/best.pt", "--uri", trained["dtp"][1], *image])
    nowhere = f"sqlite:///{tmp_path / 'no.db'}"
    with pytest.raises(SystemExit, match="no MLflow store at .*no.db"):
        main(["--checkpoint", "runs:/abc", "--uri", nowhere, *image])
    assert not (tmp_path / "no.db").exists()  # not created by asking
    with pytest.raises(SystemExit, match="--image .*missing.png: no such file"):
        main(["--checkpoint", str(trained["vanilla"][0]), "--image", str(tmp_path / "missing.png"), "--text", "a",
              "--text", "b"])
    vanilla = ["--checkpoint", str(trained["vanilla"][0])]
    with pytest.raises(SystemExit, match="classes.txt: 1 class name"):
        (tmp_path / "classes.txt").write_text("dog\n")
        main([*vanilla, "--image", str(images[0]), "--classes", str(tmp_path / "classes.txt")])
    with pytest.raises(SystemExit, match=r"classes.txt: \['dog'\] appear more than once"):
        (tmp_path / "classes.txt").write_text("dog\ncat\ndog\n")
        main([*vanilla, "--image", str(images[0]), "--classes", str(tmp_path / "classes.txt")])
    with pytest.raises(SystemExit, match="--image .*classes.txt: undecodable image"):
        main([*vanilla, "--image", str(tmp_path / "classes.txt"), "--text", "a", "--text", "b"])
    with pytest.raises(SystemExit, match="--image .*: a directory, not a file"):
        main([*vanilla, "--image", str(tmp_path), "--text", "a", "--text", "b"])
    with pytest.raises(SystemExit, match="--text: give at least two non-empty texts"):
        main([*vanilla, "--image", str(images[0]), "--text", "a dog"])
    with pytest.raises(SystemExit, match="--device nonsense: "):
        main([*vanilla, "--image", str(images[0]), "--text", "a", "--text", "b", "--device", "nonsense"])
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="notes.txt: not a PyTorch checkpoint"):
        main(["--checkpoint", str(notes), *image])
    with pytest.raises(SystemExit, match="a directory without checkpoints/last.pt"):
        main(["--checkpoint", str(tmp_path), *image])
    # from a newer fastclip: a model key this code does not know would be ignored, building another model
    from fastclip import checkpoint
    newer = checkpoint.load(trained["dtp"][0])
    newer["config"]["boundary"]["token_budget"] = 96
    checkpoint.save(tmp_path / "newer.pt", newer)
    with pytest.raises(SystemExit, match=r"newer.pt: the checkpoint's config has 1 key\(s\) this fastclip does not "
                                          r"know \(boundary.token_budget=96\)"):
        main(["--checkpoint", str(tmp_path / "newer.pt"), *image])


def test_a_run_dir_names_its_last_checkpoint(trained, images, capsys):
    checkpoint = trained["vanilla"][0]
    main(["--checkpoint", str(checkpoint.parent.parent), "--image", str(images[0]), "--text", "a", "--text", "b"])
    by_dir = capsys.readouterr().out
    main(["--checkpoint", str(checkpoint), "--image", str(images[0]), "--text", "a", "--text", "b"])
    assert by_dir == capsys.readouterr().out


def test_a_language_model_checkpoint_is_refused_naming_its_task(tmp_path):
    lm = ["task=lm", "encoder.width=32", "encoder.heads=2", "task.context=64", "task.eval_stride=32",
          "trainer.batch_size=8", "trainer.progress=false", "trainer.max_steps=2", "trainer.warmup_steps=1",
          f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    run(compose_cfg(lm), tmp_path / "lm")
    with pytest.raises(CheckpointError, match="last.pt: a task=lm checkpoint"):
        fastclip.load(tmp_path / "lm" / "checkpoints" / "last.pt")


def test_infer_says_what_the_model_was_trained_on_and_when_an_input_is_far_from_it(trained, images, tmp_path,
                                                                                    capsys):
    """The digits model saw 8x8 bright-on-dark digits: a 96x96 dark-on-white drawing gets both notes,
    each saying what would be near, a dark-ground image of the digits' size none; a 64x64 drawing is
    only resized (8x the native side: no size note)."""
    drawing = Image.new("RGB", (96, 96), (255, 255, 255))
    drawing.paste((0, 0, 0), (30, 15, 66, 81))
    drawing.save(tmp_path / "three.png")
    main(["--checkpoint", str(trained["vanilla"][0]), "--image", str(images[1]), "--image", str(tmp_path / "three.png"),
          "--text", TEXTS[0], "--text", TEXTS[1]])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("model trained on dataset=digits (scikit-learn's 8x8 handwritten digits: grayscale, "
                             "bright ink on a dark background); reads 32x32 px RGB, normalised with mean (0.481")
    dark, light = out.index(str(images[1])), out.index(str(tmp_path / "three.png"))
    assert not any("far from the training images" in line for line in out[dark:light])
    notes = [line for line in out[light:] if "far from the training images" in line]
    assert len(notes) == 2 and "light background (border brightness 1.00 of 1)" in notes[0]
    assert "96x96 px: the training images were 8x8" in notes[1] and notes[1].endswith("at most 64 px a side")


def test_far_from_training_compares_only_what_the_source_states():
    from fastclip.data.profiles import far_from_training, profile_of
    white = Image.new("RGB", (300, 200), (255, 255, 255))
    assert far_from_training(white, profile_of("image_folder"), 224) == []  # photos: any ground, any size
    tiny = Image.new("RGB", (20, 20), (0, 0, 0))
    assert far_from_training(tiny, profile_of("csv"), 224) == ["20x20 px is upscaled more than 4x to the model's "
                                                                "224 px input; near: at least 56 px a side"]
    dark_64 = Image.new("RGB", (64, 64), (0, 0, 0))
    assert far_from_training(dark_64, profile_of("digits"), 32) == []  # 8x the native 8 px: resized, not far


def test_the_tokens_line_says_when_nothing_was_reduced():
    from fastclip.infer import tokens_line
    assert tokens_line("text", torch.tensor([8, 2])) == "text tower kept 2 of 8 tokens (4.00x shorter)"
    assert tokens_line("image", torch.tensor([16, 16])) == "image tower kept 16 of 16 tokens (no reduction)"
