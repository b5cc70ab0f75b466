"""The fused Triton resize (pipeline/embed/resize_kernel.py, read.device_resize=triton) gives PIL's bytes, as the
torch version does: 0 differing bytes against the exact path on every kind of image the exact path resizes.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before the kernels are
defined), which executes their integer arithmetic as written; with one, on CUDA. The interpreter is slow, so the
images here are small (the CUDA check in pipeline/bench/gpu_checks.py runs every shape at full size)."""

import os
import platform

import numpy as np
import pytest
import torch

from pipeline.bench.gpu_checks import generated
from pipeline.embed.image import MAX_EXACT_ASPECT, resize_center_crop
from pipeline.embed.resize import resize_center_crop_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is defined: before resize_kernel is imported
if platform.system() == "Linux" and platform.machine() == "x86_64":
    import triton  # noqa: F401 - installed by the test extra here: its absence must fail, not skip
else:
    pytest.importorskip("triton", reason="triton has wheels for Linux x86-64 only")

SIZE = 224
# downscaling and upscaling, both orientations, 1-pixel sides, the crop's own size, both sides of Pillow's pass
# order (230 x 460 horizontal first, 230 x 461 vertical first: read transposed), the extreme aspect ratios
SHAPES = [(320, 240), (240, 320), (97, 61), (37, 300), (3, 3), (1, 1), (1, 20), (20, 1), (224, 224), (225, 224),
          (230, 460), (230, 461), (50, 101), (11, 11 * MAX_EXACT_ASPECT), (SIZE * MAX_EXACT_ASPECT // 4, SIZE // 4)]


def as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous().to(DEVICE)


def differing_bytes(images, **kwargs) -> list[int]:
    fused = resize_center_crop_batch([as_tensor(i) for i in images], SIZE, kernel="triton", **kwargs).cpu()
    return [int((b.permute(1, 2, 0).numpy() != resize_center_crop(i.convert("RGB"), SIZE)).sum())
            for i, b in zip(images, fused)]


@pytest.mark.timeout(900)
def test_the_fused_kernels_give_pils_bytes_for_every_kind_of_image():
    images = [generated(w, h, seed) for seed, (w, h) in enumerate(SHAPES)]
    images.append(generated(160, 120, 3).convert("L"))  # grey
    assert differing_bytes(images) == [0] * len(images)


def test_the_fused_kernels_give_pils_bytes_in_chunks_and_at_any_block_of_rows():
    """A small budget splits the batch into chunks (each image must land in its own slot); four rows per program
    (the GPU's block, not the interpreter's) leaves partial blocks at other places of every image."""
    import pipeline.embed.resize_kernel as resize_kernel

    images = [generated(w, h, seed) for seed, (w, h) in enumerate([(97, 61), (20, 1), (3, 3), (61, 97), (50, 101)])]
    assert differing_bytes(images, budget=3 * 100 * SIZE) == [0] * len(images)  # one or two images a chunk
    original = resize_kernel.fused_passes
    resize_kernel.fused_passes = lambda *args: original(*args, block_rows=4)
    try:
        assert differing_bytes(images) == [0] * len(images)
    finally:
        resize_kernel.fused_passes = original


def test_a_wrong_rounding_in_the_kernel_is_seen():
    """The comparison can fail: the passes' rounding shift one bit off changes bytes."""
    import pipeline.embed.resize_kernel as resize_kernel

    original = resize_kernel.fused_passes
    resize_kernel.fused_passes = lambda *args: original(*args[:-1], args[-1] - 1)  # bits
    try:
        assert sum(differing_bytes([generated(97, 61, 1)])) > 0
    finally:
        resize_kernel.fused_passes = original
