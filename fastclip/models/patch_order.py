"""The order a DTP image tower reads its patches in (boundary.image_order). DTP pools runs of
consecutive tokens, so the order decides what shapes a segment can take: in raster order a run is
a strip along one row (wrapping to the next); along a Hilbert curve every step goes to a
neighbouring patch and every aligned run of 4^j patches is a 2^j x 2^j square, so runs are
compact blobs and fixed k=4 pools 2x2 squares. Hand-written: torch has no space-filling curve."""
import torch

from fastclip.errors import InputError
from fastclip.schema.model import IMAGE_ORDERS

ORDERS = IMAGE_ORDERS


def _hilbert_index(side: int, row: int, col: int) -> int:
    """Position of cell (row, col) along the Hilbert curve that fills a side x side grid (side a
    power of two). At each scale the quadrant picks two bits of the index, then the cell's
    coordinates are turned into that quadrant's frame (the curve enters each quadrant rotated)."""
    x, y, d = col, row, 0
    s = side // 2
    while s > 0:
        rx, ry = int((x & s) > 0), int((y & s) > 0)
        d += s * s * ((3 * rx) ^ ry)
        if ry == 0:  # lower quadrants are visited transposed (and mirrored on the right)
            if rx == 1:
                x, y = side - 1 - x, side - 1 - y
            x, y = y, x
        s //= 2
    return d


def patch_order(order: str, rows: int, cols: int) -> torch.Tensor | None:
    """-> [rows * cols] raster indices of the patches in reading order, or None for raster (the
    identity). A grid that is not a power-of-two square follows the curve of the smallest
    enclosing one, skipping cells outside the grid: on an even grid (ViT-B/16's 14 x 14) whole 2x2
    squares are kept or skipped, so fixed k=4 still pools squares."""
    if order not in ORDERS:
        raise InputError(f"boundary.image_order={order!r}: expected one of {', '.join(ORDERS)}")
    if order == "raster":
        return None
    side = 1
    while side < max(rows, cols):
        side *= 2
    key = torch.tensor([_hilbert_index(side, r, c) for r in range(rows) for c in range(cols)])
    return key.argsort()
