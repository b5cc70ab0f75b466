"""Decode images to 224x224 uint8 RGB and captions to 77 token ids, on CPU; a bad sample becomes an error row."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import JobCfg
from pipeline.embed.device_decode import device_decodable
from pipeline.embed.image import SampleError, decode_image

log = logging.getLogger(__name__)

MAX_TEXT_TOKENS = 77  # the model protocol: every caption padded/truncated to exactly 77 tokens
BUNDLED_VOCAB_DIR = Path(__file__).parent / "data"


def prepared_schema(image_size: int, decode_on: str = "tasks") -> pa.Schema:
    """Rows from the read tasks to the encoder: decoded pixels (decode_on=tasks) or the image's own bytes
    (decode_on=encoder, decoded on the encoder's device)."""
    images = ([("pixels", pa.binary(image_size * image_size * 3))] if decode_on == "tasks"  # HxWx3 uint8
              # image: the bytes of a JPEG the device decodes as PIL does, and device_area its width x height
              # (0 for any other image: checked here to spare the encoder's cores; the actor's decode budget
              # counts it); pixels: every other image, decoded here by the exact path, so that the encoder's
              # host thread never decodes one itself
              else [("image", pa.binary()), ("device_area", pa.int64()),
                    ("pixels", pa.binary(image_size * image_size * 3))])
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
    captions, images, areas, pixels, urls, warnings_, errors = [], [], [], [], [], [], []
    for row in rows:
        error, caption, image, decoded, url, area = row["error"], None, blank, None, None, 0
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
            elif error is None and not on_tasks and (
                    area := device_decodable(row["image"], size, cfg.read.max_image_pixels)):
                image = row["image"]  # decoded on the encoder's device (device_decode.py)
            elif error is None:  # the exact path, here: the pixels column of either placement
                try:
                    decoded = decode_image(row["image"], size, cfg.read.max_image_pixels).tobytes()
                except SampleError as exc:
                    error = str(exc)
                if on_tasks and decoded is not None:
                    image = decoded
        captions.append(caption)
        images.append(image)
        areas.append(area)
        pixels.append(decoded)
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
        columns["device_area"] = pa.array(areas, pa.int64())
        columns["pixels"] = pa.array(pixels, schema.field("pixels").type)
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)
