"""compression=distill: the terms vanish for a student that is its teacher, no gradient reaches the
teacher, a character-level DTP student learns from a BPE teacher, and a bad teacher fails before
training, naming compression.teacher."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_CLIP, compose_cfg
from fastclip.checks import ConfigError, check_config
from fastclip.compression import PROJECTION
from fastclip.compression.distill import affinity_kl, build_distiller, feature_mse
from fastclip.models.clip import build_clip

STEPS = ["trainer.warmup_steps=1", "eval.boundary_picture=false"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A vanilla tiny CLIP trained 3 steps: its checkpoint and MLflow store."""
    from fastclip.train import run
    root = tmp_path_factory.mktemp("teacher")
    store = f"sqlite:///{root / 'mlflow.db'}"
    metrics = run(compose_cfg([*TINY_CLIP, *STEPS, "trainer.max_steps=3", f"tracking.uri={store}"]), root / "run")
    return {"path": root / "run" / "checkpoints" / "last.pt", "store": store, "run_id": metrics["mlflow_run_id"]}


def distill_cfg(teacher_spec, **kw):
    return OmegaConf.create({"name": "distill", "teacher": str(teacher_spec), "alpha": 0.5, "beta": 1.0,
                             "temperature": 1.0, **kw})


def test_the_distillation_terms_are_zero_when_student_and_teacher_are_the_same_weights(teacher):
    from fastclip.inference import load
    student, _, tokenizer = load(teacher["path"])
    distiller = build_distiller(distill_cfg(teacher["path"], temperature=2.0), student, tokenizer, 32, "cpu")
    assert not hasattr(student, PROJECTION)  # the same width: no projection
    images, tokens = torch.randn(5, 3, 32, 32), tokenizer(["a red square", "a cat", "two", "the digit one", "sky"])
    with torch.no_grad():
        out = student(images, tokens)
    loss = torch.tensor(3.0)
    total, metrics = distiller(loss, {"contrastive_loss": loss}, out, images, tokens)
    assert metrics["distill/kl"].abs() < 1e-6 and metrics["distill/feature_mse"].abs() < 1e-10
    assert total == pytest.approx(0.5 * 3.0, abs=1e-5)  # (1 - alpha) x contrastive, nothing else
    assert metrics["time/teacher_ms"] > 0
    other = dict(out, image_features=out["image_features"].roll(1, 0))  # a student that pairs differently
    assert affinity_kl(other, out) > 0.01 and feature_mse(other, out) > 0.01


def test_the_affinity_kl_is_kl_teacher_to_student_times_t_squared_worked_by_hand():
    """3 images x 3 captions, temperature 2: the affinity term against KL(teacher || student) of the
    row (image->text) and column (text->image) softmaxes written out with math.exp / math.log, x T^2,
    the two directions averaged. The logits are not symmetric, so KL(student || teacher), one
    direction alone or a missing T^2 all give other numbers."""
    import math
    eye = torch.eye(3)
    student_logits = [[2.0, 0.5, -1.0], [0.0, 1.5, 0.3], [-0.7, 0.2, 1.1]]
    teacher_logits = [[3.0, -0.5, 0.1], [0.4, 2.5, -1.2], [-1.0, 0.9, 2.2]]
    # logit_scale 2 x features @ identity: the logits are 2 x the feature rows
    student = {"image_features": torch.tensor(student_logits) / 2, "text_features": eye,
               "logit_scale": torch.tensor(2.0)}
    teacher = {"image_features": torch.tensor(teacher_logits) / 2, "text_features": eye,
               "logit_scale": torch.tensor(2.0)}
    temperature = 2.0

    def softmax(row):
        z = sum(math.exp(v / temperature) for v in row)
        return [math.exp(v / temperature) / z for v in row]

    def kl_rows(t_rows, s_rows):  # mean over rows of sum_j p_t log(p_t / p_s)
        total = 0.0
        for t_row, s_row in zip(t_rows, s_rows):
            p_t, p_s = softmax(t_row), softmax(s_row)
            total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
        return total / len(t_rows)

    def columns(m):
        return [list(col) for col in zip(*m)]
    image_to_text = kl_rows(teacher_logits, student_logits)
    text_to_image = kl_rows(columns(teacher_logits), columns(student_logits))
    expected = (image_to_text + text_to_image) / 2 * temperature ** 2
    assert affinity_kl(student, teacher, temperature).item() == pytest.approx(expected, abs=1e-6)
    reversed_kl = (kl_rows(student_logits, teacher_logits) + kl_rows(columns(student_logits),
                                                                   columns(teacher_logits))) / 2 * temperature ** 2
    for wrong in (reversed_kl, expected / temperature ** 2, image_to_text * temperature ** 2,
                  text_to_image * temperature ** 2):
        assert abs(wrong - expected) > 1e-3  # the example tells each of these apart


