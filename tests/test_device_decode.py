"""read.decode_on=encoder: which images take the device path, and that its pixels are the exact path's (run here
with the actor on CPU: PIL stands in for nvJPEG, and the batched resize is PIL's arithmetic, so every byte is
the same; on a GPU only nvJPEG's decode differs)."""


import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rgb_image
from pipeline.bench.photos import benchmark_photos, corrupted_jpegs
from pipeline.embed.demo import encode_image
from pipeline.embed.device_decode import DeviceDecoder, device_decodable
from pipeline.embed.image import SampleError, decode_image
from test_bad_data import IMAGE_CASES

SIZE, MAX_PIXELS = 224, 50_000_000


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode_image(rgb_image(320, 200, 3), "JPEG", exif=exif)


ROUTES = {
    "baseline_rgb": (encode_image(rgb_image(320, 240, 1), "JPEG"), True),
    "grayscale": (encode_image(rgb_image(300, 200, 2).convert("L"), "JPEG"), True),
    "exif_upright": (encode_image(rgb_image(300, 200, 2), "JPEG", exif=Image.Exif()), True),
    "progressive": (encode_image(rgb_image(320, 240, 3), "JPEG", progressive=True), False),
    "cmyk": (encode_image(rgb_image(300, 200, 4).convert("CMYK"), "JPEG"), False),
    "exif_rotated": (exif_rotated_jpeg(), False),
    "png": (encode_image(rgb_image(300, 200, 5), "PNG"), False),
    "truncated": (encode_image(rgb_image(400, 300, 6), "JPEG")[:2000], False),
    "banner_beyond_exact_aspect": (encode_image(rgb_image(6000, 200, 7), "JPEG"), False),
    "empty": (b"", False),
}


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_only_jpegs_a_device_decoder_sees_as_pil_does_take_the_device_path(name):
    payload, on_device = ROUTES[name]
    assert bool(device_decodable(payload, SIZE, MAX_PIXELS)) is on_device


def exact(payload: bytes):
    try:
        return decode_image(payload, SIZE, MAX_PIXELS), None
    except SampleError as exc:
        return None, str(exc)


def test_every_image_gets_the_exact_paths_status_and_reason():
    payloads = [case[0] for case in IMAGE_CASES.values()] + [payload for payload, _ in ROUTES.values()]
    decoder = DeviceDecoder(torch.device("cpu"), SIZE, MAX_PIXELS)
    images, errors = decoder(payloads)
    for payload, image, error in zip(payloads, images, errors):
        pixels, reason = exact(payload)
        assert error == reason
        if reason is None:  # decoded by PIL either way, resized by PIL's arithmetic either way
            assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels)
    assert decoder.on_device > 0 and decoder.on_cpu > 0
    # a batch that mixes both paths keeps each image in its own slot
    _, routed_alone = decoder([ROUTES["png"][0]])
    assert routed_alone == [None]


def test_the_exact_paths_pixels_reach_the_device_without_a_warning():
    """A JPEG the device cannot take (progressive) is decoded by PIL, whose pixels are read-only memory: placed
    on the device without torch's "not writable" UserWarning on the actor's log. In a process of its own: torch
    gives that warning once per process, so an earlier test could hide it."""
    import subprocess
    import sys
    from pathlib import Path

    script = "\n".join([
        "import torch",
        "from pipeline.embed.device_decode import DeviceDecoder",
        f"images, errors = DeviceDecoder(torch.device('cpu'), {SIZE}, {MAX_PIXELS})([{ROUTES['progressive'][0]!r}])",
        "assert errors == [None], errors",
    ])
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Photos of the benchmark's kind: crops of real photographs and textured scenes, 200-1000 px, JPEG 75-95."""
    return benchmark_photos(24, seed=1)


def device_pixels(decoder: DeviceDecoder, payloads: list[bytes]) -> np.ndarray:
    images, errors = decoder(payloads)
    assert errors == [None] * len(payloads) and decoder.on_cpu == 0  # all of them took the device path
    return images.permute(0, 2, 3, 1).numpy()


def test_device_path_pixels_equal_the_exact_path_on_cpu(photos):
    """Photos of the benchmark's kind, all through the batched device path: the exact path's bytes."""
    reference = np.stack([exact(p)[0] for p in photos])
    assert np.array_equal(device_pixels(DeviceDecoder(torch.device("cpu"), SIZE, MAX_PIXELS), photos), reference)


def test_a_jpeg_corrupted_in_the_middle_gets_the_exact_paths_row_whatever_the_decoder_makes_of_it(monkeypatch):
    """libjpeg (PIL) fails on some corrupted JPEGs where a GPU decoder may decode something. Here the device
    decoder is one that never fails (returns an image for any bytes): every image the exact path fails on must
    still get the exact path's error, so such images must never be handed to the device decoder."""
    payloads = corrupted_jpegs(600, seed=5)
    decoder = DeviceDecoder(torch.device("cpu"), SIZE, MAX_PIXELS)
    monkeypatch.setattr(decoder, "_decode", lambda batch: [torch.full((3, 300, 400), 128, dtype=torch.uint8)
                                                           for _ in batch])
    _, errors = decoder(payloads)
    reasons = [exact(p)[1] for p in payloads]
    assert sum(r is not None for r in reasons) > 20  # the corpus has failures to route
    assert errors == reasons
    assert decoder.on_device > 400  # and most of the corpus still took the device path


