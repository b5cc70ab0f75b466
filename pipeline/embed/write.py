"""Write embedded rows as staged part files, and commit a shard's parts as one atomic Parquet file.

Parts live under `{output}/_staging/{run_id}/{shard}/`; only the driver, which sees every part's write
complete, decides that a shard is whole and asks for its commit. A part written by a task attempt that
Ray later retried is never listed to the commit, and is deleted with the shard's staging folder.
"""

from __future__ import annotations

import collections
import io
import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io import storage
from pipeline.config import JobCfg
from pipeline.io.schema import STATUS_OK, embedding_table_schema
from pipeline.io.shards import shard_name

PART_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("part", pa.string()),           # URL-less path of the part file; null for marker rows
    ("rows", pa.int64()),            # samples in the part
    ("positions", pa.list_(pa.int64())),  # their positions in the shard: the driver counts each once
    ("shard_samples", pa.int64()),   # marker rows: samples in the shard; else -1
    ("shard_error", pa.string()),
    # the encoder batch the part's samples came from: which actor, when it started and finished (the
    # driver's steady-state rate); null for marker rows
    ("encoder", pa.string()),
    ("encode_started", pa.float64()),
    ("encoded_at", pa.float64()),
])


def staging_dir(cfg: JobCfg, run_id: str | None = None) -> str:
    _, out = storage.filesystem(cfg.output, cfg.storage)
    return storage.join(out, "_staging", *([run_id] if run_id else []))


def embeddings_path(cfg: JobCfg, name: str) -> str:
    _, out = storage.filesystem(cfg.output, cfg.storage)
    return storage.join(out, "embeddings", f"{name}.parquet")


def write_parts(batch: pa.Table, cfg: JobCfg, run_id: str) -> pa.Table:
    """Ray Data stage: one part file per shard and encoder batch in the block; returns one row per part or
    marker."""
    fs, _ = storage.filesystem(cfg.output, cfg.storage)
    schema = embedding_table_schema(cfg.write.embedding_dtype)
    out = []
    samples = batch.filter(pc.greater_equal(batch.column("position"), 0))
    keys = list(zip(*(samples.column(c).to_pylist() for c in ("shard", "encoder", "encode_started"))))
    for key in dict.fromkeys(keys):
        part = samples.filter(pa.array([k == key for k in keys]))
        url, encoder, started = key
        lo, hi = pc.min_max(part.column("position")).values()
        # unique per attempt: a retried task never overwrites a part another attempt may still write
        path = storage.join(staging_dir(cfg, run_id), shard_name(url),
                            f"{lo.as_py():09d}-{hi.as_py():09d}-{uuid.uuid4().hex[:12]}.parquet")
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(part.select(schema.names).cast(schema), f, compression=cfg.write.compression)
        out.append({"shard": url, "part": path, "rows": part.num_rows,
                    "positions": part.column("position").to_pylist(), "shard_samples": -1, "shard_error": None,
                    "encoder": encoder, "encode_started": started,
                    "encoded_at": pc.max(part.column("encoded_at")).as_py()})
    markers = batch.filter(pc.less(batch.column("position"), 0))
    for marker in markers.select(["shard", "shard_samples", "shard_error"]).to_pylist():
        out.append({"part": None, "rows": 0, "positions": [], **marker})
    return pa.Table.from_pylist(out, schema=PART_SCHEMA)


def commit_marker(cfg: JobCfg, run_id: str, url: str) -> str:
    """Written once a shard's file is committed, before its parts are deleted; holds commit_shard's counts."""
    return storage.join(staging_dir(cfg, run_id), f"{shard_name(url)}.committed.json")


def commit_shard(cfg: JobCfg, run_id: str, url: str, parts: list[str], expected: int, metadata: dict) -> dict:
    """Merge a shard's parts into embeddings/{shard}.parquet in one atomic write; return its counts.

    A sample re-embedded by a retried task may be in two parts; the first copy is kept. Raises if the parts
    do not cover exactly the positions 0..expected-1: then nothing is committed.

    Idempotent, since Ray retries a commit whose worker died: a retry before the commit marker was written
    writes the same file again from the same parts; a retry after it (the worker killed while it deleted the
    parts) only finishes the clean-up and returns the marker's counts.
    """
    fs, _ = storage.filesystem(cfg.output, cfg.storage)
    marker = commit_marker(cfg, run_id, url)
    if not fs.exists(marker):
        counts = merge_parts(fs, cfg, url, parts, expected, metadata)
        storage.write_atomically(fs, marker, json.dumps(counts).encode())
    else:
        counts = json.loads(fs.cat_file(marker))
    staged = storage.join(staging_dir(cfg, run_id), shard_name(url))
    if fs.exists(staged):
        fs.rm(staged, recursive=True)
    return counts


def merge_parts(fs, cfg: JobCfg, url: str, parts: list[str], expected: int, metadata: dict) -> dict:
    """commit_shard's merge and atomic write of embeddings/{shard}.parquet; its counts."""
    schema = embedding_table_schema(cfg.write.embedding_dtype, metadata)
    tables = []
    for part in parts:
        with fs.open(part, "rb") as f:
            tables.append(pq.read_table(f))
    table = (pa.concat_tables(tables).cast(schema) if tables else schema.empty_table())
    table = table.sort_by("position")
    positions = table.column("position").to_numpy()
    if len(positions) > 1 and (repeated := positions[1:] == positions[:-1]).any():
        table = table.filter(pa.array(np.concatenate([[True], ~repeated])))
        positions = table.column("position").to_numpy()
    if len(positions) != expected or (expected and (positions[0] != 0 or (positions[1:] - positions[:-1] != 1).any())):
        raise RuntimeError(f"{url}: staged parts hold {len(positions)} rows for {expected} samples "
                           f"(positions must be 0..{expected - 1} exactly once); not committed")
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=cfg.write.compression)
    storage.write_atomically(fs, embeddings_path(cfg, shard_name(url)), sink.getvalue())
    status = table.column("status").to_pylist()
    reasons = collections.Counter(e.split(":", 1)[0] for e in table.column("error").to_pylist() if e)
    return {"rows": table.num_rows, "ok": status.count(STATUS_OK), "error": table.num_rows - status.count(STATUS_OK),
            "errors_by_reason": dict(reasons)}
