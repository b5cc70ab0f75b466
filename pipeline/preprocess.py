"""Decode images to 224x224 uint8 RGB and captions to 77 token ids, on CPU; a bad sample becomes an error row."""

from __future__ import annotations

import functools
import io
import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from pipeline.config import JobCfg

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 77  # the model protocol: every caption padded/truncated to exactly 77 tokens
BUNDLED_VOCAB_DIR = Path(__file__).parent / "data"
# aspect ratios up to this are resized exactly as CLIPImageProcessor does; beyond, only the crop box
MAX_EXACT_ASPECT = 20

# decode below the cap; DecompressionBombWarning/Error never fire because the header is checked first
Image.MAX_IMAGE_PIXELS = None


def prepared_schema(image_size: int, decode_on: str = "tasks") -> pa.Schema:
    """Rows from the read tasks to the encoder: decoded pixels (decode_on=tasks) or the image's own bytes
    (decode_on=encoder, decoded on the encoder's device)."""
    images = ([("pixels", pa.binary(image_size * image_size * 3))] if decode_on == "tasks"  # HxWx3 uint8
              # device_ok: device_decode.device_decodable, checked here to spare the encoder's cores
              else [("image", pa.binary()), ("device_ok", pa.bool_())])
    return pa.schema([
        ("key", pa.string()),
        ("shard", pa.string()),
        ("position", pa.int64()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("error", pa.string()),
        ("warning", pa.string()),
        *images,
        ("input_ids", pa.list_(pa.int32(), MAX_TEXT_TOKENS)),
        ("shard_samples", pa.int64()),
        ("shard_error", pa.string()),
    ])


class SampleError(Exception):
    """A sample that cannot be embedded; the message becomes its `error` (reason: detail)."""


def decode_image(payload: bytes, size: int, max_pixels: int) -> np.ndarray:
    """OpenAI CLIP's image protocol as CLIPImageProcessor's PIL backend runs it, to uint8 HxWx3.

    Alpha is composited on white (as transformers' convert_to_rgb), the EXIF orientation applied, the
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


def decode_caption(payload: bytes | None) -> str:
    if payload is None:
        raise SampleError("missing_caption: no .txt member")
    try:
        caption = payload.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SampleError(f"caption_not_utf8: {exc}") from None
    caption = caption.strip()
    if not caption:
        raise SampleError("empty_caption: the .txt member is empty or whitespace")
    return caption


def decode_url(payload: bytes | None) -> tuple[str | None, str | None]:
    """The `url` field of KEY.json and a warning if the json is unusable (it never fails the sample)."""
    if payload is None:
        return None, None
    try:
        meta = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"bad_json: {exc}"
    url = meta.get("url") if isinstance(meta, dict) else None
    return (url if isinstance(url, str) else None), None


def resolve_tokenizer(cfg: JobCfg, random_weights: bool) -> tuple[str, str | None]:
    """(tokenizer id or folder, revision), decided once on the driver so every task tokenizes alike.

    model.tokenizer wins; else the text model's own tokenizer; the bundled vocab (the same 21128 tokens
    Taiyi uses) when the text weights are random or a local text model folder ships no tokenizer files.
    """
    if cfg.model.tokenizer:
        return cfg.model.tokenizer, None
    text = Path(cfg.model.text)
    ships_vocab = text.is_dir() and any((text / f).exists() for f in ("vocab.txt", "tokenizer.json"))
    if random_weights or (text.is_dir() and not ships_vocab):
        log.warning("tokenizer: using the bundled Chinese BERT vocab (%s)", BUNDLED_VOCAB_DIR / "vocab.txt")
        return str(BUNDLED_VOCAB_DIR), None
    return cfg.model.text, cfg.model.text_revision


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str, revision: str | None):
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(source, revision=revision)


def tokenize(tokenizer, captions: list[str]) -> np.ndarray:
    encoded = tokenizer(captions, max_length=MAX_TEXT_TOKENS, padding="max_length", truncation=True,
                        return_attention_mask=False, return_token_type_ids=False)
    return np.asarray(encoded["input_ids"], dtype=np.int32).reshape(len(captions), MAX_TEXT_TOKENS)


def preprocess(batch: pa.Table, cfg: JobCfg, tokenizer: tuple[str, str | None]) -> pa.Table:
    """Ray Data stage: raw sample rows in, pixels (or image bytes, decode_on=encoder) + token ids out.
    Marker rows pass through."""
    size = cfg.read.image_size
    on_tasks = cfg.read.decode_on == "tasks"
    blank = bytes(size * size * 3) if on_tasks else None
    rows = batch.to_pylist()
    captions, images, urls, warnings_, errors = [], [], [], [], []
    for row in rows:
        error, caption, image, url = row["error"], None, blank, None
        notes = [row["warning"]] if row["warning"] else []
        if row["position"] >= 0:
            url, json_warning = decode_url(row["json"])
            if json_warning:
                notes.append(json_warning)
            try:
                caption = decode_caption(row["caption"])
            except SampleError as exc:
                error = error or str(exc)
            if row["image"] is None:
                error = error or "missing_image: no image member (.jpg/.jpeg/.png/.webp)"
            elif error is None and not on_tasks:
                image = row["image"]  # decoded by the encoder actor, with the same errors (device_decode.py)
            elif error is None:
                try:
                    image = decode_image(row["image"], size, cfg.read.max_image_pixels).tobytes()
                except SampleError as exc:
                    error = str(exc)
        captions.append(caption)
        images.append(image)
        urls.append(url)
        errors.append(error)
        warnings_.append("; ".join(notes) or None)

    tokenizer = load_tokenizer(*tokenizer)
    texts = [c if c is not None else "" for c in captions]
    input_ids = tokenize(tokenizer, texts) if texts else np.zeros((0, MAX_TEXT_TOKENS), np.int32)
    for i, text in enumerate(texts):
        if text and input_ids[i, -1] != tokenizer.pad_token_id and len(tokenizer.tokenize(text)) > MAX_TEXT_TOKENS - 2:
            warnings_[i] = "; ".join(filter(None, [warnings_[i], "caption_truncated: longer than 77 tokens"]))

    schema = prepared_schema(size, cfg.read.decode_on)
    image_field = schema.field("pixels" if on_tasks else "image")
    columns = {
        "key": batch.column("key"),
        "shard": batch.column("shard"),
        "position": batch.column("position"),
        "caption": pa.array(captions, pa.string()),
        "url": pa.array(urls, pa.string()),
        "error": pa.array(errors, pa.string()),
        "warning": pa.array(warnings_, pa.string()),
        image_field.name: pa.array(images, image_field.type),
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(input_ids.reshape(-1), pa.int32()), MAX_TEXT_TOKENS),
        "shard_samples": batch.column("shard_samples"),
        "shard_error": batch.column("shard_error"),
    }
    if not on_tasks:
        from pipeline.device_decode import device_decodable

        columns["device_ok"] = pa.array([image is not None and device_decodable(image, size, cfg.read.max_image_pixels)
                                         for image in images], pa.bool_())
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)
