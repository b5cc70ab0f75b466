"""Curation: drop near-duplicate images (keeping each group's best caption) and images that leak evaluation sets.

The rule (the filter job's `dedup_threshold` and `dedup_against`):
- two `ok` pairs are near-duplicates when the cosine of their image embeddings is >= dedup_threshold; groups
  are the connected components of that relation (a~b and b~c group a, b and c, whatever cos(a, c) is);
- in each group the pair with the highest `similarity` is kept (ties: the smaller shard URL, then the smaller
  position) and the others are dropped as `near_duplicate`, matched to the kept pair;
- every `ok` pair whose image has cosine >= dedup_threshold with an image of the `dedup_against` tables is
  dropped as `matches_reference`, matched to its nearest reference image, even where it is its group's kept
  pair (a group may then keep none). A pair dropped by both rules is recorded once, as `matches_reference`.
- error rows never take part: the filter job drops them anyway.

The search runs on Ray with memory bounded per task. Small inputs (at most `dedup_partition_size` ok pairs)
form one partition and the search is exact. Larger ones are split by spherical k-means, trained on a sample
of the vectors; each pair is assigned to its `dedup_probes` nearest centroids, and every partition is
searched exactly (block by block) in its own task. The groups come from the union of the edges found. Two
duplicates can be missed only when no partition holds both, i.e. when neither's probes reach the other's
nearest centroids: near-duplicates sit close together, so this is rare, and more probes make it rarer at
proportionally more search work (`measure_recall` compares against brute force).
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline import storage, tables
from pipeline.config import StorageCfg
from pipeline.schema import EMBEDDING_DIM, STATUS_OK

log = logging.getLogger(__name__)

NEAR_DUPLICATE, MATCHES_REFERENCE = "near_duplicate", "matches_reference"
DUPLICATES_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("position", pa.int64()), ("reason", pa.string()),
    ("match_key", pa.string()), ("match_shard", pa.string()), ("cosine", pa.float32()),
])
KMEANS_SAMPLE = 100_000    # vectors the centroids are trained on
KMEANS_ITERATIONS = 12
SEARCH_BLOCK = 1024        # rows of a partition compared with all of it at once: BLOCK x partition floats
TABLE_BITS = 32            # a pair's id: table index << 32 | row


def pair_id(table: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(table) << TABLE_BITS) | rows.astype(np.int64)


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Unit rows in float32 (stored float16 embeddings are normalised again: cosine, not a dot product)."""
    vectors = vectors.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def ok_rows(url: str, table: int, storage_cfg: StorageCfg) -> dict[str, np.ndarray]:
    """The ok pairs of one table: id, position, key, similarity, unit image vector (float32)."""
    data = tables.read_table(url, storage_cfg, ["key", "shard", "position", "status", "similarity",
                                                "image_embedding"])
    rows = np.flatnonzero(pc.equal(data.column("status"), STATUS_OK).to_numpy(zero_copy_only=False))
    ok = data.take(pa.array(rows, pa.int64()))
    return {"id": pair_id(table, rows), "shard": data.column("shard")[0].as_py() if data.num_rows else None,
            "position": ok.column("position").to_numpy(),
            "key": np.array(ok.column("key").to_pylist(), dtype=object),
            "similarity": ok.column("similarity").to_numpy(zero_copy_only=False).astype(np.float32),
            "vector": normalized(tables.image_vectors(ok))}


# ---- the search ----

