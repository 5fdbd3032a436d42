"""compression=quant: attention as Linears equals nn.MultiheadAttention; the int8 copy runs, is
smaller by its measured bytes and stays close to the dense model; a run logs both."""
import io

import mlflow
import pytest
from omegaconf import OmegaConf
import torch
from torch import nn

from conftest import TINY_CLIP, compose_cfg
from fastclip.checks import ConfigError, check_config
from fastclip.compression.attention import ProjectedAttention, project_attention
from fastclip.compression.measure import model_bytes
from fastclip.compression.quant import int8_weight_fraction, quantized_copy
from fastclip.models.clip import build_clip


def test_attention_as_linears_gives_multihead_attentions_results_under_each_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    projected = ProjectedAttention(mha).eval()
    x = torch.randn(3, 7, 32)
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)
    masks = [dict(), dict(attn_mask=causal), dict(attn_mask=torch.zeros(7, 7).masked_fill(causal, float("-inf"))),
             dict(attn_mask=torch.randn(3 * 4, 7, 7)),  # per head, as DTP's padding masks and ToMe's size bias
             dict(key_padding_mask=torch.tensor([[False] * 7, [False] * 5 + [True] * 2, [False] * 6 + [True]]))]
    for mask in masks:
        expected = mha(x, x, x, need_weights=False, **mask)[0]
        torch.testing.assert_close(projected(x, x, x, need_weights=False, **mask)[0], expected, atol=1e-6, rtol=0)


# wide enough that the per-row scales and the serialization's per-tensor overhead (about 30% of an int8
# 32x32 matrix) do not hide the 4x of int8 weights
SMALL_CLIP = [*TINY_CLIP, "encoder.vision.width=128", "encoder.vision.head_width=32", "encoder.text.width=128",
              "encoder.embed_dim=64"]


def tiny(boundary: str, *overrides: str):
    cfg = compose_cfg([*SMALL_CLIP, f"boundary={boundary}", *overrides])
    model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
    return model.eval(), tokenizer


def linear_weight_bytes(model: nn.Module) -> int:
    """Serialized bytes of every Linear's weight (what quantization converts)."""
    buffer = io.BytesIO()
    torch.save({n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}, buffer)
    return buffer.tell()


@pytest.mark.parametrize("boundary,scheme", [("none", "dynamic"), ("none", "weight_only"), ("fixed", "dynamic")])
def test_the_int8_copy_runs_is_smaller_by_its_bytes_covers_attention_and_stays_close(boundary, scheme):
    torch.manual_seed(0)
    model, tokenizer = tiny(boundary)
    images = torch.randn(6, 3, 32, 32)
    tokens = tokenizer(["a red square", "a blue one", "the digit seven", "a cat", "two dogs", "nothing at all"])
    quantized = quantized_copy(model, scheme)
    attention = [m for m in quantized.modules() if isinstance(m, ProjectedAttention)]
    assert len(attention) == 4 and not any(isinstance(m, nn.MultiheadAttention) for m in quantized.modules())
    linears = [m for m in quantized.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)  # attention's projections too
    # MHA's out_proj already is a (NonDynamicallyQuantizable)Linear; its bare in_proj_weight becomes one
    dense_linears = sum(isinstance(m, nn.Linear) for m in model.modules()) + 4
    assert len(linears) == dense_linears
    ratio = linear_weight_bytes(project_attention_copy(model)) / linear_weight_bytes(quantized)
    assert ratio >= 3, ratio
    assert model_bytes(quantized) < model_bytes(model)
    assert 0 < int8_weight_fraction(quantized) < 1 and int8_weight_fraction(model) == 0
    with torch.no_grad():
        dense, int8 = model(images, tokens), quantized(images, tokens)
    logits = dense["image_features"] @ dense["text_features"].T * dense["logit_scale"]
    logits_q = int8["image_features"] @ int8["text_features"].T * int8["logit_scale"]
    error = (logits_q - logits).abs().max()
    assert error < 0.05 * logits.abs().max()
    # the same choice wherever the dense one is clear by more than the int8 error (a near-tie, 0.005 apart,
    # may flip with the machine's int8 kernels: it did on one CPU and not on another)
    top2 = logits.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * error
    assert clear.sum() >= 3 and torch.equal(logits_q.argmax(1)[clear], logits.argmax(1)[clear])
    assert all(type(p).__name__ == "Parameter" or type(p).__name__ == "Tensor" for p in model.parameters())  # untouched


def project_attention_copy(model):
    import copy
    out = copy.deepcopy(model)
    project_attention(out)
    return out


