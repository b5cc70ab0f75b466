"""The one declaration of the embedding table's Arrow schema and its file metadata."""

from __future__ import annotations

import json

import pyarrow as pa

EMBEDDING_DIM = 512
# text protocol of Fengshenbang's own evaluation of Taiyi-CLIP (clip_test_flickr.py)
TEXT_PROTOCOL = "BertTokenizer, max_length=77, padding=max_length, truncation=True, input_ids only; logits, L2-normalised"
IMAGE_PROTOCOL = ("RGB (alpha on white), EXIF-transposed, resize shortest edge to 224 bicubic, center crop 224, "
                  "x/255, OpenAI CLIP mean/std; get_image_features (vision tower + projection), L2-normalised")
METADATA_KEY = b"taiyi_embed"

STATUS_OK = "ok"
STATUS_ERROR = "error"


def embedding_table_schema(embedding_dtype: str = "float16", metadata: dict | None = None) -> pa.Schema:
    """Columns of `{output}/embeddings/*.parquet`; the first nine are the public contract."""
    value_type = pa.float16() if embedding_dtype == "float16" else pa.float32()
    schema = pa.schema([
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("image_embedding", pa.list_(value_type, EMBEDDING_DIM)),
        pa.field("text_embedding", pa.list_(value_type, EMBEDDING_DIM)),
        pa.field("similarity", pa.float32()),
        # extras: the sample's index in its shard, and non-fatal notes (bad .json, truncated caption)
        pa.field("position", pa.int64(), nullable=False),
        pa.field("warning", pa.string()),
    ])
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, ensure_ascii=False).encode()})
    return schema


def file_metadata(cfg, random_weights: bool, tokenizer: str) -> dict:
    """What a reader needs to trust the numbers: models, revisions, protocols, version. Never credentials."""
    from pipeline import __version__

    return {
        "pipeline_version": __version__,
        "text_model": cfg.model.text,
        "text_revision": cfg.model.text_revision,
        "image_model": cfg.model.image,
        "image_revision": cfg.model.image_revision,
        "tokenizer": tokenizer,
        "precision": cfg.model.precision,
        "embedding_dtype": cfg.write.embedding_dtype,
        "text_protocol": TEXT_PROTOCOL,
        "image_protocol": IMAGE_PROTOCOL,
        "random_weights": random_weights,
    }


def read_metadata(schema: pa.Schema) -> dict:
    return json.loads(schema.metadata[METADATA_KEY])
