"""Near-duplicate and reference-match curation on constructed embeddings whose groups are known."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.curate.run import load_filter_config, run_filter_job
from pipeline.config import StorageCfg
from pipeline.curate.dedup import Table, components, find_edges, pair_id, search_partition
from pipeline.io.schema import embedding_table_schema

D = 512
T = 0.9  # cos 20 deg = 0.940 >= T > cos 40 deg = 0.766


def direction(i: int, j: int = 0, degrees: float = 0.0) -> np.ndarray:
    """The unit vector at `degrees` from basis vector i towards basis vector j."""
    v = np.zeros(D)
    v[i] = np.cos(np.radians(degrees))
    if degrees:
        v[j] = np.sin(np.radians(degrees))
    return v


def write_table(folder, shard: str, rows: list[dict]) -> None:
    """An embed-job table: rows of key, similarity and image vector (None: an error row)."""
    schema = embedding_table_schema("float32")
    columns = {name: [] for name in schema.names}
    for position, row in enumerate(rows):
        ok = row["vector"] is not None
        columns["key"].append(row["key"])
        columns["shard"].append(shard)
        columns["caption"].append(f"caption of {row['key']}")
        columns["url"].append(None)
        columns["status"].append("ok" if ok else "error")
        columns["error"].append(None if ok else "image_decode_failed: constructed")
        columns["image_embedding"].append(list(row["vector"]) if ok else None)
        columns["text_embedding"].append(list(direction(500)) if ok else None)
        columns["similarity"].append(row["similarity"] if ok else None)
        columns["position"].append(position)
        columns["warning"].append(None)
    name = shard.rsplit("/", 1)[-1].removesuffix(".tar")
    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), folder / "embeddings" / f"{name}.parquet")


def row(key, vector, similarity=0.2):
    return {"key": key, "vector": vector, "similarity": similarity}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two shards and a reference set. Groups: the chain a~b~c (cos(a, c) below T), d|e across shards, the tie
    f|g (same similarity, different shards), the tie h|i (same shard), j|k near a reference image; r matches
    a reference alone; err is an error row; s0..s3 are unique."""
    root = tmp_path_factory.mktemp("dedup")
    shard0, shard1 = "s3://bucket/wukong/00000.tar", "s3://bucket/wukong/00001.tar"
    write_table(root / "emb", shard0, [
        row("a", direction(0), 0.30), row("h", direction(4), 0.25), row("d", direction(2), 0.20),
        row("s0", direction(10)), row("i", direction(4, 5, 8), 0.25), row("g", direction(3, 6, 5), 0.40),
        row("err", None), row("j", direction(14, 15, 3), 0.50), row("s1", direction(11))])
    write_table(root / "emb", shard1, [
        row("b", direction(0, 1, 20), 0.10), row("e", direction(2, 3, 10), 0.31), row("f", direction(3), 0.40),
        row("c", direction(0, 1, 40), 0.35), row("r", direction(12, 13, 5), 0.90), row("k", direction(14), 0.45),
        row("s2", direction(20)), row("s3", direction(21))])
    write_table(root / "ref", "s3://bucket/flickr30k-cn/test-0.tar", [
        row("ref-12", direction(12), 0.9), row("ref-14", direction(14, 16, 2)), row("ref-far", direction(30))])
    return root, shard0, shard1


def duplicates(out, name):
    return {r["key"]: r for r in pq.read_table(out / "duplicates" / f"{name}.parquet").to_pylist()}


def test_planted_groups_ties_errors_and_references(local_ray, planted):
    root, shard0, shard1 = planted
    cfg = load_filter_config(None, [f"embeddings={root}/emb", f"output={root}/out", "min_similarity=-1",
                                    f"dedup_threshold={T}", f"dedup_against=[{root}/ref]", "report=false"])
    summary = run_filter_job(cfg)
    out = root / "out"
    d0, d1 = duplicates(out, "00000"), duplicates(out, "00001")
    # the chain is one group: c has the highest similarity; a and b are matched to it
    # d|e: e (0.31) beats d (0.20) across shards; f|g tie at 0.40: the smaller shard URL (shard0's g) stays;
    # h|i tie in one shard: the smaller position (h) stays; j and k both match ref-14, so neither stays
    assert set(d0) == {"a", "d", "i", "j"} and set(d1) == {"b", "f", "r", "k"}
    assert {k: (v["reason"], v["match_key"], v["match_shard"]) for k, v in {**d0, **d1}.items()} == {
        "a": ("near_duplicate", "c", shard1), "b": ("near_duplicate", "c", shard1),
        "d": ("near_duplicate", "e", shard1), "f": ("near_duplicate", "g", shard0),
        "i": ("near_duplicate", "h", shard0),
        "j": ("matches_reference", "ref-14", "s3://bucket/flickr30k-cn/test-0.tar"),
        "k": ("matches_reference", "ref-14", "s3://bucket/flickr30k-cn/test-0.tar"),
        "r": ("matches_reference", "ref-12", "s3://bucket/flickr30k-cn/test-0.tar"),
    }
    # cosine: to the kept pair (a is 40 degrees from c: below T, grouped through b) or to the reference
    assert d0["a"]["cosine"] == pytest.approx(np.cos(np.radians(40)), abs=1e-5)
    assert d1["b"]["cosine"] == pytest.approx(np.cos(np.radians(20)), abs=1e-5)
    assert d0["i"]["cosine"] == pytest.approx(np.cos(np.radians(8)), abs=1e-5)
    assert d1["r"]["cosine"] == pytest.approx(np.cos(np.radians(5)), abs=1e-5)
    assert d0["a"]["shard"] == shard0 and d0["a"]["position"] == 0 and d1["r"]["position"] == 4
    # keep-lists hold every other ok pair (the rule keeps all survivors here), never a dropped one or an error
    kept = {r["key"] for name in ("00000", "00001") for r in pq.read_table(out / "keep" / f"{name}.parquet").to_pylist()}
    assert kept == {"h", "s0", "g", "s1", "e", "c", "s2", "s3"}
    dups = summary["duplicates"]
    assert (dups["near_duplicate"], dups["matches_reference"], dups["groups"]) == (5, 3, 5)
    assert summary["kept"] == 8 and summary["errors"] == 1
    assert json.loads((out / "summary.json").read_text())["duplicates"]["near_duplicate"] == 5


