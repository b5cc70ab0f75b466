"""PIL's bicubic resize + the center crop, for a whole batch of decoded images at once, in torch: the same bytes
as image.resize_center_crop (Image.resize(..., BICUBIC), then the crop) for the same decoded pixels.

Pillow's arithmetic (src/libImaging/Resample.c; ../shared/notes/pil-bicubic-resize.md): per axis, each output
pixel i has a window of input pixels starting at xmin with bicubic (a=-0.5) weights, widened by the scale when
downscaling, normalised in double precision and turned into 22-bit fixed point; the horizontal pass runs first
and rounds to 8 bit, then the vertical pass. Only the crop's rows and columns are computed: an output pixel's
weights do not depend on the others, so that is the same as resizing everything and cropping.

Batched: the images go into one zero-padded N x 3 x H x W buffer by one gather from their packed bytes; each
pass gathers every output pixel's taps for all images at once (a table of input index and weight per output
pixel, itself computed for the whole batch on the device) and sums them in int32, as Pillow does
(|sum| <= 255 * 1.3 * 2^22 < 2^31). The number of device operations per batch does not depend on the number
of images (the tables' running sums take one per tap of the widest window). The same code runs on CPU (CI)
and CUDA.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.embed.image import resize_geometry
from pipeline.embed.transfer import host_to_device

PRECISION_BITS = 22  # Pillow's fixed point for 8-bit images
SUPPORT = 2.0        # bicubic


def bicubic(x):
    """Pillow's bicubic_filter (a = -0.5) on a float64 tensor, in its operation order."""
    import torch

    a = -0.5
    x = x.abs()
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, inner, torch.where(x < 2.0, outer, 0.0))


def window(in_size: int, out_size: int) -> int:
    """Pillow's ksize: the most input pixels one output pixel of an in_size -> out_size resize reads."""
    return math.ceil(SUPPORT * max(in_size / out_size, 1.0)) * 2 + 1


