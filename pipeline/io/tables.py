"""Reading the embed job's committed tables (`{output}/embeddings/*.parquet`): the one home of it for the
curation stages (filter, dedup, report)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import storage
from pipeline.config import StorageCfg
from pipeline.io.schema import METADATA_KEY, read_metadata


def embedding_files(embeddings: str, storage_cfg: StorageCfg, field: str = "embeddings") -> list[str]:
    """URLs of the committed tables under an embed job's output folder, sorted; `field` names the config
    key in errors."""
    fs, path = storage.filesystem(embeddings, storage_cfg)
    folder = storage.join(path, "embeddings")
    if not fs.exists(folder):
        raise ValueError(f"{field}: {embeddings} has no embeddings/ folder (is it the embed job's output?)")
    files = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet"))
    if not files:
        raise ValueError(f"{field}: no committed tables in {storage.unstrip(fs, folder)}")
    return [storage.unstrip(fs, p) for p in files]


def table_name(url: str) -> str:
    """A table's name: its input shard's name (`00042` for `.../embeddings/00042.parquet`)."""
    return url.rstrip("/").rsplit("/", 1)[-1][: -len(".parquet")]


def read_table(url: str, storage_cfg: StorageCfg, columns: list[str]) -> pa.Table:
    fs, path = storage.filesystem(url, storage_cfg)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def embedding_models(url: str, storage_cfg: StorageCfg) -> dict:
    """Which models (and whether random weights) produced the scores, from the table's metadata."""
    fs, path = storage.filesystem(url, storage_cfg)
    with fs.open(path, "rb") as f:
        schema = pq.read_schema(f)
    meta = read_metadata(schema) if METADATA_KEY in (schema.metadata or {}) else {}  # not written by our job
    return {k: meta.get(k) for k in ("text_model", "text_revision", "image_model", "image_revision", "tokenizer",
                                     "random_weights")}


def image_vectors(table: pa.Table) -> np.ndarray:
    """The image_embedding column of (ok) rows as an N x 512 float32 matrix."""
    column = table.column("image_embedding").combine_chunks()
    if len(column) == 0:
        return np.zeros((0, column.type.list_size), np.float32)
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), -1)


def fingerprint(urls: list[str], storage_cfg: StorageCfg) -> dict:
    """Which tables, at which sizes: a result computed from them is stale when this changes. One listing per
    folder, not one request per table."""
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(storage.parent(url), []).append(url)
    entries = []
    for folder, members in sorted(by_folder.items()):
        fs, path = storage.filesystem(folder, storage_cfg)
        sizes = {p["name"].rsplit("/", 1)[-1]: p["size"] for p in fs.ls(path, detail=True)}
        entries += [f"{url}:{sizes.get(url.rsplit('/', 1)[-1])}" for url in sorted(members)]
    return {"tables": len(urls), "sha256": hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]}
