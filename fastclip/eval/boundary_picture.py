"""What the boundaries look like: eval images with their segments coloured and outlined on the patch
grid (for the peer towers that drop patches, the dropped ones greyed; for ToMe, the patches each
final token holds as one segment), and captions with '|' at segment breaks. Logged as an MLflow
artifact every evaluation."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402

from fastclip.models.dtp import segment_ids  # noqa: E402


def _unnormalise(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    return (image.cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _characters(data: bytes):
    """(begin, end, text) of each UTF-8 character of data; a byte that starts no whole valid
    character (a caption cut mid-character by the context length) is a span of its own, text None."""
    i = 0
    while i < len(data):
        lead = data[i]
        width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        try:
            text = data[i:i + width].decode("utf-8")
        except UnicodeDecodeError:
            width, text = 1, None
        yield i, i + width, text
        i += width


def caption_with_breaks(data: bytes, boundaries) -> str:
    """A DTP text tower's segmentation of a caption's BYTES (its tokens), shown as text: '|' after a
    character whose last byte closes a segment. A character with a boundary between its bytes, or
    one cut by the context length, is shown as its bytes' \\xNN escapes, with the '|' where it falls.
    boundaries: one per byte (more are ignored: padding)."""
    closes = [float(b) > 0.5 for b in boundaries[:len(data)]]
    out = []
    for begin, end, text in _characters(data):
        if text is None or any(closes[begin:end - 1]):
            out.extend(f"\\x{byte:02x}" + ("|" if closes[j] else "") for j, byte in enumerate(data[begin:end], begin))
        else:
            out.append(text + ("|" if closes[end - 1] else ""))
    return "".join(out)


def next_picture(run_dir, suffix: str) -> Path:
    """<run_dir>/boundaries/eval_NNN.<suffix>, numbered after the pictures already there (a resumed
    run adds to its first part's); the folder is made."""
    folder = Path(run_dir) / "boundaries"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"eval_{len(list(folder.glob(f'eval_*.{suffix}'))) + 1:03d}.{suffix}"


def segment_grid(boundaries: torch.Tensor, rows: int, cols: int, scan: torch.Tensor | None = None) -> np.ndarray:
    """[rows, cols] segment id of every patch from one image's boundaries (in reading order);
    scan (reading position -> raster index) puts a non-raster order back on the grid."""
    seg = segment_ids(boundaries).cpu()
    if scan is not None:
        seg = torch.empty_like(seg).index_put_((scan.cpu(),), seg)
    return seg.numpy().reshape(rows, cols)


def group_edges(grid: np.ndarray) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The unit-cell sides ((x0, y0), (x1, y1)) between neighbouring cells of a [rows, cols] label
    grid that carry different labels (x: column, y: row; a group's outline)."""
    vertical = [((c + 1, r), (c + 1, r + 1)) for r, c in zip(*np.nonzero(grid[:, 1:] != grid[:, :-1]))]
    horizontal = [((c, r + 1), (c + 1, r + 1)) for r, c in zip(*np.nonzero(grid[1:] != grid[:-1]))]
    return [((int(a), int(b)), (int(c), int(d))) for (a, b), (c, d) in vertical + horizontal]


def _draw_groups(ax, grid: np.ndarray, height: int, width: int) -> None:
    """Over an image: the cells of each group of a [rows, cols] label grid (DTP's segments, ToMe's
    merged tokens) in one colour, single cells left clear, and every group outlined. tab20 has 20
    colours: the labels are shuffled so that neighbouring groups rarely share one (the outline
    separates them when they do)."""
    rows, cols = grid.shape
    _, inverse, counts = np.unique(grid.ravel(), return_inverse=True, return_counts=True)
    colour = np.random.default_rng(0).permutation(len(counts)) % 20
    shade = np.where(counts[inverse] > 1, colour[inverse], np.nan).reshape(rows, cols)
    ax.imshow(np.ma.masked_invalid(shade), cmap="tab20", vmin=0, vmax=19, alpha=0.45, interpolation="nearest",
              extent=(0, width, height, 0))
    sx, sy = width / cols, height / rows
    ax.add_collection(LineCollection([[(x0 * sx, y0 * sy), (x1 * sx, y1 * sy)] for (x0, y0), (x1, y1)
                                      in group_edges(grid)], colors="white", linewidths=0.8))


@torch.no_grad()
def draw(model, images: torch.Tensor, tokens: torch.Tensor, decode, path, n: int = 8) -> None:
    was_training = model.training
    model.eval()
    images, tokens = images[:n], tokens[:n]
    image_out, text_out = model.visual(images), model.text(tokens)
    # peer towers that drop or fuse patches (patch dropout at eval_keep, EViT): which ones they keep;
    # ToMe: which patches each final token holds
    kept = model.visual.kept_patches(images) if getattr(model.visual, "drops_at_eval", False) else None
    groups = model.visual.merged_groups(images) if hasattr(model.visual, "merged_groups") else None
    model.train(was_training)
    fig, axes = plt.subplots(2, len(images), figsize=(2.2 * len(images), 5), squeeze=False)
    b = image_out.boundaries
    for i, image in enumerate(images):
        ax = axes[0, i]
        ax.imshow(_unnormalise(image))
        if b is not None:
            rows, cols = model.visual.vit.grid_size
            seg = segment_grid(b[i], rows, cols, image_out.scan)
            _draw_groups(ax, seg, image.shape[-2], image.shape[-1])
            ax.set_title(f"{seg.size} -> {int(image_out.segments[i])}", fontsize=8)
        elif kept is not None:  # dropped (or fused) patches greyed out
            rows, cols = model.visual.vit.grid_size
            ax.imshow(~kept[i].cpu().numpy().reshape(rows, cols), cmap="Greys", alpha=0.6, vmin=0, vmax=1,
                      interpolation="nearest", extent=(0, image.shape[-1], image.shape[-2], 0))
            reductions = len(getattr(model.visual, "layers", ()))  # EViT at several blocks: the first one's
            ax.set_title(f"{kept[i].numel()} -> {int(kept[i].sum())} kept"
                         + (f" (first of {reductions} reductions)" if reductions > 1 else ""), fontsize=8)
        elif groups is not None:  # the patches one token holds, as a segment
            rows, cols = model.visual.vit.grid_size
            _draw_groups(ax, groups[i].cpu().numpy().reshape(rows, cols), image.shape[-2], image.shape[-1])
            ax.set_title(f"{groups[i].numel()} -> {len(groups[i].unique())} tokens", fontsize=8)
        ax.axis("off")
        tb = text_out.boundaries  # DTP text towers: per BPE token (the tower labels them) or per byte
        if tb is not None and hasattr(model.text, "caption_with_breaks"):
            label = model.text.caption_with_breaks(tokens[i].tolist(), tb[i].tolist())
        else:
            label = (caption_with_breaks(model.text.tokenizer.to_bytes(tokens[i].tolist()), tb[i].tolist())
                     if tb is not None else decode(tokens[i]))
        axes[1, i].text(0, 0.5, "\n".join(label[j:j + 18] for j in range(0, len(label), 18)), fontsize=7,
                        family="monospace", va="center")
        axes[1, i].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
