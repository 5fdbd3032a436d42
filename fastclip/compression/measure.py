"""What finish() measures for every compression option, the compressed model and its twin alike:
the quality keys it reports, the eval latency of one batch under the run's autocast, the bytes on disk."""
import io
import statistics
import time

import torch
from torch import nn

from fastclip import runtime

# the quality numbers an option reports under their own names and, with _<twin>, for its twin
QUALITY = ("zeroshot/top1", "zeroshot/top5", "zeroshot/imagenet_top1", "zeroshot/imagenet_top5", "retrieval/")


def model_bytes(model: nn.Module) -> int:
    """Bytes of the serialized state_dict (torch.save): what the model costs on disk. Counted from the
    bytes written, not numel x element_size, which counts an int8 tensor subclass as its float view."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def eval_batch_ms(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, repeats: int = 7,
                  amp_dtype: torch.dtype | None = None) -> float:
    """Median wall time (ms) of one forward of the whole model on the batch (side_by_side_ms of one)."""
    return side_by_side_ms([(model, images, tokens)], repeats, amp_dtype)[0]


@torch.no_grad()
def side_by_side_ms(runs: list[tuple[nn.Module, torch.Tensor, torch.Tensor]], repeats: int = 7,
                    amp_dtype: torch.dtype | None = None) -> list[float]:
    """Each (model, images, tokens)'s median wall time (ms) of one forward, timed side by side: one
    warm-up forward each, then `repeats` rounds of one forward of every model, the order reversed every
    other round, so what else runs on the machine (another job, a test) slows every model alike and
    their ratio holds where one model timed after the other would not. CUDA is synchronised around
    each forward. amp_dtype: the autocast they run under (a run's own, runtime.autocast_dtype of
    trainer.precision; None: none), so a compressed model and its twin are timed in the same
    arithmetic (runtime.math_mode names it). Each model is left in eval mode."""
    for model, _, _ in runs:
        model.eval()
    times: list[list[float]] = [[] for _ in runs]
    for round_ in range(repeats + 1):
        order = range(len(runs)) if round_ % 2 == 0 else reversed(range(len(runs)))
        for k in order:
            model, images, tokens = runs[k]
            if images.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with runtime.autocast(images.device, amp_dtype):
                model(images, tokens)
            if images.is_cuda:
                torch.cuda.synchronize()
            if round_:  # round 0 warms every model up
                times[k].append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]


def run_autocast(cfg, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a run trains under (trainer.precision on `device`; None: none): the one
    compression latencies are measured under, for the compressed model and its twin alike."""
    return runtime.autocast_dtype(cfg.trainer.precision, device)
