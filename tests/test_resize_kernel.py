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


COMPILE = r"""
import sys
import numpy as np
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import pipeline.embed.resize_kernel as resize_kernel
from pipeline.bench.gpu_checks import generated
from pipeline.embed.resize import resize_center_crop_batch

recorded = []


def record(*args):  # in place of fused_passes: what it would launch, at the GPU's block of rows
    out, passes = resize_kernel.launches(*args, block_rows=4)
    recorded.extend(passes)
    return out


resize_kernel.fused_passes = record
images = [torch.from_numpy(np.array(generated(w, h, 0))).permute(2, 0, 1).contiguous() for w, h in [(97, 61), (61, 130)]]
resize_center_crop_batch(images, 224, kernel="triton")
TYPES = {torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}
for capability in map(int, sys.argv[1:]):
    for kernel, grid, args, constants in recorded:
        names = kernel.arg_names
        signature = {name: "*" + TYPES[a.dtype] if isinstance(a, torch.Tensor) else "i32" for name, a in zip(names, args)}
        signature.update({name: "constexpr" for name in constants})
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", capability, 32))
        print(kernel.fn.__name__, f"sm_{capability}", len(compiled.asm["cubin"]), "bytes of machine code", flush=True)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="triton has wheels for Linux x86-64 only")
def test_the_kernels_compile_to_machine_code_for_a100_and_h100(tmp_path):
    """The interpreter runs the kernels as Python, which takes code the GPU compiler refuses (a loop variable whose
    type changes in the loop, seen passing the tests above and failing here): here both kernels are compiled, as
    on a GPU, to A100 (sm_80) and H100/H200 (sm_90) machine code by triton's own compiler and ptxas, for the
    arguments fused_passes gives them. No GPU needed."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compiled for real, not found in a cache
    done = subprocess.run([sys.executable, "-c", COMPILE, "80", "90"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = [line.split()[:2] for line in done.stdout.splitlines()]
    assert compiled == [["horizontal_pass", "sm_80"], ["vertical_pass", "sm_80"],
                        ["horizontal_pass", "sm_90"], ["vertical_pass", "sm_90"]], done.stdout
