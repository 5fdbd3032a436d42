"""Efficiency measured, not assumed: FLOPs counted by torch's FlopCounterMode on a REAL eval
batch, with the boundaries the model produced on it, and the achieved compression of the
same pass (tokens in / segments out). The seed counted FLOPs with simulated evenly spaced
boundaries and labelled runs with the target rate; neither happens here."""
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from fastclip.models.boundaries import every_kth
from fastclip.models.outputs import TowerOutput
from fastclip.models.vision import DTPImageTower

_aten = torch.ops.aten


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter has formulas for the CUDA attention kernels but not for the CPU flash kernel,
# which it then counts as 0 FLOPs: attention scores and mixing vanished from CPU counts. Same
# formulas (torch's own), registered for the CPU op.
CPU_ATTENTION_FLOPS = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
                       _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops}


@torch.no_grad()
def count_gflops(fn, *inputs) -> tuple[float, object]:
    """(GFLOPs per sample, fn's output). The MHA fast path is switched off while counting: its
    fused kernel is invisible to the counter, the unfused path is counted exactly."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            out = fn(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / inputs[0].shape[0] / 1e9, out


@torch.no_grad()
def unpadded_gflops(tower, inputs: torch.Tensor, n: int, out: TowerOutput | None = None) -> float:
    """Mean GFLOPs of the first n samples (tower_efficiency: all of the batch) each run alone: each one's
    own segment count, none of the padding a batch with different counts pays for. A packed tower
    (image_layout / text_layout=packed) comes within its filler rows and, where its attention runs on
    the padded layout with a mask (not through varlen_attn: CUDA under half-precision autocast,
    models/packed.py), that attention's padding, of this; a padded one pays for every row's padding.
    out: the batch's TowerOutput; a sample alone costs what its (tokens, segments) decide, so one
    sample of each pair is counted (exact, tested; 64 counted forwards were 1.2 s an evaluation), but
    under eval_rule=sample, whose draw alone is not the batch's: every sample is counted."""
    n = min(n, len(inputs))
    drawn = getattr(getattr(tower, "method", None), "eval_rule", None) == "sample"  # alone, other boundaries
    keys = list(zip(out.tokens[:n].tolist(), out.segments[:n].tolist())) if out is not None and not drawn \
        else list(range(n))
    cost: dict = {}
    for i, key in enumerate(keys):
        if key not in cost:
            cost[key] = count_gflops(tower, inputs[i:i + 1])[0]
    return sum(cost[key] for key in keys) / n


@torch.no_grad()
def tower_efficiency(model, images: torch.Tensor, tokens: torch.Tensor, unpadded_samples: int | None = None
                     ) -> dict[str, float]:
    """efficiency/*_gflops: per sample of the batch as this implementation runs it (packed or padded);
    *_gflops_unpadded: per sample alone (DTP towers only, where segment counts differ), over the first
    `unpadded_samples` (None: the whole batch, the same samples as *_gflops, so the two differ by the
    padding alone; 0: not counted)."""
    was_training = model.training
    model.eval()
    image_gflops, image = count_gflops(model.visual, images)
    text_gflops, text = count_gflops(model.text, tokens)
    extra = {}
    for name, tower, inputs, out in (("image", model.visual, images, image), ("text", model.text, tokens, text)):
        if out.boundaries is not None and unpadded_samples != 0:  # DTP towers only
            extra[f"efficiency/{name}_gflops_unpadded"] = unpadded_gflops(tower, inputs, unpadded_samples or len(inputs),
                                                                          out)
    model.train(was_training)

    def compression(out: TowerOutput) -> float:
        segments = float(out.segments.sum())
        return float(out.tokens.sum()) / segments if segments > 0 else 1.0

    image_compression = compression(image)
    if image.boundaries is not None:
        extra["boundary/image_on_stride"] = on_grid_share(image.boundaries, max(1, round(image_compression)))
        start_k = model.visual.stride_k if isinstance(model.visual, DTPImageTower) else None
        if start_k:  # image_start=stride: has training moved the boundaries off the grid they started on?
            extra["boundary/image_on_start_stride"] = on_grid_share(image.boundaries, start_k)
    return {"efficiency/image_gflops": image_gflops, "efficiency/text_gflops": text_gflops,
            "efficiency/compression_image": image_compression,
            "efficiency/compression_text": compression(text), **extra}


def on_grid_share(boundaries: torch.Tensor, k: int) -> float:
    """Share of the boundaries (B x patches, 0/1) that sit where fixed k would put one (every k-th
    patch in reading order): 1.0 when a learned tower has settled on that grid, ~1/k for placements
    unrelated to it. The tower logs it at k = round(achieved compression) (boundary/image_on_stride)
    and, with a stride start, at the start's k (boundary/image_on_start_stride). The last patch is
    left out (a boundary there closes the last segment either way)."""
    b = boundaries[:, :-1].detach().float()
    on = every_kth(b.shape[1], k, b.device)
    total = b.sum()
    return float((b * on).sum() / total) if total > 0 else 1.0


def parameter_counts(model) -> dict[str, int]:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"model.params_image": count(model.visual), "model.params_text": count(model.text),
            "model.params_total": count(model)}
