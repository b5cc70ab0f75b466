"""PIL's bicubic resize + the center crop, for a whole batch of decoded images at once, in torch: the same bytes
as image.resize_center_crop (Image.resize(..., BICUBIC), then the crop) for the same decoded pixels.

Pillow's arithmetic (src/libImaging/Resample.c; ../shared/notes/pil-bicubic-resize.md): per axis, each output
pixel i has a window of input pixels starting at xmin with bicubic (a=-0.5) weights, widened by the scale when
downscaling, normalised in double precision and turned into 22-bit fixed point; the horizontal pass runs first
and rounds to 8 bit, then the vertical pass. Only the crop's rows and columns are computed: an output pixel's
weights do not depend on the others, so that is the same as resizing everything and cropping.

Batched: the images go into one zero-padded N x 3 x H x W buffer by one gather from their packed bytes; each
pass gathers every output pixel's taps for all images at once (a per-image table of input index and weight)
and sums them in int32, as Pillow does (|sum| <= 255 * 1.3 * 2^22 < 2^31). The number of device operations
per batch does not depend on the number of images. The same code runs on CPU (CI) and CUDA.
"""

from __future__ import annotations

import functools

import numpy as np

from pipeline.embed.image import resize_geometry

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images
SUPPORT = 2.0        # bicubic


def bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic_filter (a = -0.5), in double precision, in its operation order."""
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def window(in_size: int, out_size: int) -> int:
    """Pillow's ksize: the most input pixels one output pixel of an in_size -> out_size resize reads."""
    return int(np.ceil(SUPPORT * max(in_size / out_size, 1.0))) * 2 + 1


