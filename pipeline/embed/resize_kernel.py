"""The batched resize (resize.py) as two fused Triton kernels, one per pass: the same integer arithmetic, so the
same bytes (tests/test_resize_kernel.py, against the torch version and PIL), in two launches per chunk.

read.device_resize=triton picks it for images on a GPU (the torch version stays the default until a GPU
measurement shows which is faster: BENCHMARKS.md). The torch version gathers every tap of every output pixel
into memory before it sums them (rows x 224 x taps int32 values per image); here each output pixel sums its
taps in registers, reading the image's bytes where they lie in one packed buffer (no padded batch), and the
horizontal pass writes its rounded rows as bytes:

- pass 1, one program per image and block of rows: for each crop column j, 2^21 + sum over taps of
  pixel(row, index[j, t]) * weight[j, t], shifted right by 22 and clamped to 0..255 (Pillow's rounding
  between the passes), into a rows x size byte buffer per image and channel;
- pass 2, one program per image and block of crop rows: the same down the columns of that buffer, stored
  at (row, column), or at (column, row) for an image read transposed (resize.oriented).

The coefficient tables are resize.tap_table's (Pillow's doubles, in fixed point), built on the device and
handed in by resize.resize_chunk, which calls these kernels for read.device_resize=triton. On a
machine without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which is how CI checks
their bytes; triton itself comes with CUDA builds of torch.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from pipeline.embed.transfer import host_to_device

BLOCK_J = 256   # the crop's columns (224) in one block of lanes
BLOCK_ROWS = 4  # rows per program on a GPU
INTERPRETED_BLOCK_ROWS = 64  # in Triton's interpreter (CPU tensors): fewer, larger programs run faster


# taps and max_h change from chunk to chunk: not specialised on, so each kernel compiles once
@triton.jit(do_not_specialize=["taps", "max_h"])
def horizontal_pass(packed, table, cols, col_weights, rows_out, taps, max_h,
                    SIZE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_ROWS: tl.constexpr, BITS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)  # offsets in the batch's buffers pass 2^31 for large chunks
    y = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    j = tl.arange(0, BLOCK_J)
    start = tl.load(table + n * 6 + 0)
    plane = tl.load(table + n * 6 + 1)      # h * w: one channel's bytes
    seen_h = tl.load(table + n * 6 + 2)     # rows as read (the width of a transposed image)
    step_y = tl.load(table + n * 6 + 3)     # a row's step as read: w, or 1 if transposed
    step_x = tl.load(table + n * 6 + 4)     # a column's step as read: 1, or w if transposed
    mask = (y < seen_h)[:, None] & (j < SIZE)[None, :]
    for c in tl.static_range(3):
        acc = tl.full((BLOCK_ROWS, BLOCK_J), 1 << (BITS - 1), tl.int32)
        t = 0
        while t < taps:  # not range(taps): Triton 3.6's interpreter fails on a run-time bound there
            x = tl.load(cols + (n * SIZE + j) * taps + t, mask=j < SIZE, other=0)
            w = tl.load(col_weights + (n * SIZE + j) * taps + t, mask=j < SIZE, other=0)
            pixel = tl.load(packed + start + c * plane + y[:, None] * step_y + x[None, :] * step_x, mask=mask, other=0)
            acc += pixel.to(tl.int32) * w[None, :]
            t += 1
        value = tl.minimum(tl.maximum(acc >> BITS, 0), 255).to(tl.uint8)
        tl.store(rows_out + ((n * 3 + c) * max_h + y[:, None]) * SIZE + j[None, :], value, mask=mask)


@triton.jit(do_not_specialize=["taps", "max_h"])
def vertical_pass(rows_in, table, lines, line_weights, out, taps, max_h,
                  SIZE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_ROWS: tl.constexpr, BITS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    j = tl.arange(0, BLOCK_J)
    flip = tl.load(table + n * 6 + 5)
    inside = i < SIZE
    mask = inside[:, None] & (j < SIZE)[None, :]
    # where the crop's pixel (i, j) goes: (i, j), or (j, i) for an image read transposed
    at = tl.where(flip != 0, j[None, :] * SIZE + i[:, None], i[:, None] * SIZE + j[None, :])
    for c in tl.static_range(3):
        acc = tl.full((BLOCK_ROWS, BLOCK_J), 1 << (BITS - 1), tl.int32)
        t = 0
        while t < taps:
            y = tl.load(lines + (n * SIZE + i) * taps + t, mask=inside, other=0)
            w = tl.load(line_weights + (n * SIZE + i) * taps + t, mask=inside, other=0)
            pixel = tl.load(rows_in + ((n * 3 + c) * max_h + y[:, None]) * SIZE + j[None, :], mask=mask, other=0)
            acc += pixel.to(tl.int32) * w[:, None]
            t += 1
        value = tl.minimum(tl.maximum(acc >> BITS, 0), 255).to(tl.uint8)
        tl.store(out + (n * 3 + c) * SIZE * SIZE + at, value, mask=mask)


def fused_passes(packed, starts, shapes: list[tuple[int, int]], seen: list[tuple], horizontal: tuple,
                 vertical: tuple, size: int, bits: int, block_rows: int | None = None):
    """The two passes of resize.resize_chunk for its images (their bytes in `packed`, image n's 3 x h x w from
    starts[n], h x w = shapes[n], read as resize.oriented says, `seen`) with its tables (horizontal, vertical:
    resize.tap_table's input index and weight in `bits`-bit fixed point): N x 3 x size x size uint8, Pillow's
    bytes, in two kernel launches. block_rows: rows per program (any power of two gives the same bytes)."""
    out, passes = launches(packed, starts, shapes, seen, horizontal, vertical, size, bits, block_rows)
    for kernel, grid, args, constants in passes:
        kernel[grid](*args, **constants)
    return out


def launches(packed, starts, shapes: list[tuple[int, int]], seen: list[tuple], horizontal: tuple,
             vertical: tuple, size: int, bits: int, block_rows: int | None = None):
    """fused_passes' output buffer and its two launches, [(kernel, grid, arguments, constants)] in order
    (tests/test_resize_kernel.py compiles the kernels for these arguments)."""
    import torch

    device = packed.device
    block_rows = block_rows or (INTERPRETED_BLOCK_ROWS if device.type == "cpu" else BLOCK_ROWS)
    n = len(shapes)
    heights, flip = [v[0] for v in seen], [v[6] for v in seen]
    max_h = max(heights)
    step_y = [1 if f else w for (_, w), f in zip(shapes, flip)]
    step_x = [w if f else 1 for (_, w), f in zip(shapes, flip)]
    # per image, as the kernels read it: start, h * w, rows as read, row step, column step, transposed
    table = host_to_device(np.stack([starts, [h * w for h, w in shapes], heights, step_y, step_x, flip], axis=1),
                           torch.int64, device)
    (cols, col_weights), (lines, line_weights) = horizontal, vertical
    rows = torch.empty((n, 3, max_h, size), dtype=torch.uint8, device=device)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=device)
    constants = {"SIZE": size, "BLOCK_J": max(BLOCK_J, triton.next_power_of_2(size)), "BLOCK_ROWS": block_rows,
                 "BITS": bits}
    return out, [
        (horizontal_pass, (n, triton.cdiv(max_h, block_rows)),
         (packed, table, cols, col_weights, rows, cols.shape[2], max_h), constants),
        (vertical_pass, (n, triton.cdiv(size, block_rows)),
         (rows, table, lines, line_weights, out, lines.shape[2], max_h), constants),
    ]