def normalised_weights(sizes: list[int], outs: list[int], firsts: list[int], size: int, device):
    """Pillow's precompute_coeffs, for the whole batch at once along one axis: for each image n (an
    sizes[n] -> outs[n] resize) and each of its output pixels firsts[n]..firsts[n]+size-1, the first input
    pixel it reads (xmin, N x size x 1) and its normalised weights (N x size x taps; 0 past its window), in
    float64 on `device`. Every operation is Pillow's, in its order, one IEEE operation at a time, so CPU and
    CUDA give Pillow's doubles; the weights' sum is Pillow's running sum (numpy's or torch's sum adds in
    another order, a last bit apart for about half of the output pixels of 396 sizes tried)."""
    import torch

    f64 = {"dtype": torch.float64, "device": device}
    taps = max(window(i, o) for i, o in zip(sizes, outs))
    in_size, out_size, first = host_to_device([sizes, outs, firsts], torch.float64, device).view(3, -1, 1, 1)
    scale = in_size / out_size
    filterscale = scale.clamp(min=1.0)
    support = SUPPORT * filterscale
    out = first + torch.arange(size, **f64).view(1, -1, 1)
    center = (out + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = torch.trunc(center - support + 0.5).clamp(min=0)
    xmax = torch.minimum(torch.trunc(center + support + 0.5), in_size) - xmin
    x = torch.arange(taps, **f64).view(1, 1, -1)
    weights = torch.where(x < xmax, bicubic((x + xmin - center + 0.5) * ss), 0.0)
    total = weights[..., 0]
    for k in range(1, taps):  # ww += w, tap by tap (a loop over the window, not over the images)
        total = total + weights[..., k]
    total = total.unsqueeze(-1)
    return xmin, torch.where(total != 0.0, weights / torch.where(total != 0.0, total, 1.0), weights)


def tap_table(sizes: list[int], outs: list[int], firsts: list[int], size: int, device):
    """(N x size x taps int64 input index, N x size x taps int32 fixed-point weight) on `device` for each
    image's output pixels firsts[n]..firsts[n]+size-1 along one axis (normalised_weights, then Pillow's
    normalize_coeffs_8bpc); taps past an image's window have weight 0 (index 0). A fixed number of device
    operations for any number of images, and no work per image on the host."""
    import torch

    xmin, weights = normalised_weights(sizes, outs, firsts, size, device)
    scaled = weights * (1 << PRECISION_BITS)
    fixed = torch.where(weights < 0, torch.trunc(scaled - 0.5), torch.trunc(scaled + 0.5)).to(torch.int32)
    index = xmin + torch.arange(weights.shape[-1], dtype=torch.float64, device=device).view(1, 1, -1)
    inside = index < host_to_device(sizes, torch.float64, device).view(-1, 1, 1)
    return torch.where(inside, index, 0.0).to(torch.int64), torch.where(inside, fixed, 0)


def round_fixed_point(acc):
    """Pillow's (2^21 + sum) >> 22 (an arithmetic shift: floor), clamped to 0..255."""
    return ((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp_(0, 255)


def resize_center_crop_batch(images: list, size: int, budget: int = 1 << 27, kernel: str = "torch"):
    """3 x H x W uint8 tensors (one device) -> N x 3 x size x size uint8: shortest edge to `size` with PIL's
    bicubic, then the center crop, byte for byte as image.resize_center_crop on the same pixels. Aspect
    ratios beyond image.MAX_EXACT_ASPECT are the caller's to refuse (the exact path resizes a box there).
    kernel: "torch" (torch operations) or "triton" (resize_kernel's two fused kernels: the same bytes).

    The images go in chunks whose working memory (torch: the padded batch and horizontal-pass taps, the
    chunk's tallest image x its widest input, or x size x its widest window; triton: the rounded rows, its
    tallest image x size) holds at most `budget` values (int32: 512 MiB by default), largest first, so that a
    batch of very large images cannot run the device out of memory (an image larger than that alone still
    goes, alone)."""
    import torch

    if kernel not in ("torch", "triton"):
        raise ValueError(f"resize kernel: expected torch or triton, got {kernel!r}")
    device = images[0].device if images else "cpu"
    out = torch.zeros((len(images), 3, size, size), dtype=torch.uint8, device=device)
    seen = [oriented(int(i.shape[1]), int(i.shape[2]), size) for i in images]
    extents = [(v[0], size) if kernel == "triton" else padded_extent(v, size) for v in seen]

    def resize_into_out(chunk: list[int]) -> None:  # a device index: a list would be copied, and waited for
        out[host_to_device(chunk, torch.int64, device)] = resize_chunk([images[j] for j in chunk],
                                                                       [seen[j] for j in chunk], size, kernel)

    chunk, rows, columns = [], 0, 0
    # largest first; the chunk's cost kept as running maxima (this runs on the actor's host thread, per batch)
    for i in sorted(range(len(images)), key=lambda i: -extents[i][0] * extents[i][1]):
        grown = max(rows, extents[i][0]), max(columns, extents[i][1])
        if chunk and (len(chunk) + 1) * 3 * grown[0] * grown[1] > budget:
            resize_into_out(chunk)
            chunk, grown = [], extents[i]
        chunk.append(i)
        rows, columns = grown
    if chunk:
        resize_into_out(chunk)
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


def resize_chunk(images: list, seen: list[tuple], size: int, kernel: str = "torch"):
    """One batch of the resize, each image read as oriented() says. An image whose passes Pillow runs vertical
    first is read transposed (by the same gather), resized horizontal first, and its crop transposed back: the
    same arithmetic in that order. kernel "triton": the two passes as resize_kernel's fused kernels."""
    import torch

    device = images[0].device
    n = len(images)
    shapes = [(int(i.shape[1]), int(i.shape[2])) for i in images]
    heights, widths, flip = [v[0] for v in seen], [v[1] for v in seen], [v[6] for v in seen]
    max_h, max_w = max(heights), max(widths)
    # per axis, each crop pixel's taps: (input index, fixed-point weight)
    cols, col_weights = tap_table(widths, [v[2] for v in seen], [v[5] for v in seen], size, device)
    lines, line_weights = tap_table(heights, [v[3] for v in seen], [v[4] for v in seen], size, device)
    # the images' bytes in one buffer, each from its start (and a zero at the end, which padding reads)
    packed = torch.cat([i.reshape(-1) for i in images] + [torch.zeros(1, dtype=torch.uint8, device=device)])
    starts = np.cumsum([0] + [3 * h * w for h, w in shapes])[:-1]
    if kernel == "triton":
        from pipeline.embed.resize_kernel import fused_passes

        return fused_passes(packed, starts, shapes, seen, (cols, col_weights), (lines, line_weights), size,
                            PRECISION_BITS)

    # one gather into the padded batch
    table = host_to_device(np.stack([starts, [h for h, _ in shapes], [w for _, w in shapes], heights, widths, flip],
                                    axis=1), torch.int64, device)
    start, h, w, seen_h, seen_w, t = (table[:, k].view(-1, 1, 1, 1) for k in range(6))
    c = torch.arange(3, device=device).view(1, 3, 1, 1)
    y = torch.arange(max_h, device=device).view(1, 1, max_h, 1)
    x = torch.arange(max_w, device=device).view(1, 1, 1, max_w)
    source = start + c * h * w + torch.where(t.bool(), x * w + y, y * w + x)  # transposed: (y, x) reads (x, y)
    index = torch.where((y < seen_h) & (x < seen_w), source, torch.full_like(start, packed.numel() - 1))
    batch = packed[index].to(torch.int32)                                    # N x 3 x H x W

    # horizontal pass: for each crop column, its taps gathered from every row, weighted, summed
    taps = cols.shape[2]
    gathered = batch.gather(3, cols.view(n, 1, 1, size * taps).expand(n, 3, max_h, size * taps))
    rows = round_fixed_point((gathered.view(n, 3, max_h, size, taps) * col_weights[:, None, None])
                             .sum(-1, dtype=torch.int32))
    # vertical pass: for each crop row, its taps gathered from the rounded rows
    taps = lines.shape[2]
    gathered = rows.gather(2, lines.view(n, 1, size * taps, 1).expand(n, 3, size * taps, size))
    crop = round_fixed_point((gathered.view(n, 3, size, taps, size) * line_weights[:, None, :, :, None])
                             .sum(3, dtype=torch.int32))
    crop = torch.where(t.bool(), crop.transpose(2, 3), crop)
    return crop.to(torch.uint8)