def test_the_rule_applies_to_the_survivors(local_ray, planted):
    root, _, _ = planted
    cfg = load_filter_config(None, [f"embeddings={root}/emb", f"output={root}/top", "keep_top_fraction=0.5",
                                    f"dedup_threshold={T}", "report=false"])
    summary = run_filter_job(cfg)
    # 16 ok pairs; without references, j (0.50) is kept over k: a, b, d, f, i, k are dropped. The top half of
    # the 10 survivors (0.90 0.50 0.40 0.35 0.31 | 0.25 0.2 0.2 0.2 0.2) is cut at the 5th, 0.31
    assert summary["duplicates"]["near_duplicate"] == 6 and summary["duplicates"]["matches_reference"] == 0
    assert summary["ok"] == 16 and summary["kept"] == 5
    assert summary["threshold"] == pytest.approx(0.31, abs=1e-6)


def test_against_what_a_filter_job_kept(local_ray, planted):
    """dedup_against a filter job's output: only the reference pairs it kept count (everything already
    curated); a glob names it, and the run's own embeddings folder in the list is skipped."""
    root, shard0, shard1 = planted
    run_filter_job(load_filter_config(None, [f"embeddings={root}/ref", f"output={root}/ref-kept",
                                             "min_similarity=0.5", "report=false"]))  # keeps ref-12 (0.9) only
    cfg = load_filter_config(None, [f"embeddings={root}/emb", f"output={root}/vs-kept", "min_similarity=-1",
                                    f"dedup_threshold={T}", f"dedup_against=[{root}/emb, {root}/ref-k*]",
                                    "report=false"])
    summary = run_filter_job(cfg)
    found = {**duplicates(root / "vs-kept", "00000"), **duplicates(root / "vs-kept", "00001")}
    # r still matches ref-12; ref-14 was not kept, so j and k are an ordinary group again (j, 0.50, stays)
    assert {k: (v["reason"], v["match_key"]) for k, v in found.items()} == {
        "a": ("near_duplicate", "c"), "b": ("near_duplicate", "c"), "d": ("near_duplicate", "e"),
        "f": ("near_duplicate", "g"), "i": ("near_duplicate", "h"), "k": ("near_duplicate", "j"),
        "r": ("matches_reference", "ref-12")}
    assert summary["duplicates"]["search"]["reference_images"] == 1


def test_unknown_reference_folder_is_an_error(local_ray, planted):
    root, _, _ = planted
    cfg = load_filter_config(None, [f"embeddings={root}/emb", f"output={root}/bad", "min_similarity=-1",
                                    f"dedup_threshold={T}", f"dedup_against=[{root}/no-such-*]", "report=false"])
    with pytest.raises(ValueError, match="dedup_against: .*no-such-.* matches no folder"):
        run_filter_job(cfg)


def test_components_of_a_chain_and_separate_pairs():
    nodes, labels = components(np.array([5, 7, 100, 3]), np.array([7, 9, 200, 9]))
    groups = {}
    for node, label in zip(nodes, labels):
        groups.setdefault(label, set()).add(int(node))
    assert sorted(groups.values(), key=min) == [{3, 5, 7, 9}, {100, 200}]


def brute_force(ids, vectors, threshold):
    a, b, _ = search_partition(ids, vectors, threshold)
    return set(zip(a.tolist(), b.tolist()))


def test_partitioned_search_against_brute_force(local_ray, tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1500, D)).astype(np.float32)
    copies = base[:300] + rng.normal(scale=0.15, size=(300, D)).astype(np.float32)  # planted near-copies
    vectors = np.concatenate([base, copies])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(vectors))  # copies spread over three tables
    ids = []
    for t in range(3):
        rows = order[t::3]
        write_table(tmp_path, f"s3://bucket/x/{t:05d}.tar", [row(str(i), vectors[i]) for i in rows])
        ids.append(pair_id(t, np.arange(len(rows))))
    ids, vectors = np.concatenate(ids), np.concatenate([vectors[order[t::3]] for t in range(3)])
    files = [str(path) for path in sorted((tmp_path / "embeddings").glob("*.parquet"))]
    exact = brute_force(ids, vectors, T)
    assert len(exact) >= 290  # the copies are within T of their originals
    sources = [Table(f) for f in files]
    (a, b, _), info = find_edges(sources, 3, StorageCfg(), T, partition_size=600, probes=2, num_cpus=0.5)
    assert (info["partitions"], info["probes"], info["exact"], info["ok_pairs"]) == (6, 2, False, 1800)
    found = set(zip(a.tolist(), b.tolist()))  # ceil(1800 x 2 / 600) partitions
    assert found <= exact  # never a false edge
    assert len(found) / len(exact) >= 0.9, len(found) / len(exact)
    # the exact path: everything in one partition
    (a, b, _), info = find_edges(sources, 3, StorageCfg(), T, partition_size=len(ids), probes=2, num_cpus=0.5)
    assert info["exact"] and set(zip(a.tolist(), b.tolist())) == exact
