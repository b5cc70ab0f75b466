"""The exact image protocol on CPU: one image's bytes to size x size uint8 RGB, as CLIPImageProcessor's PIL
backend gives it; a bad image raises SampleError."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

# aspect ratios up to this are resized exactly as CLIPImageProcessor does; beyond, only the crop box
MAX_EXACT_ASPECT = 20

# decode below the cap; DecompressionBombWarning/Error never fire because the header is checked first
Image.MAX_IMAGE_PIXELS = None


class SampleError(Exception):
    """A sample that cannot be embedded; the message becomes its `error` (reason: detail)."""


def decode_image(payload: bytes, size: int, max_pixels: int) -> np.ndarray:
    """OpenAI CLIP's image protocol as CLIPImageProcessor's PIL backend runs it, to uint8 HxWx3.

    Alpha is composited on white (as transformers' convert_to_rgb from 5.21), the EXIF orientation applied, the
    shortest edge resized to `size` with bicubic and the center `size`x`size` kept. The resize reads only
    the source box that lands in the crop, which gives the same pixels as resizing the whole image.
    """
    if not payload:
        raise SampleError("image_empty: zero-byte image member")
    try:
        image = Image.open(io.BytesIO(payload))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for garbage
        raise SampleError(f"image_decode_failed: {type(exc).__name__}: {without_addresses(exc)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise SampleError(f"image_too_large: {width}x{height} exceeds read.max_image_pixels={max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's "palette images with transparency" notice
            image.load()
            image = ImageOps.exif_transpose(image)
            image = to_rgb(image)
    except Exception as exc:  # noqa: BLE001
        raise SampleError(f"image_decode_failed: {type(exc).__name__}: {without_addresses(exc)}") from None
    return resize_center_crop(image, size)


def without_addresses(exc: Exception) -> str:
    """PIL names the buffer it read (<_io.BytesIO object at 0x7f...>): drop it, so that a sample's error is
    the same in every run and on every decode path."""
    return re.sub(r" ?<[\w.]+ object at 0x[0-9a-f]+>", "", str(exc))


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float grey: PIL's convert("RGB") clips at 255; scale to 8 bit instead
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop top, crop left): shortest edge to `size`, center crop."""
    # transformers' get_resize_output_image_size(default_to_square=False)
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    # transformers' center_crop (no padding needed: both sides are >= size)
    return new_w, new_h, (new_h - size) // 2, (new_w - size) // 2


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    width, height = image.size
    new_w, new_h, top, left = resize_geometry(width, height, size)
    if max(new_w, new_h) <= MAX_EXACT_ASPECT * size:
        resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        return np.asarray(resized, dtype=np.uint8)[top : top + size, left : left + size]
    # a 10000x1 banner would be resized to 2,240,000x224 first: resize only the source box that lands in
    # the crop instead (bounded memory; close to, not bit-identical with, the full resize)
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)