@pytest.mark.slow
def test_a_char_level_dtp_student_distills_from_a_bpe_teacher_and_no_gradient_reaches_the_teacher(teacher, tmp_path,
                                                                                                  caplog):
    from fastclip.loop import Trainer
    from fastclip.tasks.clip import ClipTask
    cfg = compose_cfg([*TINY_CLIP, *STEPS, "boundary=fixed", "encoder.tokenizer=char", "boundary.text_tokens=bytes",
                       "encoder.embed_dim=16",
                       "compression=distill", f"compression.teacher={teacher['path']}", "trainer.max_steps=2",
                       "tracking.uri=sqlite:///" + str(tmp_path / "m.db")])
    task = ClipTask(cfg, torch.device("cpu"), tmp_path)
    distiller = task.compression.distiller
    assert type(distiller.teacher_tokenizer).__name__ != type(task.tokenizer).__name__ and not distiller.same_tokens
    projection = getattr(task.model, PROJECTION)
    assert projection.weight.shape == (32, 16)  # student width 16 -> teacher width 32
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    projection_before = projection.weight.detach().clone()
    trainer = Trainer(task, cfg, torch.device("cpu"))
    batch = next(iter(task.train_batches(0)))
    # the teacher reads the student's captions as BPE tokens of the same text
    texts = [bytes(int(i) - 1 for i in row if int(i)).decode() for row in batch.tokens]
    assert torch.equal(distiller.teacher_tokens(batch.tokens), distiller.teacher_tokenizer(texts))
    out = trainer.forward_backward(batch)
    assert {"distill/kl", "distill/feature_mse", "time/teacher_ms"} <= set(out.metrics)
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    trainer.step(len(batch.images))
    assert all(torch.equal(v, teacher_before[k]) for k, v in distiller.teacher.state_dict().items())
    assert not torch.equal(projection.weight, projection_before)  # the projection learns with the student
    assert not distiller.teacher.training
    # a teacher of another input size: the evaluation sets are the student's, so its own numbers are not
    # measured, and the run says so (they were left out without a word)
    from fastclip.compression.distill import compress
    distiller.image_size = 48
    with caplog.at_level("WARNING"):
        measured = compress(task, distiller, {})
    assert not any(k.endswith("_teacher") for k in measured) and "time/eval_batch_ms" in measured
    assert "the teacher reads 48 px images and the evaluation sets are preprocessed at the student's 32 px" in caplog.text