@functools.lru_cache(maxsize=4096)  # a dataset has few distinct image sizes
def coefficients(in_size: int, out_size: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for output pixels first..first+count-1 of an
    in_size -> out_size resize along one axis: (xmin per output pixel, count x taps int64 fixed-point weights)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    taps = window(in_size, out_size)
    out = np.arange(first, first + count, dtype=np.float64)
    center = (out + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - xmin
    x = np.arange(taps, dtype=np.float64)[None, :]
    weights = np.where(x < xmax[:, None], bicubic((x + xmin[:, None] - center[:, None] + 0.5) * ss), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.where(total != 0.0, weights / np.where(total != 0.0, total, 1.0), weights)
    fixed = np.where(weights < 0, np.trunc(-0.5 + weights * (1 << PRECISION_BITS)),
                     np.trunc(0.5 + weights * (1 << PRECISION_BITS)))
    return xmin, fixed.astype(np.int64)


def tap_table(sizes: list[int], outs: list[int], firsts: list[int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N x size x taps input index, N x size x taps fixed-point weight) for each image's output pixels
    firsts[n]..firsts[n]+size-1 along one axis; taps past an image's window have weight 0 (index 0)."""
    tables = [coefficients(i, o, f, size) for i, o, f in zip(sizes, outs, firsts)]
    taps = max(fixed.shape[1] for _, fixed in tables)
    index = np.zeros((len(tables), size, taps), dtype=np.int64)
    weight = np.zeros((len(tables), size, taps), dtype=np.int32)
    for n, ((xmin, fixed), in_size) in enumerate(zip(tables, sizes)):
        k = fixed.shape[1]
        rows = xmin[:, None] + np.arange(k)[None, :]
        inside = rows < in_size
        index[n, :, :k] = np.where(inside, rows, 0)
        weight[n, :, :k] = np.where(inside, fixed, 0)
    return index, weight


def round_fixed_point(acc):
    """Pillow's (2^21 + sum) >> 22 (an arithmetic shift: floor), clamped to 0..255."""
    return ((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp_(0, 255)


def resize_center_crop_batch(images: list, size: int, budget: int = 1 << 27):
    """3 x H x W uint8 tensors (one device) -> N x 3 x size x size uint8: shortest edge to `size` with PIL's
    bicubic, then the center crop, byte for byte as image.resize_center_crop on the same pixels. Aspect
    ratios beyond image.MAX_EXACT_ASPECT are the caller's to refuse (the exact path resizes a box there).

    The images go in chunks whose padded batch and horizontal-pass taps (the chunk's tallest image x its
    widest input, or x size x its widest window) hold at most `budget` int32 values (512 MiB by default),
    largest first, so that a batch of very large images cannot run the device out of memory (an image larger
    than that alone still goes, alone)."""
    import torch

    device = images[0].device if images else "cpu"
    out = torch.zeros((len(images), 3, size, size), dtype=torch.uint8, device=device)
    seen = [oriented(int(i.shape[1]), int(i.shape[2]), size) for i in images]
    extents = [padded_extent(v, size) for v in seen]
    chunk, rows, columns = [], 0, 0
    # largest first; the chunk's cost kept as running maxima (this runs on the actor's host thread, per batch)
    for i in sorted(range(len(images)), key=lambda i: -extents[i][0] * extents[i][1]):
        grown = max(rows, extents[i][0]), max(columns, extents[i][1])
        if chunk and (len(chunk) + 1) * 3 * grown[0] * grown[1] > budget:
            out[chunk] = resize_chunk([images[j] for j in chunk], [seen[j] for j in chunk], size)
            chunk, grown = [], extents[i]
        chunk.append(i)
        rows, columns = grown
    if chunk:
        out[chunk] = resize_chunk([images[j] for j in chunk], [seen[j] for j in chunk], size)
    return out


def padded_extent(seen: tuple, size: int) -> tuple[int, int]:
    """(rows, columns) an image read as `seen` (see oriented) needs in resize_chunk's padded batch or its
    horizontal-pass taps, the larger: a chunk of images holds len x 3 x max rows x max columns int32 values."""
    return seen[0], max(seen[1], size * window(seen[1], seen[2]))


def oriented(height: int, width: int, size: int) -> tuple[int, int, int, int, int, int, bool]:
    """A height x width image as the horizontal-first passes read it: (height, width, new width, new height,
    crop top, crop left, transposed); transposed where Pillow runs the vertical pass first."""
    new_w, new_h, top, left = resize_geometry(width, height, size)
    if vertical_first(width, height, new_h):
        return width, height, new_h, new_w, left, top, True
    return height, width, new_w, new_h, top, left, False


def vertical_first(width: int, height: int, new_height: int) -> bool:
    """Pillow 13 runs the vertical pass first when an image more than twice as tall as wide shrinks (found by
    comparing Image.resize with each order of two one-axis resizes: 460 rows of 230 columns go horizontal
    first, 461 vertical first, at every width tried; tests/test_resize.py holds both sides of it)."""
    return height > 2 * width and new_height < height


def resize_chunk(images: list, seen: list[tuple], size: int):
    """One batch of the resize, each image read as oriented() says. An image whose passes Pillow runs vertical
    first is read transposed (by the same gather), resized horizontal first, and its crop transposed back: the
    same arithmetic in that order."""
    import torch

    device = images[0].device
    n = len(images)
    shapes = [(int(i.shape[1]), int(i.shape[2])) for i in images]
    heights, widths, flip = [v[0] for v in seen], [v[1] for v in seen], [v[6] for v in seen]
    max_h, max_w = max(heights), max(widths)

    # one packed buffer and one gather into the padded batch (padding reads the zero appended at the end)
    packed = torch.cat([i.reshape(-1) for i in images] + [torch.zeros(1, dtype=torch.uint8, device=device)])
    starts = np.cumsum([0] + [3 * h * w for h, w in shapes])[:-1]
    table = torch.tensor(np.stack([starts, [h for h, _ in shapes], [w for _, w in shapes], heights, widths, flip],
                                  axis=1), dtype=torch.int64, device=device)
    start, h, w, seen_h, seen_w, t = (table[:, k].view(-1, 1, 1, 1) for k in range(6))
    c = torch.arange(3, device=device).view(1, 3, 1, 1)
    y = torch.arange(max_h, device=device).view(1, 1, max_h, 1)
    x = torch.arange(max_w, device=device).view(1, 1, 1, max_w)
    source = start + c * h * w + torch.where(t.bool(), x * w + y, y * w + x)  # transposed: (y, x) reads (x, y)
    index = torch.where((y < seen_h) & (x < seen_w), source, torch.full_like(start, packed.numel() - 1))
    batch = packed[index].to(torch.int32)                                    # N x 3 x H x W

    # horizontal pass: for each crop column, its taps gathered from every row, weighted, summed
    cols, col_weights = (torch.from_numpy(a).to(device) for a in tap_table(
        widths, [v[2] for v in seen], [v[5] for v in seen], size))
    taps = cols.shape[2]
    gathered = batch.gather(3, cols.view(n, 1, 1, size * taps).expand(n, 3, max_h, size * taps))
    rows = round_fixed_point((gathered.view(n, 3, max_h, size, taps) * col_weights[:, None, None])
                             .sum(-1, dtype=torch.int32))
    # vertical pass: for each crop row, its taps gathered from the rounded rows
    lines, line_weights = (torch.from_numpy(a).to(device) for a in tap_table(
        heights, [v[3] for v in seen], [v[4] for v in seen], size))
    taps = lines.shape[2]
    gathered = rows.gather(2, lines.view(n, 1, size * taps, 1).expand(n, 3, size * taps, size))
    crop = round_fixed_point((gathered.view(n, 3, size, taps, size) * line_weights[:, None, :, :, None])
                             .sum(3, dtype=torch.int32))
    crop = torch.where(t.bool(), crop.transpose(2, 3), crop)
    return crop.to(torch.uint8)
