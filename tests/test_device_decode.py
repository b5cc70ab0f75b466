"""read.decode_on=encoder: which images take the device path, and how far its pixels and embeddings are from the
exact path (run here with the actor on CPU: torch's resize on CPU tensors, PIL standing in for nvJPEG)."""


import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rgb_image
from pipeline.bench.photos import benchmark_photos
from pipeline.config import load_config
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
    assert device_decodable(payload, SIZE, MAX_PIXELS) is on_device


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
        if reason is None:
            diff = np.abs(image.permute(1, 2, 0).numpy().astype(int) - pixels)
            if device_decodable(payload, SIZE, MAX_PIXELS):  # only the resize kernel differs (noise: its worst case)
                assert diff.mean() <= 0.5
            else:  # the exact path itself
                assert diff.max() == 0
    assert decoder.on_device > 0 and decoder.on_cpu > 0
    # a batch that mixes both paths keeps each image in its own slot
    _, routed_alone = decoder([ROUTES["png"][0]])
    assert routed_alone == [None]


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    """Photos of the benchmark's kind: crops of real photographs and textured scenes, 200-1000 px, JPEG 75-95."""
    return benchmark_photos(24, seed=1)


def device_pixels(decoder: DeviceDecoder, payloads: list[bytes]) -> np.ndarray:
    images, errors = decoder(payloads)
    assert errors == [None] * len(payloads) and decoder.on_cpu == 0  # all of them took the device path
    return images.permute(0, 2, 3, 1).numpy()


def test_device_path_pixels_are_within_half_a_level_of_the_exact_path(photos):
    reference = np.stack([exact(p)[0] for p in photos]).astype(int)
    diff = np.abs(device_pixels(DeviceDecoder(torch.device("cpu"), SIZE, MAX_PIXELS), photos) - reference)
    assert diff.mean() <= 0.5
    assert np.percentile(diff, 99) <= 2


class WrongKernelDecoder(DeviceDecoder):
    """A resize kernel other than the reference's, to show that the embedding bound below tells it apart."""

    def __init__(self, mode: str, antialias: bool):
        super().__init__(torch.device("cpu"), SIZE, MAX_PIXELS)
        self.mode, self.antialias = mode, antialias

    def resize_center_crop(self, image):
        from pipeline.embed.image import resize_geometry

        _, height, width = image.shape
        new_w, new_h, top, left = resize_geometry(width, height, self.size)
        resized = torch.nn.functional.interpolate(image[None].float(), size=(new_h, new_w), mode=self.mode,
                                                  antialias=self.antialias, align_corners=False)
        return resized[0, :, top : top + self.size, left : left + self.size]


def test_device_path_embeddings_are_within_6e4_on_the_real_vit_b32_layout(photos, tmp_path):
    """Default-init ViT-B/32 (the real layout, random weights): the right kernel stays within 6e-4 per
    component of the exact path's embedding; bilinear, or bicubic without antialias, do not."""
    from pipeline.embed.encode import Encoder

    cfg = load_config(None, ["input=unused", f"output={tmp_path}", "model.random_weights=true",
                             "model.precision=fp32", "encoder.torch_threads=2"])
    torch.manual_seed(0)
    encoder = Encoder(cfg, random_weights=True)
    reference = encoder.embed_images(np.stack([exact(p)[0] for p in photos])).numpy()
    on_device = encoder.embed_images(device_pixels(DeviceDecoder(torch.device("cpu"), SIZE, MAX_PIXELS), photos))
    assert np.abs(on_device.numpy() - reference).max() <= 6e-4
    for mode, antialias in (("bilinear", False), ("bicubic", False)):
        wrong = encoder.embed_images(device_pixels(WrongKernelDecoder(mode, antialias), photos))
        assert np.abs(wrong.numpy() - reference).max() > 6e-4, mode