@pytest.mark.parametrize("boundary", ["none", "fixed", "gumbel", "tome"])
def test_a_model_with_attention_as_linears_computes_what_it_did(boundary):
    """Through open_clip's blocks, DTP's packed rows (fixed) and padded rows, and ToMe's size bias."""
    torch.manual_seed(0)
    model, tokenizer = tiny(boundary)
    images, tokens = torch.randn(4, 3, 32, 32), tokenizer(["a red square", "a cat", "the digit one", "two"])
    with torch.no_grad():
        before, after = model(images, tokens), project_attention_copy(model)(images, tokens)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)


def test_predictors_stay_float_and_the_int8_share_counts_the_int8_weights():
    model, _ = tiny("gumbel")
    quantized = quantized_copy(model, "dynamic")
    int8 = {n for n, m in quantized.named_modules() if isinstance(m, nn.Linear) and type(m.weight).__name__ == "Int8Tensor"}
    floats = {n for n, m in quantized.named_modules() if isinstance(m, nn.Linear)} - int8
    assert floats and all("predictor" in n for n in floats) and not any("predictor" in n for n in int8)
    embeddings = [m for m in quantized.modules() if isinstance(m, nn.Embedding)]
    assert embeddings and all(type(m.weight).__name__ == "IntxUnpackedToInt8Tensor" for m in embeddings)
    counted = sum(m.weight.numel() for n, m in quantized.named_modules() if n in int8)
    counted += sum(m.weight.numel() for m in embeddings)
    assert int8_weight_fraction(quantized) == pytest.approx(counted / sum(p.numel() for p in model.parameters()))


def test_token_embeddings_are_int8_by_row_unless_left_float():
    """The BPE table is most of a small CLIP's bytes (a sixth of ViT-B/32's): compression.embedding=int8
    stores it int8 with a scale per row, >= 3x fewer bytes, each looked-up row close to the float one."""
    torch.manual_seed(0)
    model, tokenizer = tiny("none")
    tokens = tokenizer(["a red square", "the digit seven"])
    int8, kept = quantized_copy(model, "dynamic"), quantized_copy(model, "dynamic", embedding="float")
    table, table_q = model.text.text.token_embedding, int8.text.text.token_embedding
    assert type(kept.text.text.token_embedding.weight).__name__ == "Parameter"

    def saved(t):
        buffer = io.BytesIO()
        torch.save(t, buffer)
        return buffer.tell()
    assert saved(table.weight.detach()) / saved(table_q.weight) >= 3
    with torch.no_grad():
        rows, rows_q = table(tokens), table_q(tokens)
    assert ((rows_q - rows).abs().amax(-1) <= rows.abs().amax(-1) / 254 + 1e-6).all()  # half an int8 step of its row
    assert model_bytes(int8) < model_bytes(kept)
    with pytest.raises(ValueError, match="compression.embedding='int4'"):
        quantized_copy(model, "dynamic", embedding="int4")


def test_rn50s_attention_pooling_stays_float_and_the_int8_copy_runs():
    cfg = compose_cfg(["encoder=rn50", "+encoder.vision.width=8", "+encoder.vision.image_size=64",
                       "+encoder.vision.layers=[1,1,1,1]", "+encoder.text.width=32", "+encoder.text.layers=1",
                       "+encoder.text.heads=2", "encoder.embed_dim=32"])
    model, tokenizer = build_clip(cfg.encoder, cfg.boundary)
    quantized = quantized_copy(model.eval(), "dynamic")
    pooling = [n for n, m in quantized.named_modules() if type(m).__name__ == "AttentionPool2d"]
    assert pooling and all(type(m.weight).__name__ == "Parameter" for n, m in quantized.named_modules()
                           if n.startswith(pooling[0] + ".") and isinstance(m, nn.Linear))
    images, tokens = torch.randn(2, 3, 64, 64), tokenizer(["a red square", "a cat"])
    with torch.no_grad():
        dense, int8 = model(images, tokens), quantized(images, tokens)
    assert torch.nn.functional.cosine_similarity(int8["image_features"], dense["image_features"]).min() > 0.95
    # structured pruning takes heads and channels from transformer blocks: RN50's image tower has none, so
    # it once pruned the text tower alone while the run reported structured pruning
    from fastclip.compression.prune import Pruning
    structured = OmegaConf.create({"name": "prune", "sparsity": 0.5, "structure": "structured", "schedule": "oneshot",
                                   "finetune_steps": 0, "start_step": None, "prune_every": None})
    with pytest.raises(ConfigError, match=r"compression.structure=structured with encoder=rn50: its image tower "
                                          r"has no transformer blocks"):
        Pruning(structured, cfg).prepare(model)
    Pruning(OmegaConf.merge(structured, {"structure": "unstructured"}), cfg).prepare(model)