@pytest.mark.slow
def test_a_distill_run_logs_its_terms_and_the_teachers_numbers_and_loads_for_inference(teacher, tmp_path):
    import mlflow
    from fastclip.inference import load
    from fastclip.train import run
    spec = f"runs:/{teacher['run_id']}"
    cfg = compose_cfg([*TINY_CLIP, *STEPS, "encoder.embed_dim=16", "compression=distill", f"compression.teacher={spec}",
                       "trainer.max_steps=3", "tracking.log_every=1", f"tracking.uri={teacher['store']}"])
    metrics = run(cfg, tmp_path / "run")
    for key in ("zeroshot/top1", "zeroshot/top1_teacher", "time/eval_batch_ms", "time/eval_batch_ms_teacher"):
        assert key in metrics, key
    client = mlflow.tracking.MlflowClient(teacher["store"])
    for key in ("distill/kl", "distill/feature_mse", "time/teacher_ms"):
        assert len(client.get_metric_history(metrics["mlflow_run_id"], key)) == 3, key
    model, _, tokenizer = load(tmp_path / "run" / "checkpoints" / "last.pt")  # the projection is training-only
    assert not hasattr(model, PROJECTION)
    # the teacher it learned from, in its checkpoint and its run: runs:/<id> names that run's last.pt,
    # which changes as the teacher run trains on; a resume against other weights is refused
    from fastclip.checkpoint import ResumeError
    from fastclip.compression.distill import Distillation, weights_digest
    digest = weights_digest(load(teacher["path"])[0])
    kept = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["compression"]
    assert kept == {"teacher": {"checkpoint": str(teacher["path"]), "weights_digest": digest}}
    assert client.get_run(metrics["mlflow_run_id"]).data.tags["fastclip.teacher"] == f"{teacher['path']} (weights {digest})"
    moved = torch.load(teacher["path"], weights_only=False)
    moved["model"]["logit_scale"] = moved["model"]["logit_scale"] + 0.5  # the teacher run trained on
    torch.save(moved, tmp_path / "teacher_later.pt")
    option = Distillation(distill_cfg(tmp_path / "teacher_later.pt"), cfg)
    option.prepare(model, tokenizer)
    with pytest.raises(ResumeError, match=rf"compression.teacher=.*teacher_later.pt: .* other weights .*{digest}"):
        option.load_state_dict(kept)
    option.load_state_dict({})  # a checkpoint from before the record: taken as it is


def test_a_bad_teacher_fails_before_training_naming_it(teacher, tmp_path):
    from fastclip.tasks.clip import ClipTask
    model, tokenizer = build_clip(compose_cfg(TINY_CLIP).encoder, compose_cfg(TINY_CLIP).boundary)
    with pytest.raises(ConfigError, match=r"compression.teacher=/no/such/teacher.pt: .*no/such/teacher.pt"):
        build_distiller(distill_cfg("/no/such/teacher.pt"), model, tokenizer, 32, "cpu")
    with pytest.raises(ConfigError, match="compression.teacher=runs:/0123abcd: .*no MLflow run"):
        build_distiller(distill_cfg("runs:/0123abcd"), model, tokenizer, 32, "cpu", teacher["store"])
    lm = tmp_path / "lm.pt"
    state = torch.load(teacher["path"], weights_only=False)
    state["config"] = OmegaConf.to_container(compose_cfg(["task=lm"]), resolve=True)  # a char LM's checkpoint
    torch.save(state, lm)
    with pytest.raises(ConfigError, match=f"compression.teacher={lm}: .*task=lm"):
        build_distiller(distill_cfg(lm), model, tokenizer, 32, "cpu")
    cfg = compose_cfg([*TINY_CLIP, "compression=distill", "compression.teacher=/no/such/teacher.pt"])
    with pytest.raises(ConfigError, match="compression.teacher=/no/such/teacher.pt"):
        ClipTask(cfg, torch.device("cpu"), tmp_path)  # as the task is built: before the data is read


def test_distill_options_are_checked_before_training():
    with pytest.raises(ConfigError, match="compression=distill needs compression.teacher"):
        check_config(compose_cfg(["compression=distill"]))
    for key, value in (("alpha", "1.5"), ("beta", "-1"), ("temperature", "0")):
        with pytest.raises(ConfigError, match=f"compression.{key}={value}"):
            check_config(compose_cfg(["compression=distill", "compression.teacher=x.pt", f"compression.{key}={value}"]))
