"""Image and caption decoding: the CLIP protocol's exact pixels, and a recorded reason for every bad sample."""

import io

import numpy as np
import pytest
from PIL import Image

from conftest import rgb_image
from pipeline.embed.demo import encode_image
from pipeline.embed.image import SampleError, decode_image
from pipeline.embed.preprocess import decode_caption, decode_url


def reference_pixels(image: Image.Image) -> np.ndarray:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = CLIPImageProcessorPil()(images=image, do_rescale=False, do_normalize=False, return_tensors="np")
    return np.asarray(out["pixel_values"][0]).transpose(1, 2, 0)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 333), (224, 224), (225, 224), (517, 389),
                                  (1, 1), (30, 500)])
def test_pixels_equal_clip_image_processor(size):
    image = rgb_image(*size, seed=sum(size))
    ours = decode_image(encode_image(image, "PNG"), 224, 10**8)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, reference_pixels(image))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK"])
def test_other_modes_decode_as_the_reference(mode):
    image = rgb_image(300, 260, seed=7).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    payload = encode_image(image, fmt)
    assert np.array_equal(decode_image(payload, 224, 10**8), reference_pixels(Image.open(io.BytesIO(payload))))


def test_transparency_is_composited_on_white():
    """Transparent pixels show white, half-transparent ones their blend with white, whatever colour lies under
    them (OpenAI's clip and transformers before 5.21 drop the alpha channel instead: README, Model fidelity)."""
    image = Image.new("RGBA", (448, 448), (10, 120, 200, 0))  # fully transparent blue
    image.paste((250, 30, 30, 128), (224, 0, 448, 448))  # right half: red at alpha 128
    pixels = decode_image(encode_image(image, "PNG"), 224, 10**8).astype(int)
    assert (pixels[:, :100] == 255).all()  # away from the edge the bicubic taps see one colour
    blend = [round((c * 128 + 255 * 127) / 255) for c in (250, 30, 30)]  # (252, 142, 142)
    assert np.abs(pixels[:, 124:] - blend).max() <= 1
    palette = Image.new("P", (300, 300), 0)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.paste(1, (150, 0, 300, 300))
    palette.info["transparency"] = 0  # index 0 (black) is transparent
    pixels = decode_image(encode_image(palette, "PNG"), 224, 10**8).astype(int)
    assert (pixels[:, :90] == 255).all() and (pixels[:, 134:] == (200, 10, 10)).all()


def test_sixteen_bit_png_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 256 * 256).reshape(256, 256)).astype(np.uint16)
    payload = encode_image(Image.fromarray(ramp), "PNG")
    pixels = decode_image(payload, 224, 10**8)
    assert pixels.min() < 20 and pixels.max() > 235 and 100 < pixels.mean() < 155  # a ramp, not a white square


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (400, 200), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 200, 200))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: left half ends up on top
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif, quality=95)
    pixels = decode_image(buf.getvalue(), 224, 10**8)
    assert pixels[10, 112, 2] > 200 and pixels[-10, 112, 0] > 200


@pytest.mark.parametrize("payload, reason", [
    (b"", "image_empty"),
    (b"\x00\x01\x02 random bytes", "image_decode_failed"),
    (encode_image(rgb_image(400, 300), "JPEG")[:300], "image_decode_failed"),
])
def test_bad_images_are_sample_errors(payload, reason):
    with pytest.raises(SampleError, match=reason):
        decode_image(payload, 224, 10**8)


def test_decompression_bomb_is_rejected_from_the_header():
    payload = encode_image(Image.new("L", (5000, 5000)), "PNG")
    with pytest.raises(SampleError, match="image_too_large: 5000x5000"):
        decode_image(payload, 224, max_pixels=10_000_000)


def test_captions():
    assert decode_caption("  一只猫\n".encode()) == "一只猫"
    assert decode_caption("\ufeff带BOM的标题".encode("utf-8")) == "带BOM的标题"
    with pytest.raises(SampleError, match="caption_not_utf8"):
        decode_caption("中文标题".encode("gbk"))
    with pytest.raises(SampleError, match="empty_caption"):
        decode_caption(b" \n ")
    with pytest.raises(SampleError, match="missing_caption"):
        decode_caption(None)


def test_json_url_never_fails_the_sample():
    assert decode_url(b'{"url": "https://x/1.jpg", "width": 3}') == ("https://x/1.jpg", None)
    assert decode_url(None) == (None, None)
    url, warning = decode_url(b"{not json")
    assert url is None and warning.startswith("bad_json")