def test_compression_options_are_checked_before_training():
    with pytest.raises(ConfigError, match="compression=quant with task=lm"):
        check_config(compose_cfg(["task=lm", "compression=quant"]))
    with pytest.raises(ConfigError, match="compression.scheme='int4'"):
        check_config(compose_cfg(["compression=quant", "compression.scheme=int4"]))
    with pytest.raises(ConfigError, match="compression.embedding='int4'"):
        check_config(compose_cfg(["compression=quant", "compression.embedding=int4"]))
    # not a bool (OmegaConf's: true/false, yes/no, on/off): the schema types compression.qat, so Hydra
    # refuses it while composing, naming the override; a config built without Hydra (a resumed run's,
    # from its checkpoint's keys) is refused by check_config, naming the key and the value
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException, match="compression.qat=maybe"):
        compose_cfg(["compression=quant", "compression.qat=maybe"])
    untyped = OmegaConf.create(OmegaConf.to_container(compose_cfg(["compression=quant"])))
    untyped.compression.qat = "maybe"
    with pytest.raises(ConfigError, match="compression.qat: Value 'maybe' is not a valid bool"):
        check_config(untyped)


def test_a_qat_scheme_torchao_cannot_fake_quantize_fails_before_training_naming_it(monkeypatch, tmp_path):
    """torchao 0.18 has no QAT for the int8 config quantized_copy deploys: were it chosen, the run stops
    while the task is built, naming the key, its value and torchao's reason."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from fastclip.compression import quant
    from fastclip.tasks.clip import ClipTask
    monkeypatch.setitem(quant.QAT_BASES, "dynamic", Int8DynamicActivationInt8WeightConfig)
    cfg = compose_cfg([*TINY_CLIP, "compression=quant", "compression.qat=true"])
    with pytest.raises(ConfigError, match=r"compression.scheme='dynamic' with compression.qat=true: this torchao "
                                          r"cannot fake-quantize it \(Unexpected base config"):
        ClipTask(cfg, torch.device("cpu"), tmp_path)


def quant_run(tmp_path, *overrides: str) -> tuple[dict, str]:
    """A tiny compression=quant run -> (its metrics, its MLflow store)."""
    from fastclip.train import run
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_cfg([*TINY_CLIP, "compression=quant", "trainer.warmup_steps=1", "eval.boundary_picture=false",
                       f"tracking.uri={store}", *overrides])
    return run(cfg, tmp_path / "run"), store


def test_the_final_line_says_whose_numbers_its_twins_are():
    from fastclip.train import final_line
    plain = {"zeroshot/top1": 0.5, "zeroshot/top1_all_patches": 0.52, "zeroshot/top1_placement_gain": -0.01,
             "zeroshot/top5": 0.9, "mlflow_run_id": "abc"}
    assert final_line("zeroshot/top1", plain) == \
        "final zeroshot/top1 = 0.5000 (all_patches 0.5200, placement_gain -0.0100)"
    quantized = {**plain, "zeroshot/top1": 0.49, "zeroshot/top1_dense": 0.5}  # the loop's twins came before int8
    assert final_line("zeroshot/top1", quantized) == ("final zeroshot/top1 = 0.4900 (dense 0.5000; the trained "
                                                      "model's: all_patches 0.5200, placement_gain -0.0100)")
    assert final_line("zeroshot/top1", {"zeroshot/top1": 0.3, "zeroshot/top1_teacher": 0.4}) == \
        "final zeroshot/top1 = 0.3000 (teacher 0.4000)"
    assert final_line("lm/test_bpc", {"lm/test_bpc": 1.5}) == "final lm/test_bpc = 1.5000"
    assert final_line("zeroshot/top1", {"zeroshot/top1": 0.3, "zeroshot/top1_reduced": 0.4}) == \
        "final zeroshot/top1 = 0.3000 (reduced, just before the full-token phase, 0.4000)"
    # what guessing scores, where the run logged its test set's class count
    assert final_line("zeroshot/top1", {"zeroshot/top1": 0.93, "zeroshot/classes": 10.0}) == \
        "final zeroshot/top1 = 0.9300 (chance 0.10)"


def test_the_math_mode_names_tf32_where_float32_matmuls_may_use_it_and_a_cpu_run_leaves_them_fp32():
    """set_float32_matmul_precision("high") makes CUDA's float32 matmuls TF32: a latency measured
    so is labelled tf32, not fp32. A CPU run does not set it (its fp32 is IEEE fp32)."""
    from fastclip import runtime
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        runtime.use_tf32_matmuls(cpu)
        assert runtime.math_mode(cpu) == "fp32" and runtime.math_mode(cuda) == "fp32"
        runtime.use_tf32_matmuls(cuda)
        assert runtime.math_mode(cuda) == "tf32"
        assert runtime.math_mode(cuda, torch.bfloat16) == "bf16 autocast"
        assert runtime.math_mode(cpu, torch.float16) == "fp16 autocast"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("option", ["quant", "prune", "distill"])
def test_a_compressed_model_and_its_twin_are_timed_under_the_runs_autocast(tmp_path, option):
    """trainer.precision=bf16 (a run training under bf16 autocast): every timed forward, the compressed
    model's and its dense (or teacher's) twin's, runs under the same bf16 autocast."""
    from fastclip.compression import distill, prune, quant
    from fastclip.loop import Trainer
    from fastclip.tasks.clip import ClipTask
    overrides = [*TINY_CLIP, f"compression={option}", "trainer.precision=bf16", "trainer.max_steps=2"]
    if option == "prune":
        overrides.append("compression.finetune_steps=1")
    if option == "distill":  # the teacher: the student's own untrained weights, saved as a checkpoint
        from fastclip import checkpoint
        from fastclip.runtime import config_container
        teacher_cfg = compose_cfg(TINY_CLIP)
        model, _ = build_clip(teacher_cfg.encoder, teacher_cfg.boundary)
        checkpoint.save(tmp_path / "teacher.pt", {"model": model.state_dict(), "config": config_container(teacher_cfg)})
        overrides.append(f"compression.teacher={tmp_path / 'teacher.pt'}")
    cfg = compose_cfg(overrides)
    task = ClipTask(cfg, torch.device("cpu"), tmp_path)
    trainer = Trainer(task, cfg, torch.device("cpu"))
    timed = []

    def record(module, args):
        timed.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
    models = [task.model] + ([task.compression.distiller.teacher] if option == "distill" else [])
    for model in models:  # a copy (the int8 one, the shrunk one) keeps the hook
        model.register_forward_pre_hook(record)
    if option == "quant":
        quant.compress(task, cfg, {})
    elif option == "prune":
        trainer.compression.pruner.after_step(trainer.compression.pruner.end)
        prune.compress(task, cfg, trainer.compression.pruner, {}, trainer.compression.pruner.end)
    else:
        distill.compress(task, task.compression.distiller, {})
    assert len(timed) == 2 * 8 and set(timed) == {torch.bfloat16}  # 2 models x (1 warm-up + 7 timed)