def spherical_kmeans(sample: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k unit centroids of unit vectors (cosine k-means, Lloyd's iterations, seeded: reruns agree)."""
    rng = np.random.default_rng(seed)
    centroids = sample[rng.choice(len(sample), size=k, replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        nearest = np.argmax(sample @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, nearest, sample)
        empty = np.linalg.norm(sums, axis=1) == 0
        sums[empty] = sample[rng.choice(len(sample), size=int(empty.sum()))]  # re-seed an empty cluster
        centroids = normalized(sums)
    return centroids


def nearest_partitions(vectors: np.ndarray, centroids: np.ndarray, probes: int) -> np.ndarray:
    """N x probes partition indices, nearest first."""
    scores = vectors @ centroids.T
    probes = min(probes, len(centroids))
    top = np.argpartition(-scores, probes - 1, axis=1)[:, :probes]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def search_partition(ids: np.ndarray, vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    """Every pair (a < b by id) of one partition with cosine >= threshold: (a, b, cosine)."""
    found = []
    for start in range(0, len(ids), SEARCH_BLOCK):
        block = vectors[start:start + SEARCH_BLOCK] @ vectors.T
        i, j = np.nonzero(block >= threshold)
        i += start
        keep = ids[i] < ids[j]
        found.append((ids[i[keep]], ids[j[keep]], block[i[keep] - start, j[keep]]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate(parts) for parts in zip(*found))


@ray.remote
def _table_rows(url: str, table: int, storage_cfg: StorageCfg) -> dict[str, np.ndarray]:
    return ok_rows(url, table, storage_cfg)


@ray.remote
def _assign(rows: dict, centroids: np.ndarray, probes: int) -> list:
    """One table's ids and vectors split by partition: one (ids, vectors) object per partition (num_returns)."""
    assigned = nearest_partitions(rows["vector"], centroids, probes)
    return [(rows["id"][np.any(assigned == p, axis=1)], rows["vector"][np.any(assigned == p, axis=1)])
            for p in range(len(centroids))]


@ray.remote
def _search(threshold: float, *pieces) -> tuple[np.ndarray, ...]:
    ids = np.concatenate([p[0] for p in pieces])
    vectors = np.concatenate([p[1] for p in pieces])
    return search_partition(ids, vectors, threshold)


@ray.remote
def _reference_matches(rows: dict, references: np.ndarray, threshold: float) -> tuple[np.ndarray, ...]:
    """(id, reference index, cosine) of the pairs whose nearest reference image is >= threshold."""
    best = np.full(len(rows["id"]), -np.inf, np.float32)
    which = np.zeros(len(rows["id"]), np.int64)
    for start in range(0, len(references), SEARCH_BLOCK):
        scores = rows["vector"] @ references[start:start + SEARCH_BLOCK].T
        if scores.size:
            top = np.argmax(scores, axis=1)
            value = scores[np.arange(len(top)), top]
            better = value > best
            best[better], which[better] = value[better], top[better] + start
    hit = best >= threshold
    return rows["id"][hit], which[hit], best[hit]


def find_edges(row_refs: list, n: int, threshold: float, partition_size: int, probes: int,
               seed: int = 0) -> tuple[tuple[np.ndarray, ...], dict]:
    """All near-duplicate edges (a, b, cosine) among the tables' ok pairs, and how they were searched."""
    if n <= partition_size:
        parts = [ray.get(_search.remote(threshold, *[_as_piece.remote(r) for r in row_refs]))]
        return _unique_edges(parts), {"partitions": 1, "probes": 1, "exact": True}
    per_table = max(1, math.ceil(KMEANS_SAMPLE * 1.0 / len(row_refs)))
    sample = np.concatenate(ray.get([_sample.remote(r, per_table, seed) for r in row_refs]))
    k = max(2, math.ceil(n * probes / partition_size))
    centroids = spherical_kmeans(sample, min(k, len(sample)), seed)
    log.info("dedup: %d ok pairs in %d partitions (k-means on %d vectors), %d probes each", n, len(centroids),
             len(sample), probes)
    centroids_ref = ray.put(centroids)
    assigned = [_assign.options(num_returns=len(centroids)).remote(r, centroids_ref, probes) for r in row_refs]
    searches = [_search.remote(threshold, *[pieces[p] for pieces in assigned]) for p in range(len(centroids))]
    return _unique_edges(ray.get(searches)), {"partitions": len(centroids), "probes": probes, "exact": False}


@ray.remote
def _as_piece(rows: dict) -> tuple[np.ndarray, np.ndarray]:
    return rows["id"], rows["vector"]


@ray.remote
def _sample(rows: dict, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + int(rows["id"][0] >> TABLE_BITS) if len(rows["id"]) else seed)
    pick = rng.choice(len(rows["id"]), size=min(size, len(rows["id"])), replace=False)
    return rows["vector"][np.sort(pick)]


def _unique_edges(parts: list) -> tuple[np.ndarray, ...]:
    a, b, cosine = (np.concatenate([p[i] for p in parts]) for i in range(3))
    if len(a) == 0:
        return a, b, cosine
    _, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    return a[first], b[first], cosine[first]


def components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(node ids, component label per node) of the graph with edges a-b: label = smallest node index."""
    nodes = np.unique(np.concatenate([a, b]))
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    labels = np.arange(len(nodes))
    while True:
        low = np.minimum(labels[ia], labels[ib])
        before = labels.copy()
        np.minimum.at(labels, ia, low)
        np.minimum.at(labels, ib, low)
        labels = labels[labels]  # pointer jumping: a chain of n settles in O(log n) rounds
        if np.array_equal(labels, before):
            return nodes, labels


# ---- the job's stage ----

def find_duplicates(files: list[str], threshold: float, references: list[str], storage_cfg: StorageCfg,
                    partition_size: int, probes: int, num_cpus: float) -> tuple[dict[str, pa.Table], dict]:
    """{table name: its dropped pairs (DUPLICATES_SCHEMA)} for every input table, and the counts."""
    row_refs = [_table_rows.options(num_cpus=num_cpus).remote(url, i, storage_cfg) for i, url in enumerate(files)]
    info = ray.get([_row_info.remote(r) for r in row_refs])
    shards = [shard or url for url, (_, shard) in zip(files, info)]
    n = sum(count for count, _ in info)
    (a, b, _), search = find_edges(row_refs, n, threshold, partition_size, probes)
    nodes, labels = components(a, b)
    meta = _node_meta(row_refs, nodes)  # similarity, position, key of every node
    dropped: dict[int, tuple] = {}      # id -> (reason, match key, match shard, cosine)
    order = np.lexsort((meta["position"], np.array([shards[t] for t in nodes >> TABLE_BITS], dtype=object)
                        .astype(str), -meta["similarity"], labels))
    keepers = {}
    for i in order:
        keepers.setdefault(labels[i], i)
    keeper = np.array([keepers[label] for label in labels], dtype=np.int64)
    members = np.flatnonzero(keeper != np.arange(len(nodes)))
    # cos(member, its group's kept pair); every node is one or the other, so _node_meta has both vectors
    cosines = np.sum(meta["vector"][members] * meta["vector"][keeper[members]], axis=1)
    for i, cosine in zip(members, cosines.tolist()):
        k = keeper[i]
        dropped[int(nodes[i])] = (NEAR_DUPLICATE, meta["key"][k], shards[int(nodes[k] >> TABLE_BITS)], cosine)
    groups = len(keepers)
    if references:
        ref = reference_vectors(references, storage_cfg)
        ref_put = ray.put(ref["vector"])
        for ids, which, best in ray.get([_reference_matches.remote(r, ref_put, threshold) for r in row_refs]):
            for pid, w, cosine in zip(ids, which, best):
                dropped[int(pid)] = (MATCHES_REFERENCE, ref["key"][w], ref["shard"][w], float(cosine))
    out = {}
    ids = np.array(sorted(dropped), dtype=np.int64)
    tables_of = ids >> TABLE_BITS
    for t, url in enumerate(files):
        mine = ids[tables_of == t]
        found = ray.get(_take.remote(row_refs[t], mine)) if len(mine) else {"key": [], "position": []}
        records = [(key, shards[t], int(pos), *dropped[pid])
                   for key, pos, pid in zip(found["key"], found["position"], mine.tolist())]
        records.sort(key=lambda r: r[2])  # in shard order
        out[tables.table_name(url)] = pa.table({name: [r[i] for r in records]
                                                for i, name in enumerate(DUPLICATES_SCHEMA.names)},
                                               schema=DUPLICATES_SCHEMA)
    reasons = [reason for reason, *_ in dropped.values()]
    counts = {NEAR_DUPLICATE: reasons.count(NEAR_DUPLICATE), MATCHES_REFERENCE: reasons.count(MATCHES_REFERENCE),
              "groups": groups, "ok_pairs_searched": n, "search": search}
    return out, counts


@ray.remote
def _row_info(rows: dict) -> tuple[int, str | None]:
    return len(rows["id"]), rows["shard"]


def _node_meta(row_refs: list, nodes: np.ndarray) -> dict[str, np.ndarray]:
    meta = {"similarity": np.zeros(len(nodes), np.float32), "position": np.zeros(len(nodes), np.int64),
            "key": np.empty(len(nodes), dtype=object), "vector": np.zeros((len(nodes), EMBEDDING_DIM), np.float32)}
    tables_of = nodes >> TABLE_BITS
    for t in np.unique(tables_of):
        rows = ray.get(_take.remote(row_refs[t], nodes[tables_of == t]))
        for name in meta:
            meta[name][tables_of == t] = rows[name]
    return meta


@ray.remote
def _take(rows: dict, ids: np.ndarray) -> dict[str, np.ndarray]:
    at = np.searchsorted(rows["id"], ids)
    return {name: rows[name][at] for name in ("similarity", "position", "key", "vector")}


def reference_vectors(folders: list[str], storage_cfg: StorageCfg) -> dict:
    """The ok image embeddings of the reference folders (embed job outputs): key, shard, unit vector."""
    keys, shards, vectors = [], [], []
    for folder in folders:
        for url in tables.embedding_files(folder, storage_cfg, field="dedup_against"):
            data = tables.read_table(url, storage_cfg, ["key", "shard", "status", "image_embedding"])
            ok = data.filter(pc.equal(data.column("status"), STATUS_OK))
            keys += ok.column("key").to_pylist()
            shards += ok.column("shard").to_pylist()
            vectors.append(normalized(tables.image_vectors(ok)))
    return {"key": keys, "shard": shards,
            "vector": np.concatenate(vectors) if vectors else np.zeros((0, EMBEDDING_DIM), np.float32)}


def write_duplicates(found: dict[str, pa.Table], output: str, storage_cfg: StorageCfg) -> None:
    fs, out = storage.filesystem(output, storage_cfg)
    for name, table in found.items():
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_atomically(fs, storage.join(out, "duplicates", f"{name}.parquet"), sink.getvalue())


def dropped_positions(output: str, name: str, storage_cfg: StorageCfg) -> set[int]:
    """Positions of one table's pairs that dedup dropped (read back from duplicates/{name}.parquet)."""
    fs, out = storage.filesystem(output, storage_cfg)
    path = storage.join(out, "duplicates", f"{name}.parquet")
    with fs.open(path, "rb") as f:
        return set(pq.read_table(f, columns=["position"]).column("position").to_pylist())
