"""Concept rules: image embeddings planted at known cosines from the tiny checkpoint's own query embeddings give
exact dropped and kept sets; with dedup and the similarity rule; a dry run; end to end through the embed job."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import images_decoded_in_chromium, job_config, make_shards, needs_chromium
from pipeline.curate.concepts import embed_queries
from pipeline.curate.run import load_filter_config, run_filter_job
from pipeline.embed.run import run_embed_job
from pipeline.io.schema import embedding_table_schema

WATERMARK = {"name": "watermark", "queries": ["水印", "美食"], "action": "drop", "threshold": 0.5}
QR = {"name": "qr", "queries": ["二维码"], "action": "keep_only", "threshold": 0.2}
QUERIES = ["水印", "美食", "二维码"]  # every rule's queries, in config order


def models_of(tiny_models) -> dict:
    text, image = tiny_models
    return {"text_model": str(text), "text_revision": None, "image_model": str(image), "image_revision": None,
            "tokenizer": str(text), "random_weights": False}


@pytest.fixture(scope="module")
def queries(tiny_models) -> np.ndarray:
    return embed_queries(QUERIES, models_of(tiny_models))


def planted(queries: np.ndarray, along: int | None, cosine: float, seed: int) -> np.ndarray:
    """A unit vector at `cosine` from query `along` and orthogonal to every query beyond that, so that its cosine
    with query j is exactly cosine * (q_along . q_j); along=None: orthogonal to every query."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=queries.shape[1])
    basis, _ = np.linalg.qr(queries.T)  # an orthonormal basis of the queries' span
    noise -= basis @ (basis.T @ noise)
    noise /= np.linalg.norm(noise)
    if along is None:
        return noise
    return cosine * queries[along] + np.sqrt(1 - cosine**2) * noise


def write_tables(folder, models: dict, rows_per_table: list[list[dict]]) -> None:
    """Embedding tables with the embed job's schema and metadata; each row: key, vector (None: an error row),
    similarity."""
    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    schema = embedding_table_schema("float16", models)
    for t, rows in enumerate(rows_per_table):
        n = len(rows)
        error = [r["vector"] is None for r in rows]
        pq.write_table(pa.table({
            "key": [r["key"] for r in rows], "shard": [f"/nowhere/{t:05d}.tar"] * n, "caption": ["标题"] * n,
            "url": [None] * n, "status": ["error" if e else "ok" for e in error],
            "error": ["image_decode_failed: x" if e else None for e in error],
            "image_embedding": [None if e else [float(v) for v in r["vector"]] for e, r in zip(error, rows)],
            "text_embedding": [None] * n, "similarity": [None if e else r.get("similarity", 0.3) for e, r in
                                                         zip(error, rows)],
            "position": list(range(n)), "warning": [None] * n}, schema=schema),
            folder / "embeddings" / f"{t:05d}.parquet")


def design(queries: np.ndarray):
    """Planted pairs and, from the geometry alone (c * q_along . q_j), the rule that takes each, or None."""
    gram = queries @ queries.T
    plan = [("wm-90", 0, 0.9), ("wm-70", 0, 0.7), ("wm-30", 0, 0.3), ("wm-10", 0, 0.1),
            ("qr-65", 2, 0.65), ("qr-50", 2, 0.5), ("far", None, 0.0)]
    rows, expected = [], {}
    for i, (key, along, c) in enumerate(plan):
        cos = np.zeros(len(QUERIES)) if along is None else c * gram[along]
        to_watermark, to_qr = cos[:2].max(), cos[2]
        for value, threshold in ((to_watermark, WATERMARK["threshold"]), (to_qr, QR["threshold"])):
            assert abs(value - threshold) > 0.02, f"design: {key} sits on a threshold ({value:.3f})"
        expected[key] = ("watermark" if to_watermark >= WATERMARK["threshold"]
                         else "qr" if to_qr < QR["threshold"] else None)
        rows.append({"key": key, "vector": planted(queries, along, c, seed=i), "similarity": 0.1 * i})
    rows.append({"key": "broken", "vector": None})
    return rows, expected


def concepts_cfg(emb, out, *overrides, concepts=(WATERMARK, QR)):
    return load_filter_config(None, [f"embeddings={emb}", f"output={out}", "report=false",
                                     f"concepts={json.dumps(list(concepts), ensure_ascii=False)}", *overrides])