def test_a_batch_of_large_images_is_decoded_in_chunks_under_the_pixel_budget(monkeypatch):
    """read.device_decode_pixels: no decode call holds more source pixels than the budget (an image over it
    alone), and the chunks give the same bytes as one call."""
    sizes = [(640, 480), (1200, 900), (300, 200), (2000, 1500), (800, 600), (640, 480), (100, 100), (1000, 1000)]
    payloads = [encode_image(rgb_image(w, h, i), "JPEG") for i, (w, h) in enumerate(sizes)]
    budget = 1_500_000
    whole = DeviceDecoder(torch.device("cpu"), SIZE, MAX_PIXELS)
    chunked = DeviceDecoder(torch.device("cpu"), SIZE, MAX_PIXELS, chunk_pixels=budget)
    calls, decode = [], chunked._decode

    def recorded(batch):
        images = decode(batch)
        calls.append(sum(image.shape[1] * image.shape[2] for image in images))
        return images

    monkeypatch.setattr(chunked, "_decode", recorded)
    images, errors = chunked(payloads)
    assert errors == [None] * len(sizes) and chunked.on_device == len(sizes)
    assert all(pixels <= budget for pixels in calls if pixels != 2000 * 1500) and 2000 * 1500 in calls
    assert len(calls) == 4 and sum(calls) == sum(w * h for w, h in sizes)
    assert torch.equal(images, whole(payloads)[0]) and whole.decode_calls == 1


def test_out_of_memory_and_cuda_errors_surface_as_themselves(monkeypatch):
    """Only a decoder's refusal of an image takes the exact path; a device failure is not hidden behind it."""
    decoder = DeviceDecoder(torch.device("cpu"), SIZE, MAX_PIXELS)
    payloads = [ROUTES["baseline_rgb"][0]] * 2

    def out_of_memory(batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(decoder, "_decode", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        decoder(payloads)

    def cuda_error(batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(decoder, "_decode", cuda_error)
    with pytest.raises(RuntimeError, match="CUDA error"):
        decoder(payloads)

    def refused(batch):  # what a decoder says about an image it cannot take: the exact path decodes it
        raise RuntimeError("Unsupported marker type 0xc2")

    monkeypatch.setattr(decoder, "_decode", refused)
    images, errors = decoder(payloads)
    assert errors == [None, None] and decoder.on_cpu == 2
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), exact(payloads[0])[0])


def test_images_the_device_cannot_take_are_decoded_by_the_read_tasks_never_by_the_actor(tiny_models, tmp_path):
    """decode_on=encoder: the read tasks ship JPEG bytes for the device and decoded pixels (or the error) for
    every other image; the actor decodes none on its CPU, and its rows equal decode_on=tasks byte for byte."""
    import pyarrow as pa

    from conftest import job_config
    from pipeline.embed.demo import write_tar_shard
    from pipeline.embed.encode import Encoder
    from pipeline.embed.preprocess import preprocess, resolve_tokenizer
    from pipeline.embed.read import read_shards

    cases = ["baseline_rgb", "grayscale", "progressive", "cmyk", "exif_rotated", "png", "truncated", "empty"]
    members = []
    for i, name in enumerate(cases):
        ext = "png" if name == "png" else "jpg"
        members += [(f"k{i}.{ext}", ROUTES[name][0]), (f"k{i}.txt", "一张图片".encode())]
    write_tar_shard(tmp_path / "s.tar", members)
    rows = {}
    for decode_on in ("tasks", "encoder"):
        cfg = job_config(tiny_models, str(tmp_path / "s.tar"), str(tmp_path / decode_on), f"read.decode_on={decode_on}",
                         "encoder.batch_size=16")
        raw = pa.concat_tables(list(read_shards(pa.table({"shard": [str(tmp_path / "s.tar")]}), cfg)))
        prepared = preprocess(raw, cfg, resolve_tokenizer(cfg, random_weights=False))
        encoder = Encoder(cfg)
        rows[decode_on] = encoder(prepared).filter(pa.compute.greater_equal(prepared.column("position"), 0))
        if decode_on == "encoder":
            samples = prepared.filter(pa.compute.greater_equal(prepared.column("position"), 0))
            shipped = dict(zip(cases, zip([area > 0 for area in samples.column("device_area").to_pylist()],
                                          samples.column("pixels").is_valid().to_pylist(),
                                          samples.column("error").to_pylist())))
            assert shipped["baseline_rgb"] == shipped["grayscale"] == (True, False, None)  # bytes for the device
            for name in ("progressive", "cmyk", "exif_rotated", "png"):
                assert shipped[name] == (False, True, None), name  # decoded by the read task
            assert shipped["truncated"][2].startswith("image_decode_failed") and shipped["empty"][2].startswith(
                "image_empty")
            assert encoder.decoder.on_device == 2 and encoder.decoder.from_tasks == 4 and encoder.decoder.on_cpu == 0
    exact, device = rows["tasks"], rows["encoder"]
    for column in ("key", "status", "error", "image_embedding", "text_embedding", "similarity"):
        assert device.column(column).equals(exact.column(column)), column


def test_image_bytes_reach_the_decoder_as_views_of_the_arrow_buffer():
    """The batch's image column is read in place: each image a view into the column's one data buffer, not a
    Python bytes object per image (the encoder's host thread is the GPU path's bottleneck)."""
    import pyarrow as pa

    from pipeline.embed.device_decode import byte_views

    column = pa.chunked_array([pa.array([b"jpeg-one", None, b"", b"three"]).slice(0, 4)])
    views = byte_views(column.take(pa.array([0, 1, 2, 3])))
    assert [None if v is None else v.numpy().tobytes() for v in views] == [b"jpeg-one", None, b"", b"three"]
    array = column.combine_chunks()
    in_place = byte_views(array)
    data = array.buffers()[2]
    assert in_place[0].data_ptr() == data.address and in_place[3].data_ptr() == data.address + len(b"jpeg-one")
