"""bench-gpu's CPU smoke run (make bench-gpu measures on a GPU): every row and column comes out."""
import pytest
import torch

from fastclip.bench import gpu


def test_bench_gpu_smoke_run_on_cpu_fills_every_row(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "PROJECT_ROOT", tmp_path)
    out = tmp_path / "table.md"
    gpu.main(["--device", "cpu", "--encoder", "vit_tiny", "--batch", "4", "--steps", "1", "--warmup", "0",
              "--workers", "0", "--out", str(out)])
    text = out.read_text()
    for label, _ in gpu.VARIANTS.values():
        assert f"| {label.format(encoder='vit_tiny')} |" in text
    assert "train GFLOPs/step" in text and "fed by the loader (0 workers)" in text and "batch in memory" in text
    assert (tmp_path / "outputs" / "bench" / "gpu" / "shards224" / "sizes.json").is_file()


def test_only_runs_the_rows_named_with_vanilla_and_refuses_an_unknown_one(tmp_path, monkeypatch):
    """--only (the device check's compiled pass runs a few rows in its minutes): vanilla always (every
    ratio is over it), table order kept, an unknown row named before anything runs."""
    assert gpu.chosen(None) == [*gpu.VARIANTS, "tome", "loader"]
    assert gpu.chosen("fixed, gumbel") == ["vanilla", "gumbel", "fixed"]
    with pytest.raises(SystemExit, match="unknown fixd"):
        gpu.chosen("vanilla,fixd")
    monkeypatch.setattr(gpu, "PROJECT_ROOT", tmp_path)
    out = tmp_path / "table.md"
    gpu.main(["--device", "cpu", "--encoder", "vit_tiny", "--batch", "4", "--steps", "1", "--warmup", "0",
              "--only", "fixed", "--out", str(out)])
    rows = [line.split(" | ")[0] for line in out.read_text().splitlines()[2:]]
    assert rows == ["| vanilla vit_tiny", "| DTP fixed k=4"]  # the encoder it ran; no ToMe row, no loader table
    assert not (tmp_path / "outputs").exists()  # the loader row's shards were never made
    with pytest.raises(SystemExit, match="name one of them too"):  # ToMe is matched to their GFLOPs
        gpu.chosen("tome")


def test_a_failing_row_costs_that_row_only_and_fails_the_run(tmp_path, monkeypatch):
    """An out-of-memory or compile error in one row: the others are measured, the table (rewritten
    after every row) names it failed, and the run exits non-zero (the device check's summary reads it)."""
    real = gpu.bench_variant

    def flaky(overrides, *args):
        if "boundary=fixed" in overrides:
            raise RuntimeError("CUDA out of memory")
        return real(overrides, *args)
    monkeypatch.setattr(gpu, "bench_variant", flaky)
    out = tmp_path / "table.md"
    with pytest.raises(SystemExit, match="1 row.*failed: DTP fixed k=4"):
        gpu.main(["--device", "cpu", "--encoder", "vit_tiny", "--batch", "4", "--steps", "1", "--warmup", "0",
                  "--only", "fixed,gumbel", "--out", str(out)])
    text = out.read_text()
    assert "| DTP gumbel 0.25 | " in text and "| DTP fixed k=4 | failed: RuntimeError: CUDA out of memory |" in text


def test_step_time_is_the_throughput_between_two_synchronizations(monkeypatch):
    """N steps between ONE synchronize before and one after (not one around each step)."""
    syncs, calls = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(len(calls)))
    gpu.seconds_per_step(lambda: calls.append(1), 5, torch.device("cuda"))
    assert syncs == [0, 5]


def test_training_gflops_count_both_towers_forward_and_backward():
    """The counted step (fastclip.loop.probe_gflops) is the whole step's: more than the image tower's
    eval forward on the same batch, and the text tower's share included."""
    from fastclip.eval.efficiency import count_gflops
    from fastclip.loop import probe_gflops
    model, tokenizer, _ = gpu.build(["encoder=vit_tiny", "boundary=none"], torch.device("cpu"))
    images, texts = torch.randn(4, 3, 32, 32), tokenizer(["a cat"] * 4)
    step = probe_gflops(gpu.InMemorySteps(model, (images, texts)), None, torch.device("cpu"))
    with torch.no_grad():
        image_eval, _ = count_gflops(model.visual.eval(), images)
    model.train()
    assert step > 3 * image_eval  # forward + backward (~3x forward) of the image tower, plus the text tower's
    assert not any(p.grad is not None for p in model.parameters())  # counted without a trace


def test_kernel_time_leaves_out_annotation_spans():
    """A ProfilerStep annotation span on the device covers the kernels it holds: counted once."""
    from types import SimpleNamespace
    from torch.autograd import DeviceType

    def event(us, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(time_range=SimpleNamespace(elapsed_us=lambda: us), device_type=device,
                               is_user_annotation=annotation)
    events = [event(100), event(30), event(150, annotation=True), event(500, device=DeviceType.CPU)]
    assert gpu.device_busy_us(events) == 130



def test_gpu_kit_covers_every_distribution_the_gpu_check_imports():
    """scripts/gpu_check.sh runs on a machine that reaches no network: what its code imports must be in
    that machine's image or in the kit (make gpu-kit), and an import that is in neither is named."""
    import subprocess
    import sys
    from fastclip import PROJECT_ROOT
    kit = [sys.executable, str(PROJECT_ROOT / "scripts" / "gpu_kit.py"), "--check"]
    done = subprocess.run(kit, capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(kit + ["--modules", "fastclip.bench.gpu,mlflow"], capture_output=True, text=True,
                          cwd=PROJECT_ROOT)
    named = done.stderr.split(" imports ")[1].split(":")[0].split(", ")
    assert done.returncode == 1 and "mlflow" in named  # the MLflow store is not on that machine