def dropped_by(out) -> dict[str, dict]:
    return {r["key"]: r for p in sorted((out / "concepts").glob("*.parquet")) for r in pq.read_table(p).to_pylist()}


def kept(out) -> set[str]:
    return {k for p in (out / "keep").glob("*.parquet") for k in pq.read_table(p).column("key").to_pylist()}


def test_concepts_config_is_checked():
    with pytest.raises(ValueError, match=r"concepts\[0\]\.action: one of drop, keep_only"):
        load_filter_config(None, ["embeddings=a", "output=b", "min_similarity=0",
                                  'concepts=[{name: ad, queries: [广告], action: remove, threshold: 0.3}]'])
    with pytest.raises(ValueError, match=r"concepts\[0\]\.threshold: a cosine in \[-1, 1\]"):
        load_filter_config(None, ["embeddings=a", "output=b", "min_similarity=0",
                                  'concepts=[{name: ad, queries: [广告], action: drop}]'])
    with pytest.raises(ValueError, match=r"unknown config key\(s\): concepts\[0\]\.query"):
        load_filter_config(None, ["embeddings=a", "output=b", "min_similarity=0",
                                  'concepts=[{name: ad, query: 广告, action: drop, threshold: 0.3}]'])


def test_drop_and_keep_only_give_the_planted_sets(local_ray, tiny_models, queries, tmp_path):
    rows, expected = design(queries)
    write_tables(tmp_path / "emb", models_of(tiny_models), [rows[:4], rows[4:]])
    cfg = concepts_cfg(tmp_path / "emb", tmp_path / "out", "min_similarity=-1")
    summary = run_filter_job(cfg)

    drops = dropped_by(tmp_path / "out")
    assert {k: r["reason"] for k, r in drops.items()} == {k: f"concept:{rule}" for k, rule in expected.items() if rule}
    assert {"wm-90", "wm-70", "qr-65", "far"} <= set(drops)  # the design covers each way a rule takes a pair
    assert "broken" not in drops  # error rows are never matched
    assert drops["wm-90"]["query"] == "水印" and drops["wm-90"]["cosine"] == pytest.approx(0.9, abs=3e-3)
    assert kept(tmp_path / "out") == {k for k, rule in expected.items() if rule is None}
    rules = {r["name"]: r for r in summary["concepts"]["rules"]}
    assert rules["watermark"]["dropped"] == sum(rule == "watermark" for rule in expected.values())
    assert rules["qr"]["dropped"] == sum(rule == "qr" for rule in expected.values())
    assert summary["concepts"]["order"].startswith("dedup, then the concept rules")
    assert summary["concepts"]["queries_embedded_by"]["text_model"] == str(tiny_models[0])
    assert sum(s["concept_dropped"] for s in summary["shards"].values()) == len(drops)

    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    again = run_filter_job(cfg)  # the same config: the same result, every file as it was
    assert again["shards_skipped_already_written"] == 2
    assert {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before


def test_rules_apply_after_dedup_and_before_the_similarity_rule(local_ray, tiny_models, queries, tmp_path):
    twin = planted(queries, 0, 0.9, seed=99)
    rows = [{"key": "a", "vector": twin, "similarity": 0.5}, {"key": "b", "vector": twin, "similarity": 0.4},
            {"key": "c", "vector": planted(queries, 0, 0.3, seed=5), "similarity": 0.05},
            {"key": "d", "vector": planted(queries, 0, 0.3, seed=6), "similarity": 0.35}]
    write_tables(tmp_path / "emb", models_of(tiny_models), [rows])
    summary = run_filter_job(concepts_cfg(tmp_path / "emb", tmp_path / "out", "min_similarity=0.1",
                                          "dedup_threshold=0.99", concepts=[WATERMARK]))
    duplicates = pq.read_table(tmp_path / "out" / "duplicates" / "00000.parquet").to_pylist()
    assert [(r["key"], r["reason"]) for r in duplicates] == [("b", "near_duplicate")]  # dedup first, once
    assert {k: r["reason"] for k, r in dropped_by(tmp_path / "out").items()} == {"a": "concept:watermark"}
    assert kept(tmp_path / "out") == {"d"}  # c: below the similarity rule, applied last
    shard = next(iter(summary["shards"].values()))
    assert (shard["duplicates"], shard["concept_dropped"], shard["kept"]) == (1, 1, 1)


def test_a_dry_run_writes_only_the_preview(local_ray, tiny_models, queries, tmp_path):
    rows, _ = design(queries)
    write_tables(tmp_path / "emb", models_of(tiny_models), [rows])
    result = run_filter_job(concepts_cfg(tmp_path / "emb", tmp_path / "out", "min_similarity=0",
                                         "concepts_dry_run=true", "gallery_per_band=3"))
    written = {str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert written == {"concepts_preview/index.html"}  # the planted tables have no source shards: no thumbnails
    page = (tmp_path / "out" / "concepts_preview" / "index.html").read_text()
    assert "watermark: drop at cosine &gt;= 0.5 of 水印 / 美食" in page and "qr: keep_only" in page
    assert "cos 0.9000 to 水印" in page or "cos 0.8999 to 水印" in page or "cos 0.9001 to 水印" in page
    assert {r["name"]: r["dropped"] for r in result["concepts"]["rules"]}["watermark"] >= 2


@pytest.fixture(scope="module")
def embedded(local_ray, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts-e2e")
    make_shards(root / "shards", 2, 8)
    run_embed_job(job_config(tiny_models, f"{root}/shards/*.tar", str(root / "emb")))
    return root


def test_end_to_end_through_the_embed_job_and_the_report(embedded, tiny_models, tmp_path):
    """The rule takes exactly the pairs whose stored image embedding reaches the threshold with a query embedded
    here independently (the same checkpoint and tokenizer), and the report shows its galleries."""
    from pipeline.curate.dedup import normalized
    from pipeline.io.tables import image_vectors

    queries = embed_queries(["红色的圆形", "蓝色"], models_of(tiny_models))
    tables = [pq.read_table(p) for p in sorted((embedded / "emb" / "embeddings").glob("*.parquet"))]
    ok = [t.filter(pa.compute.equal(t.column("status"), "ok")) for t in tables]
    best = {k: c for t in ok for k, c in zip(t.column("key").to_pylist(),
                                             (normalized(image_vectors(t)) @ queries.T).max(1))}
    values = np.sort(np.array(list(best.values())))
    threshold = float((values[len(values) // 2] + values[len(values) // 2 + 1]) / 2)  # between two pairs
    rule = {"name": "red", "queries": ["红色的圆形", "蓝色"], "action": "drop", "threshold": threshold}
    cfg = load_filter_config(None, [f"embeddings={embedded / 'emb'}", f"output={tmp_path / 'out'}",
                                    "min_similarity=-1", "gallery_per_band=3", f"concepts={json.dumps([rule])}"])
    summary = run_filter_job(cfg)
    assert set(dropped_by(tmp_path / "out")) == {k for k, c in best.items() if c >= threshold}
    assert kept(tmp_path / "out") == {k for k, c in best.items() if c < threshold}
    assert summary["concepts"]["rules"][0]["dropped"] == len(values) - (len(values) // 2 + 1)
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    assert "Concept rules" in page and "red: drop at cosine" in page and "Just below the threshold" in page


@needs_chromium
def test_the_concept_galleries_render_in_headless_chromium(embedded, tiny_models, tmp_path):
    rule = {"name": "blue", "queries": ["蓝色"], "action": "keep_only", "threshold": 0.0}
    common = [f"embeddings={embedded / 'emb'}", "min_similarity=-1", "gallery_per_band=3",
              f"concepts={json.dumps([rule])}"]
    run_filter_job(load_filter_config(None, [*common, f"output={tmp_path / 'preview'}", "concepts_dry_run=true"]))
    run_filter_job(load_filter_config(None, [*common, f"output={tmp_path / 'out'}"]))
    for page in (tmp_path / "preview" / "concepts_preview" / "index.html", tmp_path / "out" / "report" / "index.html"):
        assert "blue: keep_only at cosine" in page.read_text()
        total, loaded = images_decoded_in_chromium(page, tmp_path / f"profile-{page.parent.name}")
        assert total == page.read_text().count("<img ") >= 3 and loaded == total, page
