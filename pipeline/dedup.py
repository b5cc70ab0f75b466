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

The search runs on Ray with memory bounded per task, and the driver never holds a vector. Small inputs (at
most `dedup_partition_size` ok pairs) form one partition and the search is exact. Larger ones are split by
spherical k-means, trained on a sample of 100,000 vectors; each pair is assigned to its `dedup_probes`
nearest centroids, a Ray Data shuffle (groupby partition) brings each partition together, and one task
searches it exactly, block by block. The groups come from the union of the edges found (connected
components on the driver: int64 ids only). Two duplicates can be missed only when no partition holds both,
i.e. when neither's probes reach the other's nearest centroids: near-duplicates sit close together, so this
is rare, and more probes make it rarer at proportionally more search work. `jobs/benchmark_dedup.py`
measures the recall against brute force.
"""

from __future__ import annotations

import collections
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
ROW_MASK = (1 << TABLE_BITS) - 1


def pair_id(table: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(table) << TABLE_BITS) | rows.astype(np.int64)


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Unit rows in float32 (stored float16 embeddings are normalised again: cosine, not a dot product)."""
    vectors = vectors.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


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


def _ok_table(url: str, table: int, storage_cfg: StorageCfg, columns: list[str]) -> tuple[np.ndarray, pa.Table]:
    """(ids, the `columns` of the ok rows) of one table."""
    data = tables.read_table(url, storage_cfg, ["status", *columns])
    rows = np.flatnonzero(pc.equal(data.column("status"), STATUS_OK).to_numpy(zero_copy_only=False))
    return pair_id(table, rows), data.select(columns).take(pa.array(rows, pa.int64()))


@ray.remote
def _sample(url: str, table: int, storage_cfg: StorageCfg, size: int, seed: int) -> tuple[int, str | None, np.ndarray]:
    """(ok pairs, shard URL, up to `size` of their unit vectors drawn at random) of one table."""
    ids, ok = _ok_table(url, table, storage_cfg, ["shard", "image_embedding"])
    pick = np.random.default_rng(seed + table).choice(len(ids), size=min(size, len(ids)), replace=False)
    shard = ok.column("shard")[0].as_py() if len(ids) else None
    return len(ids), shard, normalized(tables.image_vectors(ok.take(pa.array(np.sort(pick), pa.int64()))))


def _assigned(batch: dict, centroids: np.ndarray, probes: int, storage_cfg: StorageCfg) -> pa.Table:
    """Ray Data stage: a table's ok pairs, once per partition they are assigned to (partition, id, vector as
    stored: the search normalises, so a float16 table is not rounded twice)."""
    out = []
    for table, url in zip(batch["table"].tolist(), batch["url"].tolist()):
        ids, ok = _ok_table(url, table, storage_cfg, ["image_embedding"])
        vectors = ok.column("image_embedding").combine_chunks()
        assigned = nearest_partitions(normalized(tables.image_vectors(ok)), centroids, probes)
        repeat = pa.array(np.repeat(np.arange(len(ids)), assigned.shape[1]), pa.int64())
        out.append(pa.table({"partition": pa.array(assigned.ravel().astype(np.int32)),
                             "id": pa.array(np.repeat(ids, assigned.shape[1])),
                             "image_embedding": vectors.take(repeat)}))
    return pa.concat_tables(out)


def _search_group(group: pa.Table, threshold: float) -> pa.Table:
    """Ray Data stage: every near-duplicate pair of one partition."""
    a, b, cosine = search_partition(group.column("id").to_numpy(), normalized(tables.image_vectors(group)),
                                    threshold)
    return pa.table({"a": a, "b": b, "cosine": cosine.astype(np.float32)})


def find_edges(files: list[str], storage_cfg: StorageCfg, threshold: float, partition_size: int, probes: int,
               num_cpus: float, seed: int = 0) -> tuple[tuple[np.ndarray, ...], dict]:
    """All near-duplicate edges (a, b, cosine) among the tables' ok pairs, how they were searched, and each
    table's shard URL and ok count.

    A Ray Data shuffle: each table's pairs are read and assigned to partitions, grouped by partition, and
    every partition is searched in one task. Up to `partition_size` ok pairs there is one partition (exact)."""
    per_table = max(1, math.ceil(KMEANS_SAMPLE / len(files)))
    sampled = ray.get([_sample.options(num_cpus=num_cpus).remote(url, t, storage_cfg, per_table, seed)
                       for t, url in enumerate(files)])
    n = sum(count for count, _, _ in sampled)
    info = {"ok_pairs": n, "shards": [shard or url for url, (_, shard, _) in zip(files, sampled)]}
    if n <= partition_size:
        centroids = np.ones((1, EMBEDDING_DIM), np.float32)  # one partition: every pair meets every other
        search = {"partitions": 1, "probes": 1, "exact": True}
    else:
        sample = np.concatenate([s for _, _, s in sampled])
        k = max(2, math.ceil(n * probes / partition_size))
        centroids = spherical_kmeans(sample, min(k, len(sample)), seed)
        search = {"partitions": len(centroids), "probes": probes, "exact": False}
        log.info("dedup: %d ok pairs in %d partitions (k-means on %d vectors), %d probes each", n, len(centroids),
                 len(sample), probes)
    pairs = (ray.data.from_items([{"table": t, "url": url} for t, url in enumerate(files)],
                                 override_num_blocks=len(files))
             .map_batches(_assigned, batch_size=1, batch_format="numpy", num_cpus=num_cpus,
                          fn_kwargs={"centroids": centroids, "probes": search["probes"], "storage_cfg": storage_cfg})
             .groupby("partition", num_partitions=min(len(centroids), max(1, len(files))))
             .map_groups(_search_group, batch_format="pyarrow", num_cpus=num_cpus, fn_kwargs={"threshold": threshold}))
    found = [(batch["a"], batch["b"], batch["cosine"]) for batch in pairs.iter_batches(batch_format="numpy")]
    return _unique_edges(found), {**search, **info}


