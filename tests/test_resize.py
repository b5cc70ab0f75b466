"""The batched resize (pipeline/embed/resize.py) gives PIL's bytes: 0 differing bytes against the exact path's
Image.resize(..., BICUBIC) + center crop, on the same decoded pixels, for every kind of image the exact path
resizes; and its device operations per batch do not grow with the number of images."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.bench.gpu_checks import SHAPES, generated
from pipeline.bench.photos import benchmark_photos
from pipeline.embed.demo import real_photographs
from pipeline.embed.image import resize_center_crop
from pipeline.embed.resize import resize_center_crop_batch

SIZE = 224


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def differing_bytes(images: list[Image.Image], **kwargs) -> list[int]:
    """Per image: bytes where the batched resize differs from the exact path (all images in one batch)."""
    batched = resize_center_crop_batch([as_tensor(i) for i in images], SIZE, **kwargs)
    return [int((b.permute(1, 2, 0).numpy() != resize_center_crop(i.convert("RGB"), SIZE)).sum())
            for i, b in zip(images, batched)]


def test_generated_images_of_every_shape_equal_pil_byte_for_byte():
    images = [generated(w, h, seed) for seed, (w, h) in enumerate(SHAPES)]
    assert differing_bytes(images) == [0] * len(images)


def test_grey_images_and_the_demo_photographs_equal_pil_byte_for_byte():
    images = [image for image, _ in real_photographs()]
    images += [generated(w, h, 5).convert("L") for w, h in ((640, 480), (50, 70), (1, 20))]
    assert differing_bytes(images) == [0] * len(images)


def test_benchmark_photos_equal_pil_byte_for_byte_in_small_chunks():
    """Photos of the benchmark's kind (200-1000 px JPEGs); a small budget splits the batch into chunks of
    mixed sizes, and every image still lands in its own slot."""
    import io

    images = [Image.open(io.BytesIO(p)) for p in benchmark_photos(24, seed=2)]
    assert differing_bytes(images, budget=10_000_000) == [0] * len(images)  # chunks of 1 to 6 images


def test_a_wrong_coefficient_is_seen():
    """The comparison can fail: one fixed-point weight off by one in 2^22 changes bytes."""
    import pipeline.embed.resize as resize

    original = resize.tap_table

    def off_by_one(*args):
        index, fixed = original(*args)
        fixed[..., 0] += 2**12
        return index, fixed

    resize.tap_table = off_by_one
    try:
        assert sum(differing_bytes([generated(640, 480, 1)])) > 0
    finally:
        resize.tap_table = original


def pillows_weights(in_size: int, out_size: int, first: int, count: int) -> tuple[list[int], list[list[float]]]:
    """Pillow's precompute_coeffs (Resample.c) transcribed line by line, one output pixel at a time."""
    def bicubic_filter(x: float) -> float:
        a = -0.5
        x = -x if x < 0.0 else x
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ss = 1.0 / filterscale
    xmins, rows = [], []
    for xx in range(first, first + count):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [bicubic_filter((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for w in k:
            ww += w
        xmins.append(xmin)
        rows.append([w / ww for w in k] if ww != 0.0 else k)
    return xmins, rows


def test_the_weights_are_pillows_doubles_for_a_whole_batch():
    """The batch's coefficient table holds Pillow's doubles, bit for bit (its sum of the weights included, which
    adds tap by tap: a sum in another order is a last bit apart for about half of the output pixels), for downscaling,
    upscaling and crop offsets, images of different windows side by side."""
    from pipeline.embed.resize import normalised_weights

    cases = [(640, 224, 0), (1000, 320, 48), (97, 352, 64), (37, 224, 0), (4480, 224, 0), (1, 224, 0),
             (225, 224, 0), (2048, 298, 37), (333, 224, 0), (1001, 673, 224)]
    sizes, outs, firsts = zip(*cases)
    xmin, weights = normalised_weights(list(sizes), list(outs), list(firsts), SIZE, "cpu")
    for n, (in_size, out_size, first) in enumerate(cases):
        want_xmin, want = pillows_weights(in_size, out_size, first, SIZE)
        assert xmin[n, :, 0].tolist() == want_xmin, (in_size, out_size)
        rows = weights[n].tolist()
        assert [row[: len(w)] for row, w in zip(rows, want)] == want, (in_size, out_size)  # exact float equality
        assert not any(any(row[len(w):]) for row, w in zip(rows, want))  # 0 past each pixel's window


def test_the_pass_order_is_seen():
    """The comparison can fail on the order of the passes too: horizontal first for a tall image that shrinks
    is not Pillow's."""
    import pipeline.embed.resize as resize

    original = resize.vertical_first
    resize.vertical_first = lambda *args: False
    try:
        assert differing_bytes([generated(230, 461, 1)]) != [0]
    finally:
        resize.vertical_first = original


def device_operations(n: int) -> int:
    """Operators the profiler records for one batch of n images, views and shape queries left out (they launch
    no work on a device)."""
    from torch.profiler import ProfilerActivity, profile

    images = [as_tensor(generated(40 + i % 7, 30 + i % 5, i)) for i in range(n)]
    metadata_only = ("view", "reshape", "_reshape_alias", "flatten", "as_strided", "alias", "expand", "unsqueeze",
                     "select", "slice", "narrow", "t", "transpose", "permute", "detach", "lift_fresh", "_unsafe_view",
                     "resolve_conj", "resolve_neg")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        resize_center_crop_batch(images, SIZE)
    return sum(e.count for e in prof.key_averages()
               if e.key.startswith("aten::") and e.key[len("aten::"):] not in metadata_only)


@pytest.mark.timeout(300)
def test_device_operations_per_batch_do_not_grow_with_the_batch():
    assert device_operations(16) == device_operations(512)


def test_int32_sums_cannot_overflow():
    """Pillow sums in int32: 2^21 + 255 * sum(|weights|) must stay below 2^31 for every scale, up and down."""
    from pipeline.embed.resize import tap_table

    sizes = [1, 2, 3, 7, 100, 223, 224, 225, 300, 1000, 4480, 20_000]
    fixed = tap_table(sizes, [SIZE] * len(sizes), [0] * len(sizes), SIZE, "cpu")[1]
    worst = int(fixed.long().abs().sum(-1).max())
    assert 2**21 + 255 * worst < 2**31, worst