@pytest.mark.slow
def test_a_quant_run_logs_the_int8_models_numbers_beside_the_dense_ones(tmp_path, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="fastclip")
    metrics, store = quant_run(tmp_path, "trainer.max_steps=4")
    for key in ("zeroshot/top1", "zeroshot/top1_dense", "compression/model_mb", "compression/model_mb_dense",
                "compression/int8_weight_fraction", "time/eval_batch_ms", "time/eval_batch_ms_dense"):
        assert key in metrics, key
    assert metrics["compression/model_mb"] < metrics["compression/model_mb_dense"]
    said = f"zeroshot/top1 {metrics['zeroshot/top1']:.4g} (dense {metrics['zeroshot/top1_dense']:.4g})"
    assert f"compression=quant (dynamic): {said}" in caplog.text  # the console says it too, not only MLflow
    assert (f"final zeroshot/top1 = {metrics['zeroshot/top1']:.4f} (dense {metrics['zeroshot/top1_dense']:.4f}; "
            f"chance 0.10)" in caplog.text)  # and the run's last line, with the twin and what guessing scores
    # a CPU run's float32 is IEEE fp32 (no TF32 set for it), and its latencies say which arithmetic they are
    assert torch.get_float32_matmul_precision() == "highest" and "latencies in fp32" in caplog.text
    client = mlflow.tracking.MlflowClient(store)
    history = client.get_metric_history(metrics["mlflow_run_id"], "zeroshot/top1")
    # the loop's last evaluation (dense), then the int8 model's at the same step, logged last
    assert history[-2].value == pytest.approx(metrics["zeroshot/top1_dense"])
    assert history[-1].value == pytest.approx(metrics["zeroshot/top1"])
    assert client.get_run(metrics["mlflow_run_id"]).data.metrics["zeroshot/top1"] == pytest.approx(
        metrics["zeroshot/top1"])
    assert client.get_run(metrics["mlflow_run_id"]).data.tags["fastclip.latency_math"] == "fp32"