def _unique_edges(parts: list) -> tuple[np.ndarray, ...]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
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
                    partition_size: int, probes: int, num_cpus: float, output: str) -> dict:
    """Write {output}/duplicates/{table name}.parquet (DUPLICATES_SCHEMA) for every input table; the counts.

    The driver holds int64 ids, not vectors: the edges, the group of every pair in one, and what each dropped
    pair matched; tables are read (and the duplicates tables written) by tasks."""
    (a, b, edge_cosine), search = find_edges(files, storage_cfg, threshold, partition_size, probes, num_cpus)
    shards = search.pop("shards")
    nodes, labels = components(a, b)
    meta = _gather(files, storage_cfg, nodes, ["similarity", "position"], num_cpus)
    # the kept pair of each group: highest similarity, then the smaller shard URL, then the smaller position
    shard_rank = np.argsort(np.argsort(np.array(shards, dtype=object).astype(str), kind="stable"))
    order = np.lexsort((meta["position"], shard_rank[nodes >> TABLE_BITS], -meta["similarity"], labels))
    first = np.ones(len(order), bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    keeper_of_label = np.zeros(len(nodes), np.int64)
    keeper_of_label[labels[order][first]] = order[first]
    keeper = keeper_of_label[labels]                 # node index of each node's kept pair
    members = np.flatnonzero(keeper != np.arange(len(nodes)))
    member, kept = nodes[members], nodes[keeper[members]]
    cosines = _cosines(files, storage_cfg, nodes, members, keeper[members], (a, b, edge_cosine), num_cpus)
    kept_keys = _gather(files, storage_cfg, kept, ["key"], num_cpus)["key"]
    dropped = {"id": member, "reason": np.full(len(member), NEAR_DUPLICATE, dtype=object), "match_key": kept_keys,
               "match_shard": np.array([shards[t] for t in kept >> TABLE_BITS], dtype=object), "cosine": cosines}
    matched = 0
    if references:
        dropped, matched = _with_reference_matches(dropped, files, references, threshold, storage_cfg, num_cpus)
    reasons = collections.Counter(dropped["reason"].tolist())
    tables_of = dropped["id"] >> TABLE_BITS
    writes = []
    for t, url in enumerate(files):
        mine = tables_of == t
        writes.append(_write_table.options(num_cpus=num_cpus).remote(
            url, t, storage_cfg, {k: v[mine] for k, v in dropped.items()}, output))
    ray.get(writes)
    return {NEAR_DUPLICATE: reasons[NEAR_DUPLICATE], MATCHES_REFERENCE: reasons[MATCHES_REFERENCE],
            "groups": int(first.sum()), "ok_pairs_searched": search.pop("ok_pairs"), "search": search}


@ray.remote
def _columns_at(url: str, table: int, storage_cfg: StorageCfg, ids: np.ndarray, columns: list[str]) -> dict:
    data = tables.read_table(url, storage_cfg, columns).take(pa.array(ids & ROW_MASK, pa.int64()))
    return {name: (tables.image_vectors(data) if name == "image_embedding"
                   else data.column(name).to_numpy(zero_copy_only=False)) for name in columns}


def _gather(files: list[str], storage_cfg: StorageCfg, ids: np.ndarray, columns: list[str],
            num_cpus: float) -> dict[str, np.ndarray]:
    """The `columns` of the pairs `ids` (any order), read by one task per table that holds some."""
    tables_of = ids >> TABLE_BITS
    present = np.unique(tables_of)
    parts = ray.get([_columns_at.options(num_cpus=num_cpus).remote(files[t], int(t), storage_cfg,
                                                                    ids[tables_of == t], columns) for t in present])
    out = {}
    for name in columns:
        values = [part[name] for part in parts]
        column = np.empty((len(ids), *values[0].shape[1:]) if values else (0,),
                          dtype=values[0].dtype if values else object)
        for t, value in zip(present, values):
            column[tables_of == t] = value
        out[name] = column
    return out


def _cosines(files, storage_cfg, nodes: np.ndarray, members: np.ndarray, keepers: np.ndarray, edges: tuple,
             num_cpus: float) -> np.ndarray:
    """cos(member, its kept pair) for node indices `members` and `keepers`: from the edge between them where
    the search found one (most groups are cliques), else from the two vectors (along a chain), read by tasks."""
    a, b, edge_cosine = edges
    if len(members) == 0:
        return np.zeros(0, np.float32)
    n = np.int64(len(nodes))
    edge_keys = np.searchsorted(nodes, a) * n + np.searchsorted(nodes, b)  # a < b, so one key per edge
    order = np.argsort(edge_keys)
    wanted = np.minimum(members, keepers) * n + np.maximum(members, keepers)
    at = order[np.minimum(np.searchsorted(edge_keys[order], wanted), len(order) - 1)]
    direct = edge_keys[at] == wanted
    cosines = np.where(direct, edge_cosine[at], np.nan).astype(np.float32)
    missing = np.flatnonzero(~direct)
    if len(missing):
        ids = np.concatenate([nodes[members[missing]], nodes[keepers[missing]]])
        vectors = normalized(_gather(files, storage_cfg, ids, ["image_embedding"], num_cpus)["image_embedding"])
        cosines[missing] = np.sum(vectors[:len(missing)] * vectors[len(missing):], axis=1)
    return cosines


def _with_reference_matches(dropped: dict, files, references, threshold, storage_cfg, num_cpus) -> tuple[dict, int]:
    """Add the pairs that match a reference image (replacing a near_duplicate record of the same pair)."""
    ref = reference_vectors(references, storage_cfg)
    ref_put = ray.put(ref["vector"])
    found = ray.get([_reference_matches.options(num_cpus=num_cpus).remote(url, t, storage_cfg, ref_put, threshold)
                     for t, url in enumerate(files)])
    ids = np.concatenate([f[0] for f in found])
    which = np.concatenate([f[1] for f in found])
    best = np.concatenate([f[2] for f in found]).astype(np.float32)
    keep = ~np.isin(dropped["id"], ids)
    matched = {"id": ids, "reason": np.full(len(ids), MATCHES_REFERENCE, dtype=object),
               "match_key": np.array(ref["key"], dtype=object)[which] if len(ids) else np.zeros(0, object),
               "match_shard": np.array(ref["shard"], dtype=object)[which] if len(ids) else np.zeros(0, object),
               "cosine": best}
    return {k: np.concatenate([dropped[k][keep], matched[k]]) for k in dropped}, len(ids)


@ray.remote
def _reference_matches(url: str, table: int, storage_cfg: StorageCfg, references: np.ndarray,
                       threshold: float) -> tuple[np.ndarray, ...]:
    """(id, reference index, cosine) of the pairs whose nearest reference image is >= threshold."""
    ids, ok = _ok_table(url, table, storage_cfg, ["image_embedding"])
    vectors = normalized(tables.image_vectors(ok))
    best = np.full(len(ids), -np.inf, np.float32)
    which = np.zeros(len(ids), np.int64)
    for start in range(0, len(references), SEARCH_BLOCK):
        scores = vectors @ references[start:start + SEARCH_BLOCK].T
        if scores.size:
            top = np.argmax(scores, axis=1)
            value = scores[np.arange(len(top)), top]
            better = value > best
            best[better], which[better] = value[better], top[better] + start
    hit = best >= threshold
    return ids[hit], which[hit], best[hit]


@ray.remote
def _write_table(url: str, table: int, storage_cfg: StorageCfg, dropped: dict, output: str) -> None:
    """{output}/duplicates/{name}.parquet: this table's dropped pairs in shard order (an empty table if none)."""
    data = tables.read_table(url, storage_cfg, ["key", "shard", "position"]).take(
        pa.array(dropped["id"] & ROW_MASK, pa.int64()))
    order = np.argsort(data.column("position").to_numpy(), kind="stable")
    rows = pa.table({"key": data.column("key"), "shard": data.column("shard"), "position": data.column("position"),
                     "reason": pa.array(dropped["reason"].tolist(), pa.string()),
                     "match_key": pa.array(dropped["match_key"].tolist(), pa.string()),
                     "match_shard": pa.array(dropped["match_shard"].tolist(), pa.string()),
                     "cosine": pa.array(dropped["cosine"].astype(np.float32))}, schema=DUPLICATES_SCHEMA)
    fs, out = storage.filesystem(output, storage_cfg)
    sink = io.BytesIO()
    pq.write_table(rows.take(pa.array(order, pa.int64())), sink)
    storage.write_atomically(fs, storage.join(out, "duplicates", f"{tables.table_name(url)}.parquet"),
                             sink.getvalue())


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


def dropped_positions(output: str, name: str, storage_cfg: StorageCfg) -> set[int]:
    """Positions of one table's pairs that dedup dropped (read back from duplicates/{name}.parquet)."""
    fs, out = storage.filesystem(output, storage_cfg)
    path = storage.join(out, "duplicates", f"{name}.parquet")
    with fs.open(path, "rb") as f:
        return set(pq.read_table(f, columns=["position"]).column("position").to_pylist())
