"""The CUDA paths of read.decode_on=encoder: run wherever torch sees a GPU, skipped with the reason elsewhere.

    python -m pytest -q tests/test_gpu.py      # on a GPU machine (no Ray needed), before the GPU benchmark
"""

import numpy as np
import pytest
import torch

from pipeline.embed.demo import encode_image
from pipeline.embed.device_decode import DeviceDecoder
from pipeline.embed.resize import resize_center_crop_batch
from test_resize import SHAPES, as_tensor, generated

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")]


def test_the_resize_gives_the_same_bytes_on_cuda_as_on_cpu():
    images = [as_tensor(generated(w, h, seed)) for seed, (w, h) in enumerate(SHAPES)]
    on_cpu = resize_center_crop_batch(images, 224)
    on_cuda = resize_center_crop_batch([i.cuda() for i in images], 224)
    assert on_cuda.device.type == "cuda" and torch.equal(on_cuda.cpu(), on_cpu)


def test_chunks_under_a_small_budget_give_the_same_bytes_on_cuda():
    images = [as_tensor(generated(w, h, seed)).cuda() for seed, (w, h) in enumerate(SHAPES[:8])]
    assert torch.equal(resize_center_crop_batch(images, 224, budget=1_000_000), resize_center_crop_batch(images, 224))


def test_baseline_jpegs_are_decoded_by_nvjpeg_in_one_batch():
    payloads = [encode_image(generated(w, h, seed), "JPEG", quality=90)
                for seed, (w, h) in enumerate([(640, 480), (480, 640), (1000, 700), (300, 299)])]
    decoder = DeviceDecoder(torch.device("cuda"), 224, 50_000_000)
    images, errors = decoder(payloads)
    assert decoder.backend == "nvjpeg" and errors == [None] * 4 and decoder.on_device == 4 and decoder.on_cpu == 0
    assert images.device.type == "cuda" and images.shape == (4, 3, 224, 224)
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg's: close, not equal (BENCHMARKS.md, "GPU")
    cpu = DeviceDecoder(torch.device("cpu"), 224, 50_000_000)(payloads)[0]
    assert np.abs(images.cpu().numpy().astype(int) - cpu.numpy().astype(int)).mean() < 2


def test_corrupted_jpegs_get_the_exact_paths_rows_through_nvjpeg():
    from test_device_decode import corrupted_jpegs, exact

    payloads = corrupted_jpegs(300, seed=9)
    _, errors = DeviceDecoder(torch.device("cuda"), 224, 50_000_000)(payloads)
    assert errors == [exact(p)[1] for p in payloads]


def test_nvjpeg_chunks_under_the_pixel_budget_give_the_same_bytes():
    payloads = [encode_image(generated(w, h, seed), "JPEG", quality=90)
                for seed, (w, h) in enumerate([(1600, 1200), (640, 480), (2000, 1000), (300, 299), (1200, 1600)])]
    whole = DeviceDecoder(torch.device("cuda"), 224, 50_000_000)
    chunked = DeviceDecoder(torch.device("cuda"), 224, 50_000_000, chunk_pixels=2_500_000)
    images = chunked(payloads)[0]
    assert chunked.decode_calls == 3 and whole.decode_calls == 0  # [1600x1200, 640x480], [2000x1000, 300x299], [1200x1600]
    assert torch.equal(images, whole(payloads)[0]) and whole.decode_calls == 1