@pytest.mark.slow
def test_a_failing_compression_leaves_the_trained_run_finished_and_says_why(tmp_path, monkeypatch):
    from fastclip.compression import quant

    def fails(*args, **kwargs):
        raise RuntimeError("out of memory in the int8 copy")
    monkeypatch.setattr(quant, "compress", fails)
    metrics, store = quant_run(tmp_path, "trainer.max_steps=2")
    finished = mlflow.tracking.MlflowClient(store).get_run(metrics["mlflow_run_id"])
    assert finished.info.status == "FINISHED" and "zeroshot/top1" in finished.data.metrics
    assert finished.data.tags["fastclip.compression_error"] == "RuntimeError: out of memory in the int8 copy"
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize("boundary", ["none", "fixed"])
def test_quantization_aware_training_fake_quantizes_attention_too_and_keeps_multihead_checkpoints(boundary):
    """DTP's packed rows call attention's own projections, so fake quantization acts there as well;
    the prepared model's state_dict loads into a model built with nn.MultiheadAttention (fastclip.load)."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear
    from fastclip.compression.quant import from_qat, prepare_qat
    torch.manual_seed(0)
    dense, tokenizer = tiny(boundary)
    model = project_attention_copy(dense)
    prepare_qat(model, "dynamic")
    fake = [n for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)]
    assert any(n.endswith("attn.in_proj") for n in fake) and any(n.endswith("attn.out_proj") for n in fake)
    assert set(model.state_dict()) == set(dense.state_dict())  # MultiheadAttention's keys
    images, tokens = torch.randn(4, 3, 32, 32), tokenizer(["a red square", "a cat", "the digit one", "two"])
    called = set()
    for name in fake:  # every fake-quantized projection runs (not only its weight read)
        dict(model.named_modules())[name].register_forward_hook(lambda m, i, o, name=name: called.add(name))
    with torch.no_grad():
        before, simulated = dense(images, tokens), model(images, tokens)
    assert called == set(fake)
    gap = (simulated["image_features"] - before["image_features"]).abs().max()
    assert 0 < gap < 0.05  # int8 rounding, simulated
    fresh, _ = tiny(boundary)
    fresh.load_state_dict(model.state_dict())  # what fastclip.load does with a QAT run's checkpoint
    model.train()
    out = model(images, tokens)
    (out["image_features"] @ out["text_features"].T).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "attn.in_proj" in n)
    from_qat(model)
    assert not any(isinstance(m, FakeQuantizedLinear) for m in model.modules())


@pytest.mark.slow
def test_a_quantization_aware_run_ends_with_the_int8_model_beside_its_float_weights(tmp_path, caplog):
    import logging
    from fastclip.inference import load
    caplog.set_level(logging.INFO, logger="fastclip")
    metrics, _ = quant_run(tmp_path, "compression.qat=true", "trainer.max_steps=3")
    for key in ("zeroshot/top1", "zeroshot/top1_dense", "compression/model_mb", "compression/int8_weight_fraction"):
        assert key in metrics, key
    assert "quantization-aware training" in caplog.text
    model, _, _ = load(tmp_path / "run" / "checkpoints" / "last.pt")  # a plain float model
    assert any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def test_a_compressed_model_and_its_twin_are_timed_side_by_side():
    """time/eval_batch_ms and its twin were each timed after the other: a job or test starting between
    them moved one alone (a helper saw 303 vs 868 ms where a quiet machine gives 35 vs 10). Each round
    now runs one forward of every model, the order reversed every other round, so load hits both."""
    from fastclip.compression.measure import side_by_side_ms
    calls = []

    class Stub(torch.nn.Module):
        def __init__(self, name, seconds):
            super().__init__()
            self.name, self.seconds = name, seconds

        def forward(self, images, tokens):
            import time
            calls.append(self.name)
            time.sleep(self.seconds)

    batch = (torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, dtype=torch.long))
    fast, slow = side_by_side_ms([(Stub("a", 0.001), *batch), (Stub("b", 0.02), *batch)], repeats=4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]  # warm-up round, then 4 alternating
    assert 15 < slow < 200 and fast < slow / 4  # each model's own median, in ms
