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
import json
import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.io import storage, tables
from pipeline.config import StorageCfg
from pipeline.io.schema import EMBEDDING_DIM, STATUS_OK

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


def search_partition(ids: np.ndarray, vectors: np.ndarray, threshold: float,
                     queries: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Every pair (a < b by id) of one partition with cosine >= threshold, (a, b, cosine), where a is one of
    the `queries` rows (a boolean mask; default all): reference images are compared with the inputs, never with
    each other (their ids are larger than the inputs', so a is always the input). In id order, a block of
    rows is compared only with the rows from its first on: half the products of all against all."""
    order = np.argsort(ids, kind="stable")
    ids, vectors = ids[order], vectors[order]
    rows = np.arange(len(ids)) if queries is None else np.flatnonzero(queries[order])
    found = []
    for start in range(0, len(rows), SEARCH_BLOCK):
        block_rows = rows[start:start + SEARCH_BLOCK]
        first = block_rows[0]
        scores = vectors[block_rows] @ vectors[first:].T
        i, j = np.nonzero(scores >= threshold)
        keep = ids[block_rows[i]] < ids[first + j]
        found.append((ids[block_rows[i[keep]]], ids[first + j[keep]], scores[i[keep], j[keep]]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate(parts) for parts in zip(*found))


@dataclass(frozen=True)
class Table:
    """An embedding table the search reads: an input table, or a reference one (`dedup_against`), which may be
    limited to the pairs a filter job kept (`keep`: its keep-list)."""
    url: str
    keep: str | None = None


def _ok_table(table: Table, index: int, storage_cfg: StorageCfg, columns: list[str]) -> tuple[np.ndarray, pa.Table]:
    """(ids, the `columns` of the ok rows) of one table; of a reference table with a keep-list, of the kept ones."""
    keyed = table.keep is not None and "key" not in columns  # the key column is read only to match a keep-list
    data = tables.read_table(table.url, storage_cfg, ["status", *columns, *(["key"] if keyed else [])])
    ok = pc.equal(data.column("status"), STATUS_OK)
    if table.keep is not None:
        kept = tables.read_table(table.keep, storage_cfg, ["key"]).column("key")
        ok = pc.and_(ok, pc.is_in(data.column("key"), kept))
    rows = np.flatnonzero(ok.to_numpy(zero_copy_only=False))
    return pair_id(index, rows), data.select(columns).take(pa.array(rows, pa.int64()))


@ray.remote
def _sample(table: Table, index: int, storage_cfg: StorageCfg, size: int,
            seed: int) -> tuple[int, str | None, np.ndarray]:
    """(ok pairs, shard URL, up to `size` of their unit vectors drawn at random) of one table."""
    ids, ok = _ok_table(table, index, storage_cfg, ["shard", "image_embedding"])
    pick = np.random.default_rng(seed + index).choice(len(ids), size=min(size, len(ids)), replace=False)
    shard = ok.column("shard")[0].as_py() if len(ids) else None
    return len(ids), shard, normalized(tables.image_vectors(ok.take(pa.array(np.sort(pick), pa.int64()))))


def _assigned(batch: dict, centroids: np.ndarray, probes: int, storage_cfg: StorageCfg) -> pa.Table:
    """Ray Data stage: a table's ok pairs, once per partition they are assigned to (partition, id, vector as
    stored: the search normalises, so a float16 table is not rounded twice)."""
    out = []
    for index, url, keep in zip(batch["index"].tolist(), batch["url"].tolist(), batch["keep"].tolist()):
        ids, ok = _ok_table(Table(url, keep or None), index, storage_cfg, ["image_embedding"])
        vectors = ok.column("image_embedding").combine_chunks()
        assigned = nearest_partitions(normalized(tables.image_vectors(ok)), centroids, probes)
        repeat = pa.array(np.repeat(np.arange(len(ids)), assigned.shape[1]), pa.int64())
        out.append(pa.table({"partition": pa.array(assigned.ravel().astype(np.int32)),
                             "id": pa.array(np.repeat(ids, assigned.shape[1])),
                             "image_embedding": vectors.take(repeat)}))
    return pa.concat_tables(out)


def _search_group(group: pa.Table, threshold: float, inputs: int) -> pa.Table:
    """Ray Data stage: every near-duplicate pair of one partition (the first `inputs` tables are the queries)."""
    ids = group.column("id").to_numpy()
    a, b, cosine = search_partition(ids, normalized(tables.image_vectors(group)), threshold,
                                    queries=(ids >> TABLE_BITS) < inputs)
    return pa.table({"a": a, "b": b, "cosine": cosine.astype(np.float32)})


def find_edges(sources: list[Table], inputs: int, storage_cfg: StorageCfg, threshold: float, partition_size: int,
               probes: int, num_cpus: float, seed: int = 0) -> tuple[tuple[np.ndarray, ...], dict]:
    """Every edge (a, b, cosine) at cosine >= threshold between two input pairs or an input pair (a) and a
    reference image (b), how they were searched, and each table's shard URL and ok count. The first `inputs`
    sources are the input tables, the rest the references.

    A Ray Data shuffle: each table's pairs are read and assigned to partitions, grouped by partition, and
    every partition is searched in one task. Up to `partition_size` ok pairs there is one partition (exact)."""
    per_table = max(1, math.ceil(KMEANS_SAMPLE / len(sources)))
    sampled = ray.get([_sample.options(num_cpus=num_cpus).remote(table, t, storage_cfg, per_table, seed)
                       for t, table in enumerate(sources)])
    n = sum(count for count, _, _ in sampled)
    info = {"ok_pairs": sum(count for count, _, _ in sampled[:inputs]), "reference_images": n - sum(
        count for count, _, _ in sampled[:inputs]), "shards": [shard or table.url for table, (_, shard, _)
                                                               in zip(sources, sampled)]}
    if n <= partition_size:
        centroids = np.ones((1, EMBEDDING_DIM), np.float32)  # one partition: every pair meets every other
        search = {"partitions": 1, "probes": 1, "exact": True}
    else:
        sample = np.concatenate([s for _, _, s in sampled])
        k = max(2, math.ceil(n * probes / partition_size))
        centroids = spherical_kmeans(sample, min(k, len(sample)), seed)
        search = {"partitions": len(centroids), "probes": probes, "exact": False}
        log.info("dedup: %d pairs (%d of them reference images) in %d partitions (k-means on %d vectors), "
                 "%d probes each", n, info["reference_images"], len(centroids), len(sample), probes)
    pairs = (ray.data.from_items([{"index": t, "url": table.url, "keep": table.keep or ""}
                                  for t, table in enumerate(sources)], override_num_blocks=len(sources))
             .map_batches(_assigned, batch_size=1, batch_format="numpy", num_cpus=num_cpus,
                          fn_kwargs={"centroids": centroids, "probes": search["probes"], "storage_cfg": storage_cfg})
             .groupby("partition", num_partitions=min(len(centroids), len(sources)))
             .map_groups(_search_group, batch_format="pyarrow", num_cpus=num_cpus,
                         fn_kwargs={"threshold": threshold, "inputs": inputs}))
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

def find_duplicates(files: list[str], threshold: float, references: list[Table], storage_cfg: StorageCfg,
                    partition_size: int, probes: int, num_cpus: float, output: str) -> dict:
    """Write {output}/duplicates/{table name}.parquet (DUPLICATES_SCHEMA) for every input table; the counts.

    The reference images go through the same search as the inputs, so their number is bounded by the
    cluster, not by the driver. The driver holds int64 ids, not vectors: the edges, the group of every pair
    in one, and what each dropped pair matched; tables are read (and the duplicates tables written) by tasks."""
    sources = [Table(url) for url in files] + list(references)
    urls = [table.url for table in sources]
    edges, search = find_edges(sources, len(files), storage_cfg, threshold, partition_size, probes, num_cpus)
    shards = search.pop("shards")
    to_reference = (edges[1] >> TABLE_BITS) >= len(files)
    a, b, edge_cosine = (e[~to_reference] for e in edges)
    nodes, labels = components(a, b)
    meta = _gather(urls, storage_cfg, nodes, ["similarity", "position"], num_cpus)
    # the kept pair of each group: highest similarity, then the smaller shard URL, then the smaller position
    shard_rank = np.argsort(np.argsort(np.array(shards, dtype=object).astype(str), kind="stable"))
    order = np.lexsort((meta["position"], shard_rank[nodes >> TABLE_BITS], -meta["similarity"], labels))
    first = np.ones(len(order), bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    keeper_of_label = np.zeros(len(nodes), np.int64)
    keeper_of_label[labels[order][first]] = order[first]
    keeper = keeper_of_label[labels]                 # node index of each node's kept pair
    members = np.flatnonzero(keeper != np.arange(len(nodes)))
    kept = nodes[keeper[members]]
    near = {"id": nodes[members], "reason": np.full(len(members), NEAR_DUPLICATE, dtype=object),
            "match_key": _gather(urls, storage_cfg, kept, ["key"], num_cpus)["key"],
            "match_shard": np.array([shards[t] for t in kept >> TABLE_BITS], dtype=object),
            "cosine": _cosines(urls, storage_cfg, nodes, members, keeper[members], (a, b, edge_cosine), num_cpus)}
    matches = _nearest_references(*(e[to_reference] for e in edges), urls, storage_cfg, num_cpus)
    # a pair dropped by both rules is recorded once, as a reference match
    dropped = {k: np.concatenate([near[k][~np.isin(near["id"], matches["id"])], matches[k]]) for k in near}
    reasons = collections.Counter(dropped["reason"].tolist())
    tables_of = dropped["id"] >> TABLE_BITS
    ray.get([_write_table.options(num_cpus=num_cpus).remote(
        url, storage_cfg, {k: v[tables_of == t] for k, v in dropped.items()}, output) for t, url in enumerate(files)])
    return {NEAR_DUPLICATE: reasons[NEAR_DUPLICATE], MATCHES_REFERENCE: reasons[MATCHES_REFERENCE],
            "groups": int(first.sum()), "ok_pairs_searched": search.pop("ok_pairs"), "search": search}


def _nearest_references(a: np.ndarray, b: np.ndarray, cosine: np.ndarray, urls: list[str], storage_cfg: StorageCfg,
                        num_cpus: float) -> dict[str, np.ndarray]:
    """From the input (a) - reference (b) edges: each matched input pair, its nearest reference image, cosine."""
    order = np.lexsort((b, -cosine, a))           # per input pair, the highest cosine first
    first = np.ones(len(order), bool)
    first[1:] = a[order][1:] != a[order][:-1]
    best = order[first]
    reference = _gather(urls, storage_cfg, b[best], ["key", "shard"], num_cpus)
    return {"id": a[best], "reason": np.full(len(best), MATCHES_REFERENCE, dtype=object),
            "match_key": reference["key"], "match_shard": reference["shard"], "cosine": cosine[best]}


@ray.remote
def _columns_at(url: str, storage_cfg: StorageCfg, ids: np.ndarray, columns: list[str]) -> dict:
    data = tables.read_table(url, storage_cfg, columns).take(pa.array(ids & ROW_MASK, pa.int64()))
    return {name: (tables.image_vectors(data) if name == "image_embedding"
                   else data.column(name).to_numpy(zero_copy_only=False)) for name in columns}


def _gather(files: list[str], storage_cfg: StorageCfg, ids: np.ndarray, columns: list[str],
            num_cpus: float) -> dict[str, np.ndarray]:
    """The `columns` of the pairs `ids` (any order), read by one task per table that holds some."""
    tables_of = ids >> TABLE_BITS
    present = np.unique(tables_of)
    parts = ray.get([_columns_at.options(num_cpus=num_cpus).remote(files[t], storage_cfg, ids[tables_of == t], columns)
                     for t in present])
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


@ray.remote
def _write_table(url: str, storage_cfg: StorageCfg, dropped: dict, output: str) -> None:
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


def reference_tables(entries: list[str], storage_cfg: StorageCfg, exclude: list[str]) -> list[Table]:
    """The tables of `dedup_against`: each entry is an embed job's output folder (all its ok pairs) or a filter
    job's (the pairs it kept: everything already curated), or a glob of such folders. Folders in `exclude`
    (this run's own input and output) are skipped: a pair always matches itself."""
    skip = {storage.filesystem(e, storage_cfg)[1].rstrip("/") for e in exclude}
    out = []
    for entry in entries:
        fs, path = storage.filesystem(entry, storage_cfg)
        folders = sorted(fs.glob(path.rstrip("/"))) if any(c in path for c in "*?[") else [path.rstrip("/")]
        if not folders:
            raise ValueError(f"dedup_against: {entry} matches no folder")
        for folder in folders:
            if folder.rstrip("/") in skip:
                log.info("dedup_against: skipping %s (this run's own input or output)", storage.unstrip(fs, folder))
                continue
            summary = storage.join(folder, "summary.json")
            if fs.exists(storage.join(folder, "keep")) and fs.exists(summary):  # a filter job's output
                with fs.open(summary, "rb") as f:
                    embeddings = json.load(f)["embeddings"]
                for url in tables.embedding_files(embeddings, storage_cfg, field="dedup_against"):
                    keep = storage.join(folder, "keep", f"{tables.table_name(url)}.parquet")
                    if not fs.exists(keep):
                        raise ValueError(f"dedup_against: {storage.unstrip(fs, folder)} has no keep-list for "
                                         f"{url}: an unfinished filter run? Rerun it first.")
                    out.append(Table(url, storage.unstrip(fs, keep)))
            else:
                out += [Table(url) for url in tables.embedding_files(storage.unstrip(fs, folder), storage_cfg,
                                                                      field="dedup_against")]
    return out


def dropped_positions(output: str, name: str, storage_cfg: StorageCfg) -> set[int]:
    """Positions of one table's pairs that dedup dropped (read back from duplicates/{name}.parquet)."""
    fs, out = storage.filesystem(output, storage_cfg)
    path = storage.join(out, "duplicates", f"{name}.parquet")
    with fs.open(path, "rb") as f:
        return set(pq.read_table(f, columns=["position"]).column("position").to_pylist())
